//! What both subcommands need: the workspace paths, the engine connection
//! and the `--arch` choice.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::ValueEnum;

use crate::docker;
use crate::images::{self, Arch};

/// `--arch`: one architecture, or both.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArchChoice {
    Amd64,
    Arm64,
    All,
}

/// The workspace root: xtask lives one level below it.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

pub fn absolute(p: PathBuf) -> Result<PathBuf> {
    std::path::absolute(&p).with_context(|| format!("cannot resolve {}", p.display()))
}

/// Connects to the first engine that answers and reads its architecture.
pub async fn connect() -> Result<(bollard::Docker, Option<Arch>)> {
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

/// The architectures `--arch` names; without it, the engine's own.
pub fn arches(choice: Option<ArchChoice>, native: Option<Arch>) -> Result<Vec<Arch>> {
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
