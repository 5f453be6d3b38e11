//! Images: pulling bases only when missing, building the builder image and
//! the production image through the engine API.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use bollard::Docker;
use bollard::query_parameters::{BuildImageOptionsBuilder, CreateImageOptionsBuilder};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::archive::{ContextFile, context_tar};
use crate::progress::Phase;

/// Default base of the builder image; override with `--base-image`.
pub const DEFAULT_RUST_IMAGE: &str = "rust:1-bookworm";
/// Default base of the production image.
pub const DEFAULT_RUNTIME_IMAGE: &str = "debian:bookworm-slim";
const BUILDER_DOCKERFILE: &str = "docker/builder.Dockerfile";
const SANDBOX_DOCKERFILE: &str = "docker/sandbox.Dockerfile";
/// Label set on everything this tool creates, so it can be found and cleaned up.
pub const LABEL: &str = "dev.sandbox.xtask";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    pub fn platform(self) -> String {
        format!("linux/{}", self.name())
    }

    /// Parses the engine's or an image's architecture (Go's GOARCH names,
    /// with the kernel's spellings accepted too).
    pub fn from_engine(arch: &str) -> Option<Arch> {
        match arch {
            "amd64" | "x86_64" => Some(Arch::Amd64),
            "arm64" | "aarch64" => Some(Arch::Arm64),
            _ => None,
        }
    }
}

/// The engine's native architecture; building for it needs no emulation.
pub async fn engine_arch(docker: &Docker) -> Result<Option<Arch>> {
    let version = docker
        .version()
        .await
        .context("the engine did not answer GET /version")?;
    Ok(version.arch.as_deref().and_then(Arch::from_engine))
}

/// Architecture of a local image, `None` if the image is not present.
pub async fn local_image_arch(docker: &Docker, image: &str) -> Result<Option<String>> {
    match docker.inspect_image(image).await {
        Ok(info) => Ok(Some(info.architecture.unwrap_or_default())),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot inspect image {image}")),
    }
}

/// Makes sure `image` exists locally for `arch`, pulling it only if it is
/// missing (or present for another architecture).
pub async fn ensure_present(docker: &Docker, image: &str, arch: Arch, phase: &Phase) -> Result<()> {
    if let Some(have) = local_image_arch(docker, image).await? {
        if Arch::from_engine(&have) == Some(arch) {
            return Ok(());
        }
        phase.println(format!(
            "{image} is present for {have}, pulling the {} variant",
            arch.name()
        ));
    }
    phase.set_message(format!("pulling {image} for {}", arch.platform()));
    let options = CreateImageOptionsBuilder::default()
        .from_image(image)
        .platform(&arch.platform())
        .build();
    let mut stream = docker.create_image(Some(options), None, None);
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(status) = info.status {
                    let id = info.id.map(|i| format!("{i}: ")).unwrap_or_default();
                    phase.set_message(format!("pulling {image}: {id}{status}"));
                }
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot pull {image} for {}; check the network and registry login \
                         (docker login), or pass an image that is already present with --image",
                        arch.platform()
                    )
                });
            }
        }
    }
    Ok(())
}

/// One image build from an in-memory context.
pub struct BuildSpec<'a> {
    pub context: Vec<u8>,
    pub tag: &'a str,
    pub dockerfile: &'a str,
    pub args: HashMap<&'a str, String>,
    pub labels: HashMap<&'a str, String>,
    /// Only set for a foreign architecture, so a native build never depends
    /// on the engine's multi-platform support.
    pub platform: Option<String>,
    pub no_cache: bool,
}

/// Runs a classic (non-BuildKit) build from an in-memory context, printing
/// the build's output above the spinner. The classic builder is used because
/// every engine serves it over plain `POST /build`, with no session protocol.
pub async fn build(docker: &Docker, spec: BuildSpec<'_>, phase: &Phase) -> Result<()> {
    let BuildSpec {
        context,
        tag,
        dockerfile,
        args,
        labels,
        platform,
        no_cache,
    } = spec;
    let mut options = BuildImageOptionsBuilder::default()
        .dockerfile(dockerfile)
        .t(tag)
        .rm(true)
        .forcerm(true)
        .nocache(no_cache)
        .buildargs(&args)
        .labels(&labels);
    if let Some(platform) = &platform {
        options = options.platform(platform);
    }
    let mut stream = docker.build_image(
        options.build(),
        None,
        Some(bollard::body_full(context.into())),
    );
    let mut tail = String::new();
    while let Some(item) = stream.next().await {
        let info = item.with_context(|| format!("building image {tag} failed"))?;
        if let Some(detail) = info.error_detail {
            bail!(
                "building image {tag} failed: {}",
                detail.message.unwrap_or_default()
            );
        }
        if let Some(text) = info.stream {
            tail.push_str(&text);
            while let Some(pos) = tail.find('\n') {
                let line: String = tail.drain(..=pos).collect();
                let line = line.trim_end();
                if let Some(step) = line.strip_prefix("Step ") {
                    phase.set_message(format!("step {step}"));
                }
                phase.println(line);
            }
        }
        if let Some(status) = info.status {
            phase.set_message(status);
        }
    }
    Ok(())
}

