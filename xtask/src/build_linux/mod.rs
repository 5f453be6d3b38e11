//! `build-linux`: compile the sandbox for Linux inside a container.
//!
//! The source goes in as a tar upload rather than a bind mount: bind mounts
//! from a Mac go through the VM's file sharing (slow for cargo's many small
//! reads), do not exist at all with a remote `DOCKER_HOST`, and would let the
//! container write root-owned files into the checkout. The registry cache and
//! the target directory live in named volumes per architecture, so a second
//! build only recompiles what changed.
//!
//! By default the binaries are portable: the musl targets with libseccomp linked
//! statically, so they have no program interpreter and no shared library to find
//! and start on any Linux of their architecture (old glibc, Alpine, distroless).
//! Both architectures are compiled in one builder image of the engine's own
//! architecture, the other one cross-compiled. `--libc gnu` gives the former
//! glibc build (dynamic glibc and libseccomp.so.2), compiled in a builder of the
//! target architecture, emulated if it is not the engine's.

mod container;
mod output;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
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
    /// C library: musl gives static binaries that run on any Linux (default);
    /// gnu links glibc and libseccomp.so.2 dynamically, into <OUT>/linux-<arch>-gnu/.
    #[arg(long, value_enum, default_value = "musl")]
    libc: Libc,
    /// Output directory; binaries land in <OUT>/linux-<arch>/ (musl) or
    /// <OUT>/linux-<arch>-gnu/ (glibc).
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
        libc,
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
        let target = Target { arch, libc };
        let builder_arch = target.builder_arch(native)?;
        let tools = workspace_root();
        let builder_req = images::BuilderRequest {
            root: &tools,
            arch: builder_arch,
            native,
            explicit: image.as_deref(),
            base: &base_image,
            no_cache,
        };
        let builder = images::ensure_builder(&docker, &builder_req).await?;
        let req = BuildRequest {
            root: &root,
            out: &out,
            target,
            builder_arch,
            image: &builder,
            profile,
        };
        all.extend(build(&docker, &req).await?);
    }
    print_summary(&all);
    Ok(())
}

/// The C library the binaries are built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Libc {
    /// Static: musl and libseccomp linked in, no dynamic dependency.
    Musl,
    /// Dynamic glibc and libseccomp.so.2 (glibc 2.34 or newer on the host).
    Gnu,
}

/// What one build produces: an architecture and a C library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub arch: Arch,
    pub libc: Libc,
}

impl Target {
    /// Rust's target triple; `None` for the glibc build, which uses the
    /// builder's own (native) target so its paths stay as they were.
    pub fn triple(self) -> Option<&'static str> {
        match (self.libc, self.arch) {
            (Libc::Gnu, _) => None,
            (Libc::Musl, Arch::Amd64) => Some("x86_64-unknown-linux-musl"),
            (Libc::Musl, Arch::Arm64) => Some("aarch64-unknown-linux-musl"),
        }
    }

    /// Where the binaries go below the output directory.
    pub fn dir_name(self) -> String {
        match self.libc {
            Libc::Musl => format!("linux-{}", self.arch.name()),
            Libc::Gnu => format!("linux-{}-gnu", self.arch.name()),
        }
    }

    /// The builder's architecture: musl cross-compiles from the engine's own,
    /// glibc compiles in a builder of the target's.
    pub fn builder_arch(self, native: Option<Arch>) -> Result<Arch> {
        match self.libc {
            Libc::Gnu => Ok(self.arch),
            Libc::Musl => native.context(
                "the engine runs on an architecture other than amd64/arm64, so no builder \
                 can run natively; use an amd64 or arm64 engine",
            ),
        }
    }

    /// Environment of cargo in the builder for this target: libseccomp from
    /// the builder's static musl build (docker/builder.Dockerfile).
    fn env(self) -> Vec<String> {
        match self.triple() {
            None => Vec::new(),
            Some(triple) => vec![
                "LIBSECCOMP_LINK_TYPE=static".to_string(),
                format!("LIBSECCOMP_LIB_PATH=/opt/musl/{triple}/lib"),
            ],
        }
    }
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
    pub target: Target,
    pub file: Written,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.libc {
            Libc::Musl => write!(f, "{} (musl, static)", self.arch.platform()),
            Libc::Gnu => write!(f, "{} (glibc)", self.arch.platform()),
        }
    }
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
    pub target: Target,
    /// Architecture of the builder container.
    pub builder_arch: Arch,
    pub image: &'a BuilderImage,
    pub profile: Profile,
}

/// Builds one architecture. The container is removed whatever happens,
/// including Ctrl-C, which is raced against the whole build.
pub async fn build(docker: &Docker, req: &BuildRequest<'_>) -> Result<Vec<Artifact>, BuildError> {
    let volumes = container::ensure_volumes(docker, req.builder_arch).await?;
    let id = container::create(docker, req, &volumes).await?;
    let outcome = tokio::select! {
        r = run_in(docker, &id, req) => r.map_err(BuildError::Failed),
        _ = tokio::signal::ctrl_c() => Err(BuildError::Interrupted),
    };
    container::remove(docker, &id).await;
    outcome
}

fn cargo_args(profile: Profile, target: Target) -> Vec<String> {
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
    if let Some(triple) = target.triple() {
        args.extend(["--target".to_string(), triple.to_string()]);
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
            phase.fail(format!("build for {} failed", req.target));
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MUSL_ARM64: Target = Target {
        arch: Arch::Arm64,
        libc: Libc::Musl,
    };
    const GNU_AMD64: Target = Target {
        arch: Arch::Amd64,
        libc: Libc::Gnu,
    };

    #[test]
    fn release_flag_only_for_release() {
        assert!(cargo_args(Profile::Release, GNU_AMD64).contains(&"--release".to_string()));
        assert!(!cargo_args(Profile::Debug, GNU_AMD64).contains(&"--release".to_string()));
    }

    #[test]
    fn musl_is_cross_compiled_with_static_libseccomp() {
        let args = cargo_args(Profile::Release, MUSL_ARM64);
        assert!(args.ends_with(&["--target".into(), "aarch64-unknown-linux-musl".into()]));
        assert_eq!(MUSL_ARM64.dir_name(), "linux-arm64");
        assert_eq!(
            MUSL_ARM64.builder_arch(Some(Arch::Amd64)).unwrap(),
            Arch::Amd64
        );
        assert!(
            MUSL_ARM64
                .env()
                .contains(&"LIBSECCOMP_LIB_PATH=/opt/musl/aarch64-unknown-linux-musl/lib".into())
        );
        assert!(
            MUSL_ARM64
                .env()
                .contains(&"LIBSECCOMP_LINK_TYPE=static".into())
        );
    }

    #[test]
    fn glibc_keeps_the_native_target_and_its_own_directory() {
        assert!(!cargo_args(Profile::Release, GNU_AMD64).contains(&"--target".to_string()));
        assert!(GNU_AMD64.env().is_empty());
        assert_eq!(GNU_AMD64.dir_name(), "linux-amd64-gnu");
        let gnu_arm64 = Target {
            arch: Arch::Arm64,
            libc: Libc::Gnu,
        };
        assert_eq!(
            gnu_arm64.builder_arch(Some(Arch::Amd64)).unwrap(),
            Arch::Arm64
        );
    }
}
