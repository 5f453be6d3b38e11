//! `image`: package the binaries from `build-linux` into the production image.

use std::path::PathBuf;

use anyhow::Result;

use crate::common::{ArchChoice, absolute, arches, connect, workspace_root};
use crate::images;

/// Options of `cargo xtask image`.
#[derive(clap::Args)]
pub struct Args {
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
}

pub async fn run(args: Args) -> Result<()> {
    let Args {
        arch,
        tag,
        dist,
        base_image,
        no_cache,
    } = args;
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
    let tags = images::build_production(&docker, native, &arches(arch, native)?, &opts).await?;
    for t in tags {
        println!("built {t}; run it with: docker run --rm -p 8194:8194 {t}");
    }
    Ok(())
}