/// The builder image to compile in, and where cargo keeps its home there.
#[derive(Debug, Clone)]
pub struct BuilderImage {
    pub name: String,
    pub cargo_home: String,
}

/// What `ensure_builder` needs to know.
#[derive(Clone, Copy)]
pub struct BuilderRequest<'a> {
    /// Workspace holding `docker/builder.Dockerfile`.
    pub root: &'a Path,
    pub arch: Arch,
    /// The engine's own architecture.
    pub native: Option<Arch>,
    /// `--image`, if given.
    pub explicit: Option<&'a str>,
    /// `--base-image`.
    pub base: &'a str,
    pub no_cache: bool,
}

/// Uses `explicit` when given (pulling it only if missing), else builds the
/// project's builder image from `docker/builder.Dockerfile`. The tag carries
/// a hash of the Dockerfile and base, so an edit produces a fresh image while
/// an unchanged one is reused without asking the engine to rebuild.
pub async fn ensure_builder(docker: &Docker, req: &BuilderRequest<'_>) -> Result<BuilderImage> {
    let arch = req.arch;
    let phase = Phase::start("image", format!("builder image for {}", arch.platform()));
    let result = ensure_builder_inner(docker, req, &phase).await;
    match &result {
        Ok(image) => phase.finish(format!("{} for {}", image.name, arch.platform())),
        Err(_) => phase.fail(format!("no builder image for {}", arch.platform())),
    }
    result
}

async fn ensure_builder_inner(
    docker: &Docker,
    req: &BuilderRequest<'_>,
    phase: &Phase,
) -> Result<BuilderImage> {
    let BuilderRequest {
        root,
        arch,
        native,
        explicit,
        base,
        no_cache,
    } = *req;
    let name = match explicit {
        Some(image) => {
            ensure_present(docker, image, arch, phase).await?;
            image.to_string()
        }
        None => {
            let dockerfile_path = root.join(BUILDER_DOCKERFILE);
            let dockerfile = std::fs::read(&dockerfile_path)
                .with_context(|| format!("cannot read {}", dockerfile_path.display()))?;
            let mut hasher = Sha256::new();
            hasher.update(&dockerfile);
            hasher.update(base.as_bytes());
            let digest = crate::docker::hex(&hasher.finalize());
            let tag = format!("sandbox-builder:{}-{}", &digest[..12], arch.name());
            let present = local_image_arch(docker, &tag).await?;
            if present.is_none() || no_cache {
                ensure_present(docker, base, arch, phase).await?;
                phase.set_message(format!("building {tag}"));
                let spec = BuildSpec {
                    context: context_tar(&[("Dockerfile", ContextFile::Bytes(&dockerfile))])?,
                    tag: &tag,
                    dockerfile: "Dockerfile",
                    args: HashMap::from([("RUST_IMAGE", base.to_string())]),
                    labels: HashMap::from([(LABEL, "builder".to_string())]),
                    platform: (native != Some(arch)).then(|| arch.platform()),
                    no_cache,
                };
                build(docker, spec, phase).await?;
            }
            tag
        }
    };

    let info = docker
        .inspect_image(&name)
        .await
        .with_context(|| format!("cannot inspect image {name}"))?;
    let have = info.architecture.clone().unwrap_or_default();
    if Arch::from_engine(&have) != Some(arch) {
        bail!(
            "image {name} is built for {have:?}, not {}; pass an image for that \
             architecture with --image, or drop --image to build the project's builder image",
            arch.name()
        );
    }
    let env = info.config.and_then(|c| c.env).unwrap_or_default();
    Ok(BuilderImage {
        cargo_home: cargo_home(&env),
        name,
    })
}

/// `CARGO_HOME` of an image: its own setting (the official rust image uses
/// `/usr/local/cargo`), else cargo's default `$HOME/.cargo`.
pub fn cargo_home(env: &[String]) -> String {
    let get = |key: &str| {
        env.iter().find_map(|kv| {
            kv.strip_prefix(key)
                .and_then(|rest| rest.strip_prefix('='))
                .filter(|v| !v.is_empty())
        })
    };
    match get("CARGO_HOME") {
        Some(home) => home.trim_end_matches('/').to_string(),
        None => format!(
            "{}/.cargo",
            get("HOME").unwrap_or("/root").trim_end_matches('/')
        ),
    }
}

