//! Project automation: `cargo xtask <command>`.
//!
//! Kept as a library as well so the end-to-end test can reuse Docker engine
//! discovery when it prepares its builder image.

pub mod archive;
pub mod build_linux;
mod common;
/// Finding the Docker engine (shared with `sandbox --engine docker`).
pub use docker_find as docker;
pub mod image;
pub mod images;
pub mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::build_linux::BuildError;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Project automation for the sandbox")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the Linux binaries in a container (works from macOS), into dist/linux-<arch>/.
    BuildLinux(build_linux::Args),
    /// Build the production image from docker/sandbox.Dockerfile and the binaries in dist/.
    Image(image::Args),
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
    let result = runtime.block_on(async {
        match cli.command {
            Command::BuildLinux(args) => build_linux::run(args).await,
            Command::Image(args) => image::run(args).await,
        }
    });
    match result {
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
