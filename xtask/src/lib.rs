//! Project automation: `cargo xtask <command>`.
//!
//! Kept as a library as well so the end-to-end test can reuse Docker engine
//! discovery when it prepares its builder image.

pub mod archive;
pub mod build_linux;
pub mod docker;
pub mod images;
pub mod progress;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use crate::build_linux::{BuildError, BuildRequest, Profile};
use crate::images::Arch;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Project automation for the sandbox")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ArchChoice {
    Amd64,
    Arm64,
    All,
}

#[derive(Subcommand)]
enum Command {
    /// Build the Linux binaries in a container (works from macOS), into dist/linux-<arch>/.
    BuildLinux {
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
    },
    /// Build the production image from docker/sandbox.Dockerfile and the binaries in dist/.
    Image {
        /// Architecture(s) to package; defaults to the Docker engine's own.
        #[arg(long, value_enum)]
        arch: Option<ArchChoice>,
        /// Image tag; with --arch all, "-<arch>" is appended.
        #[arg(long, default_value = "dify-sandbox:local")]
        tag: String,
        /// Directory holding linux-<arch>/sandbox from build-linux.
        #[arg(long, value_name = "DIR")]
        dist: Option<PathBuf>,
        /// Base of docker/sandbox.Dockerfile (its BASE_IMAGE build argument).
        #[arg(long, default_value = images::DEFAULT_RUNTIME_IMAGE)]
        base_image: String,
        #[arg(long)]
        no_cache: bool,
    },
}

/// Entry point of the `xtask` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(BuildError::Interrupted) = e.downcast_ref::<BuildError>() {
                eprintln!("error: {e}");
                return ExitCode::from(130);
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: xtask lives one level below it.
fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn absolute(p: PathBuf) -> Result<PathBuf> {
    std::path::absolute(&p).with_context(|| format!("cannot resolve {}", p.display()))
}

async fn connect() -> Result<(bollard::Docker, Option<Arch>)> {
    let connected = docker::Discovery::from_process().connect().await?;
    // An engine configured explicitly but not answering deserves a word,
    // since another one is used instead.
    for skipped in &connected.skipped {
        let c = &skipped.candidate;
        if c.origin == "DOCKER_HOST" || c.origin.starts_with("context") {
            let host = if c.host.is_empty() {
                String::new()
            } else {
                format!(" {}", c.host)
            };
            eprintln!("note: skipped {}{host}: {}", c.origin, skipped.reason);
        }
    }
    let native = images::engine_arch(&connected.docker).await?;
    let c = &connected.candidate;
    eprintln!("==> engine: {} {}", c.origin, c.host);
    Ok((connected.docker, native))
}

fn arches(choice: Option<ArchChoice>, native: Option<Arch>) -> Result<Vec<Arch>> {
    Ok(match choice {
        Some(ArchChoice::Amd64) => vec![Arch::Amd64],
        Some(ArchChoice::Arm64) => vec![Arch::Arm64],
        Some(ArchChoice::All) => vec![Arch::Amd64, Arch::Arm64],
        None => {
            vec![native.context(
                "the engine runs on an architecture other than amd64/arm64; pass --arch",
            )?]
        }
    })
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::BuildLinux {
            arch,
            out,
            image,
            base_image,
            profile,
            no_cache,
            source,
        } => {
            let root = absolute(source.unwrap_or_else(workspace_root))?;
            if !root.join("Cargo.toml").is_file() {
                anyhow::bail!(
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
                all.extend(build_linux::build(&docker, &req).await?);
            }
            build_linux::print_summary(&all);
            Ok(())
        }
        Command::Image {
            arch,
            tag,
            dist,
            base_image,
            no_cache,
        } => {
            let root = workspace_root();
            let dist = absolute(dist.unwrap_or_else(|| root.join("dist")))?;
            let (docker, native) = connect().await?;
            let opts = images::ProductionImage {
                root: &root,
                dist: &dist,
                tag: &tag,
                base: &base_image,
                no_cache,
            };
            let tags =
                images::build_production(&docker, native, &arches(arch, native)?, &opts).await?;
            for t in tags {
                println!("built {t}; run it with: docker run --rm -p 8194:8194 {t}");
            }
            Ok(())
        }
    }
}