/// What goes into the production image and how it is tagged.
pub struct ProductionImage<'a> {
    pub root: &'a Path,
    pub dist: &'a Path,
    pub tag: &'a str,
    pub base: &'a str,
    pub no_cache: bool,
}

/// Builds the production image for each architecture from the binaries that
/// `build-linux` left in `dist/linux-<arch>/`.
pub async fn build_production(
    docker: &Docker,
    native: Option<Arch>,
    arches: &[Arch],
    opts: &ProductionImage<'_>,
) -> Result<Vec<String>> {
    let dockerfile_path = opts.root.join(SANDBOX_DOCKERFILE);
    let dockerfile = std::fs::read(&dockerfile_path)
        .with_context(|| format!("cannot read {}", dockerfile_path.display()))?;
    let config = opts.root.join("conf/config.yaml");
    if !config.is_file() {
        bail!(
            "{} is missing; the image ships it as /etc/sandbox/config.yaml",
            config.display()
        );
    }
    let dependencies = dependency_files(&opts.root.join("dependencies"))?;
    let mut tags = Vec::new();
    for &arch in arches {
        let binary = opts
            .dist
            .join(format!("linux-{}", arch.name()))
            .join("sandbox");
        if !binary.is_file() {
            bail!(
                "{} is missing; run `cargo xtask build-linux --arch {}` first",
                binary.display(),
                arch.name()
            );
        }
        let tag = if arches.len() > 1 {
            format!("{}-{}", opts.tag, arch.name())
        } else {
            opts.tag.to_string()
        };
        let phase = Phase::start("image", format!("{tag} for {}", arch.platform()));
        let result = async {
            ensure_present(docker, opts.base, arch, &phase).await?;
            let binary_in_context = format!("dist/linux-{}/sandbox", arch.name());
            // Same layout as the repository, so a plain `docker build -f
            // docker/sandbox.Dockerfile .` works too.
            let mut files = vec![
                (
                    "docker/sandbox.Dockerfile".to_string(),
                    ContextFile::Bytes(&dockerfile),
                ),
                (binary_in_context, ContextFile::Path(&binary)),
                ("conf/config.yaml".to_string(), ContextFile::Path(&config)),
            ];
            for (name, path) in &dependencies {
                files.push((name.clone(), ContextFile::Path(path)));
            }
            if dependencies.is_empty() {
                // The Dockerfile copies the directory; keep it present.
                files.push(("dependencies/.keep".to_string(), ContextFile::Bytes(b"")));
            }
            let context = context_tar(&files)?;
            let spec = BuildSpec {
                context,
                tag: &tag,
                dockerfile: "docker/sandbox.Dockerfile",
                // The classic builder does not set TARGETARCH itself.
                args: HashMap::from([
                    ("TARGETARCH", arch.name().to_string()),
                    ("BASE_IMAGE", opts.base.to_string()),
                ]),
                labels: HashMap::from([(LABEL, "sandbox".to_string())]),
                platform: (native != Some(arch)).then(|| arch.platform()),
                no_cache: opts.no_cache,
            };
            build(docker, spec, &phase).await
        }
        .await;
        match result {
            Ok(()) => phase.finish(format!("{tag} for {}", arch.platform())),
            Err(e) => {
                phase.fail(format!("{tag} failed"));
                return Err(e);
            }
        }
        tags.push(tag);
    }
    Ok(tags)
}

/// Regular files directly in `dependencies/` (pip requirement lists), as
/// (name in the build context, path on disk).
fn dependency_files(dir: &Path) -> Result<Vec<(String, std::path::PathBuf)>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            let name = format!("dependencies/{}", entry.file_name().to_string_lossy());
            files.push((name, entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_home_from_image_env() {
        let env = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            cargo_home(&env(&["PATH=/x", "CARGO_HOME=/usr/local/cargo"])),
            "/usr/local/cargo"
        );
        assert_eq!(cargo_home(&env(&["HOME=/home/b/"])), "/home/b/.cargo");
        assert_eq!(cargo_home(&env(&["CARGO_HOMEX=/no"])), "/root/.cargo");
    }

    #[test]
    fn arch_names() {
        assert_eq!(Arch::from_engine("aarch64"), Some(Arch::Arm64));
        assert_eq!(Arch::from_engine("amd64"), Some(Arch::Amd64));
        assert_eq!(Arch::from_engine("s390x"), None);
        assert_eq!(Arch::Arm64.platform(), "linux/arm64");
    }
}
