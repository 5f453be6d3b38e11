//! `build-linux`: compile the sandbox for Linux inside a container.
//!
//! The source goes in as a tar upload rather than a bind mount: bind mounts
//! from a Mac go through the VM's file sharing (slow for cargo's many small
//! reads), do not exist at all with a remote `DOCKER_HOST`, and would let the
//! container write root-owned files into the checkout. The registry cache and
//! the target directory live in named volumes per architecture, so a second
//! build only recompiles what changed.

mod container;
mod output;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use bollard::Docker;

use crate::archive::Written;
use crate::common::{ArchChoice, absolute, arches, connect, workspace_root};
use crate::images::{self, Arch, BuilderImage};
use crate::progress::Phase;

pub use output::print_summary;

/// The package whose binaries are shipped.
const PACKAGE: &str = "sandbox";

/// Options of `cargo xtask build-linux`.
#[derive(clap::Args)]
pub struct Args {
    /// Target architecture; defaults to the Docker engine's own.
    #[arg(long, value_enum)]
    arch: Option<ArchChoice>,
    /// Output directory; binaries land in <OUT>/linux-<arch>/.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Builder image to use instead of building docker/builder.Dockerfile.
    #[arg(long)]
    image: Option<String>,
    /// Base of docker/builder.Dockerfile (its RUST_IMAGE build argument).
    #[arg(long, default_value = images::DEFAULT_RUST_IMAGE)]
    base_image: String,
    #[arg(long, value_enum, default_value = "release")]
    profile: Profile,
    /// Rebuild the builder image from scratch.
    #[arg(long)]
    no_cache: bool,
    /// Source tree to build (default: this workspace).
    #[arg(long, value_name = "DIR")]
    source: Option<PathBuf>,
}

/// Builds every requested architecture, then prints where the binaries went.
pub async fn run(args: Args) -> Result<()> {
    let Args {
        arch,
        out,
        image,
        base_image,
        profile,
        no_cache,
        source,
    } = args;
    let root = absolute(source.unwrap_or_else(workspace_root))?;
    if !root.join("Cargo.toml").is_file() {
        bail!(
            "{} has no Cargo.toml; pass the workspace with --source",
            root.display()
        );
    }
    let out = absolute(out.unwrap_or_else(|| workspace_root().join("dist")))?;
    let (docker, native) = connect().await?;
    let mut all = Vec::new();
    for arch in arches(arch, native)? {
        let tools = workspace_root();
        let builder_req = images::BuilderRequest {
            root: &tools,
            arch,
            native,
            explicit: image.as_deref(),
            base: &base_image,
            no_cache,
        };
        let builder = images::ensure_builder(&docker, &builder_req).await?;
        let req = BuildRequest {
            root: &root,
            out: &out,
            arch,
            image: &builder,
            profile,
        };
        all.extend(build(&docker, &req).await?);
    }
    print_summary(&all);
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    Release,
    Debug,
}

fn profile_name(p: Profile) -> &'static str {
    match p {
        Profile::Release => "release",
        Profile::Debug => "debug",
    }
}

/// One compiled binary, copied out.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub arch: Arch,
    pub file: Written,
}

/// Why a build did not produce artifacts. Interruption is told apart so the
/// process can exit with 130 like other tools stopped by Ctrl-C.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("interrupted; the build container was removed")]
    Interrupted,
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

pub struct BuildRequest<'a> {
    pub root: &'a Path,
    pub out: &'a Path,
    pub arch: Arch,
    pub image: &'a BuilderImage,
    pub profile: Profile,
}

/// Builds one architecture. The container is removed whatever happens,
/// including Ctrl-C, which is raced against the whole build.
pub async fn build(docker: &Docker, req: &BuildRequest<'_>) -> Result<Vec<Artifact>, BuildError> {
    let volumes = container::ensure_volumes(docker, req.arch).await?;
    let id = container::create(docker, req, &volumes).await?;
    let outcome = tokio::select! {
        r = run_in(docker, &id, req) => r.map_err(BuildError::Failed),
        _ = tokio::signal::ctrl_c() => Err(BuildError::Interrupted),
    };
    container::remove(docker, &id).await;
    outcome
}

fn cargo_args(profile: Profile) -> Vec<String> {
    let mut args: Vec<String> = [
        "cargo",
        "build",
        "--package",
        PACKAGE,
        "--bins",
        // Diagnostics stay human-readable on stderr; stdout carries JSON
        // that names the produced executables, so nothing is guessed.
        "--message-format=json-render-diagnostics",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if profile == Profile::Release {
        args.push("--release".into());
    }
    args
}

async fn run_in(docker: &Docker, id: &str, req: &BuildRequest<'_>) -> Result<Vec<Artifact>> {
    let phase = Phase::start(
        "compile",
        format!("sending the source tree ({})", req.root.display()),
    );
    match container::compile(docker, id, req, &phase).await {
        Ok((executables, summary)) => {
            phase.finish(summary);
            container::copy_out(docker, id, req, &executables).await
        }
        Err(e) => {
            phase.fail(format!("build for {} failed", req.arch.platform()));
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_flag_only_for_release() {
        assert!(cargo_args(Profile::Release).contains(&"--release".to_string()));
        assert!(!cargo_args(Profile::Debug).contains(&"--release".to_string()));
    }
}
