//! `build-linux`: compile the sandbox for Linux inside a container.
//!
//! The source goes in as a tar upload rather than a bind mount: bind mounts
//! from a Mac go through the VM's file sharing (slow for cargo's many small
//! reads), do not exist at all with a remote `DOCKER_HOST`, and would let the
//! container write root-owned files into the checkout. The registry cache and
//! the target directory live in named volumes per architecture, so a second
//! build only recompiles what changed.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, UploadToContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures_util::StreamExt;

use crate::archive::{self, Written};
use crate::common::{ArchChoice, absolute, arches, connect, workspace_root};
use crate::images::{self, Arch, BuilderImage, LABEL};
use crate::progress::Phase;

/// Where the source tree is unpacked inside the container.
const SRC_DIR: &str = "/src";
/// Mount point of the per-arch target volume.
const TARGET_DIR: &str = "/cache/target";
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
    let volumes = ensure_volumes(docker, req.arch).await?;
    let id = create_container(docker, req, &volumes).await?;
    let outcome = tokio::select! {
        r = run_in(docker, &id, req) => r.map_err(BuildError::Failed),
        _ = tokio::signal::ctrl_c() => Err(BuildError::Interrupted),
    };
    let removed = docker
        .remove_container(
            &id,
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await;
    if let Err(e) = removed {
        eprintln!(
            "warning: could not remove build container {}: {e}; remove it with `docker rm -f {}`",
            short(&id),
            short(&id)
        );
    }
    outcome
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

struct Volumes {
    registry: String,
    git: String,
    target: String,
}

async fn ensure_volumes(docker: &Docker, arch: Arch) -> Result<Volumes> {
    let v = Volumes {
        registry: format!("sandbox-build-{}-cargo-registry", arch.name()),
        git: format!("sandbox-build-{}-cargo-git", arch.name()),
        target: format!("sandbox-build-{}-target", arch.name()),
    };
    for name in [&v.registry, &v.git, &v.target] {
        // Creating an existing volume is a no-op that returns it.
        docker
            .create_volume(VolumeCreateRequest {
                name: Some(name.clone()),
                labels: Some(HashMap::from([(LABEL.to_string(), "cache".to_string())])),
                ..Default::default()
            })
            .await
            .with_context(|| format!("cannot create volume {name}"))?;
    }
    Ok(v)
}

fn volume(source: &str, target: String) -> Mount {
    Mount {
        source: Some(source.to_string()),
        target: Some(target),
        typ: Some(MountType::VOLUME),
        ..Default::default()
    }
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

async fn create_container(docker: &Docker, req: &BuildRequest<'_>, v: &Volumes) -> Result<String> {
    let home = &req.image.cargo_home;
    let mut env = vec![format!("CARGO_TARGET_DIR={TARGET_DIR}")];
    if std::io::stderr().is_terminal() {
        env.push("CARGO_TERM_COLOR=always".into());
    }
    let body = ContainerCreateBody {
        image: Some(req.image.name.clone()),
        cmd: Some(cargo_args(req.profile)),
        // Clear any entrypoint so `cargo` runs as given, whatever the image.
        entrypoint: Some(vec![]),
        working_dir: Some(SRC_DIR.into()),
        env: Some(env),
        labels: Some(HashMap::from([(LABEL.to_string(), "build".to_string())])),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(false),
        host_config: Some(HostConfig {
            mounts: Some(vec![
                volume(&v.registry, format!("{home}/registry")),
                volume(&v.git, format!("{home}/git")),
                volume(&v.target, TARGET_DIR.into()),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let options = CreateContainerOptionsBuilder::default()
        .platform(&req.arch.platform())
        .build();
    let created = docker
        .create_container(Some(options), body)
        .await
        .with_context(|| format!("cannot create a build container from {}", req.image.name))?;
    Ok(created.id)
}

async fn run_in(docker: &Docker, id: &str, req: &BuildRequest<'_>) -> Result<Vec<Artifact>> {
    let phase = Phase::start(
        "compile",
        format!("sending the source tree ({})", req.root.display()),
    );
    match compile(docker, id, req, &phase).await {
        Ok((executables, summary)) => {
            phase.finish(summary);
            copy_out(docker, id, req, &executables).await
        }
        Err(e) => {
            phase.fail(format!("build for {} failed", req.arch.platform()));
            Err(e)
        }
    }
}

/// Uploads the source, runs cargo, streams its output; returns the paths of
/// the executables inside the container.
async fn compile(
    docker: &Docker,
    id: &str,
    req: &BuildRequest<'_>,
    phase: &Phase,
) -> Result<(Vec<String>, String)> {
    let root = req.root.to_path_buf();
    let (tar, files) = tokio::task::spawn_blocking(move || archive::source_tar(&root, "src"))
        .await
        .context("the source archiving task panicked")??;
    phase.set_message(format!(
        "uploading {files} files ({})",
        crate::progress::human_size(tar.len() as u64)
    ));
    docker
        .upload_to_container(
            id,
            Some(UploadToContainerOptionsBuilder::default().path("/").build()),
            bollard::body_full(tar.into()),
        )
        .await
        .context("cannot upload the source tree into the build container")?;

    docker
        .start_container(id, None)
        .await
        .context("cannot start the build container")?;
    phase.set_message(format!("cargo build for {}", req.arch.platform()));

    // `logs` with follow replays from the container's start, so nothing
    // printed before this request is lost, and ends when cargo exits.
    let mut logs = docker.logs(
        id,
        Some(
            LogsOptionsBuilder::default()
                .follow(true)
                .stdout(true)
                .stderr(true)
                .build(),
        ),
    );
    let mut out = LineBuffer::default();
    let mut err = LineBuffer::default();
    let mut executables = Vec::new();
    let mut compiled = 0usize;
    let mut fresh = 0usize;
    let mut on_stdout = |line: &str, phase: &Phase| match parse_message(line) {
        Some(Message::Artifact {
            executable,
            fresh: was_fresh,
        }) => {
            if was_fresh {
                fresh += 1;
            } else {
                compiled += 1;
            }
            executables.extend(executable);
        }
        Some(Message::Other) => {}
        // Build scripts may print to stdout; keep it visible.
        None => phase.println(line),
    };
    let on_stderr = |line: &str, phase: &Phase| {
        let plain = strip_ansi(line);
        let trimmed = plain.trim_start();
        if trimmed.starts_with("Compiling ") {
            phase.set_message(trimmed.to_string());
        }
        phase.println(line);
    };
    while let Some(item) = logs.next().await {
        match item.context("lost the build container's output stream")? {
            LogOutput::StdOut { message } => {
                for line in out.push(&message) {
                    on_stdout(&line, phase);
                }
            }
            LogOutput::StdErr { message } | LogOutput::Console { message } => {
                for line in err.push(&message) {
                    on_stderr(&line, phase);
                }
            }
            LogOutput::StdIn { .. } => {}
        }
    }
    if let Some(line) = out.finish() {
        on_stdout(&line, phase);
    }
    if let Some(line) = err.finish() {
        on_stderr(&line, phase);
    }

    let code = wait_exit_code(docker, id).await?;
    if code != 0 {
        bail!(
            "cargo build for {} exited with status {code}; the compiler output above says why",
            req.arch.platform()
        );
    }
    if executables.is_empty() {
        bail!("cargo reported no executables for package `{PACKAGE}`; does it define a binary?");
    }
    Ok((
        executables,
        format!(
            "{} for {}: {compiled} crates compiled, {fresh} up to date",
            profile_name(req.profile),
            req.arch.platform()
        ),
    ))
}

fn profile_name(p: Profile) -> &'static str {
    match p {
        Profile::Release => "release",
        Profile::Debug => "debug",
    }
}

async fn wait_exit_code(docker: &Docker, id: &str) -> Result<i64> {
    let mut wait = docker.wait_container(
        id,
        Some(
            WaitContainerOptionsBuilder::default()
                .condition("not-running")
                .build(),
        ),
    );
    match wait.next().await {
        Some(Ok(r)) => Ok(r.status_code),
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
        Some(Err(e)) => Err(e).context("cannot read the build container's exit status"),
        None => Err(anyhow!(
            "the engine closed the wait request without an exit status"
        )),
    }
}

/// Copies each executable out of the (stopped) container via the archive
/// endpoint into `<out>/linux-<arch>/`, handing it to the invoking user.
async fn copy_out(
    docker: &Docker,
    id: &str,
    req: &BuildRequest<'_>,
    executables: &[String],
) -> Result<Vec<Artifact>> {
    let phase = Phase::start("copy", format!("{} artifact(s)", executables.len()));
    let result = async {
        let dir = req.out.join(format!("linux-{}", req.arch.name()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let owner = invoking_user();
        if let Some(owner) = owner {
            chown(req.out, owner)?;
            chown(&dir, owner)?;
        }
        let mut artifacts = Vec::new();
        for exe in executables {
            let name = Path::new(exe)
                .file_name()
                .with_context(|| format!("cargo reported an odd executable path {exe}"))?;
            phase.set_message(format!("downloading {exe}"));
            let mut stream = docker.download_from_container(
                id,
                Some(
                    DownloadFromContainerOptionsBuilder::default()
                        .path(exe)
                        .build(),
                ),
            );
            let mut tar = Vec::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk
                    .with_context(|| format!("cannot download {exe} from the build container"))?;
                tar.extend_from_slice(&chunk);
            }
            let dest = dir.join(name);
            let written = archive::extract_single_file(&tar, &dest)?;
            if let Some(owner) = owner {
                chown(&dest, owner)?;
            }
            artifacts.push(Artifact {
                arch: req.arch,
                file: written,
            });
        }
        write_checksums(&dir, &artifacts, owner)?;
        Ok(artifacts)
    }
    .await;
    match &result {
        Ok(a) => phase.finish(format!("{} file(s) in {}", a.len(), req.out.display())),
        Err(_) => phase.fail("copying the artifacts failed"),
    }
    result
}

/// `SHA256SUMS` next to the binaries, in the format `sha256sum -c` reads.
fn write_checksums(dir: &Path, artifacts: &[Artifact], owner: Option<(u32, u32)>) -> Result<()> {
    let mut text = String::new();
    for a in artifacts {
        let name = a
            .file
            .path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        text.push_str(&format!("{}  {name}\n", a.file.sha256));
    }
    let path = dir.join("SHA256SUMS");
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    if let Some(owner) = owner {
        chown(&path, owner)?;
    }
    Ok(())
}

/// The user behind `sudo`, whose files these are. Without sudo the files
/// already belong to the invoking user.
fn invoking_user() -> Option<(u32, u32)> {
    let uid = std::env::var("SUDO_UID").ok()?.parse().ok()?;
    let gid = std::env::var("SUDO_GID").ok()?.parse().ok()?;
    Some((uid, gid))
}

fn chown(path: &Path, (uid, gid): (u32, u32)) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).with_context(|| {
        format!(
            "cannot give {} to uid {uid} (SUDO_UID); fix it with `sudo chown -R {uid}:{gid} {}`",
            path.display(),
            path.display()
        )
    })
}

enum Message {
    /// A `compiler-artifact`; `executable` is set for binaries.
    Artifact {
        executable: Option<String>,
        fresh: bool,
    },
    /// Any other cargo JSON message.
    Other,
}

/// Reads one line of cargo's JSON output; `None` if it is not JSON.
fn parse_message(line: &str) -> Option<Message> {
    if !line.starts_with('{') {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("reason").and_then(|r| r.as_str()) != Some("compiler-artifact") {
        return Some(Message::Other);
    }
    let is_bin = v
        .pointer("/target/kind")
        .and_then(|k| k.as_array())
        .is_some_and(|kinds| kinds.iter().any(|k| k.as_str() == Some("bin")));
    let executable = v
        .get("executable")
        .and_then(|e| e.as_str())
        .filter(|_| is_bin)
        .map(str::to_string);
    let fresh = v.get("fresh").and_then(|f| f.as_bool()).unwrap_or(false);
    Some(Message::Artifact { executable, fresh })
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI sequences end with a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits a byte stream into lines; frames from the engine may cut lines.
#[derive(Default)]
struct LineBuffer(Vec<u8>);

impl LineBuffer {
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.0.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(pos) = self.0.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.0.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line);
            lines.push(text.trim_end_matches(['\n', '\r']).to_string());
        }
        lines
    }

    fn finish(&mut self) -> Option<String> {
        if self.0.is_empty() {
            return None;
        }
        let text = String::from_utf8_lossy(&self.0).into_owned();
        self.0.clear();
        Some(text)
    }
}

/// Prints where each artifact went, its size and sha256.
pub fn print_summary(artifacts: &[Artifact]) {
    println!("Artifacts:");
    for a in artifacts {
        println!(
            "  {:<12} {}  {:>10}  sha256 {}",
            a.arch.platform(),
            display_path(&a.file.path).display(),
            crate::progress::human_size(a.file.size),
            a.file.sha256
        );
    }
}

/// Relative to the current directory when that is shorter to read.
fn display_path(p: &Path) -> PathBuf {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| p.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_from_cargo_json() {
        let exe = |line: &str| match parse_message(line) {
            Some(Message::Artifact { executable, .. }) => executable,
            _ => None,
        };
        let bin = r#"{"reason":"compiler-artifact","package_id":"path+file:///src#sandbox@0.1.0","target":{"kind":["bin"],"name":"sandbox"},"executable":"/cache/target/debug/sandbox","fresh":false}"#;
        assert_eq!(exe(bin).as_deref(), Some("/cache/target/debug/sandbox"));
        let lib = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"x"},"executable":null,"fresh":true}"#;
        assert_eq!(exe(lib), None);
        assert!(matches!(
            parse_message(lib),
            Some(Message::Artifact { fresh: true, .. })
        ));
        assert!(matches!(
            parse_message(r#"{"reason":"build-finished","success":true}"#),
            Some(Message::Other)
        ));
        assert!(parse_message("   Compiling x").is_none());
    }

    #[test]
    fn lines_split_across_frames() {
        let mut b = LineBuffer::default();
        assert!(b.push(b"Compil").is_empty());
        assert_eq!(
            b.push(b"ing a\nCompiling b\r\nFin"),
            ["Compiling a", "Compiling b"]
        );
        assert_eq!(b.finish().as_deref(), Some("Fin"));
        assert_eq!(b.finish(), None);
    }

    #[test]
    fn ansi_is_stripped_for_the_spinner() {
        assert_eq!(
            strip_ansi("\u{1b}[1m\u{1b}[32m   Compiling\u{1b}[0m foo"),
            "   Compiling foo"
        );
    }

    #[test]
    fn release_flag_only_for_release() {
        assert!(cargo_args(Profile::Release).contains(&"--release".to_string()));
        assert!(!cargo_args(Profile::Debug).contains(&"--release".to_string()));
    }
}
