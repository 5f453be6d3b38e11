//! The build container: its cache volumes, creating it, feeding it the
//! source, following cargo to the end, copying the binaries out and
//! removing it.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, UploadToContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures_util::StreamExt;

use super::output::CargoOutput;
use super::{Artifact, BuildRequest, PACKAGE, cargo_args, profile_name};
use crate::archive;
use crate::images::{Arch, LABEL};

use crate::progress::Phase;

/// Where the source tree is unpacked inside the container.
const SRC_DIR: &str = "/src";
/// Mount point of the per-arch target volume.
const TARGET_DIR: &str = "/cache/target";

pub(super) struct Volumes {
    registry: String,
    git: String,
    target: String,
}

pub(super) async fn ensure_volumes(docker: &Docker, arch: Arch) -> Result<Volumes> {
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

/// Creates the container that runs cargo; returns its id.
pub(super) async fn create(docker: &Docker, req: &BuildRequest<'_>, v: &Volumes) -> Result<String> {
    let home = &req.image.cargo_home;
    let mut env = vec![format!("CARGO_TARGET_DIR={TARGET_DIR}")];
    env.extend(req.target.env());
    if std::io::stderr().is_terminal() {
        env.push("CARGO_TERM_COLOR=always".into());
    }
    let body = ContainerCreateBody {
        image: Some(req.image.name.clone()),
        cmd: Some(cargo_args(req.profile, req.target)),
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
        .platform(&req.builder_arch.platform())
        .build();
    let created = docker
        .create_container(Some(options), body)
        .await
        .with_context(|| format!("cannot create a build container from {}", req.image.name))?;
    Ok(created.id)
}

/// Force-removes the container; a failure only warns, since the build's
/// own outcome is what the user needs to see.
pub(super) async fn remove(docker: &Docker, id: &str) {
    let removed = docker
        .remove_container(
            id,
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await;
    if let Err(e) = removed {
        eprintln!(
            "warning: could not remove build container {}: {e}; remove it with `docker rm -f {}`",
            short(id),
            short(id)
        );
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Uploads the source, runs cargo, streams its output; returns the paths of
/// the executables inside the container.
pub(super) async fn compile(
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
    phase.set_message(format!("cargo build for {}", req.target));

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
    let mut output = CargoOutput::new(phase);
    while let Some(item) = logs.next().await {
        match item.context("lost the build container's output stream")? {
            LogOutput::StdOut { message } => output.stdout(&message),
            LogOutput::StdErr { message } | LogOutput::Console { message } => {
                output.stderr(&message)
            }
            LogOutput::StdIn { .. } => {}
        }
    }
    output.finish();

    let code = wait_exit_code(docker, id).await?;
    if code != 0 {
        bail!(
            "cargo build for {} exited with status {code}; the compiler output above says why",
            req.target
        );
    }
    if output.executables.is_empty() {
        bail!("cargo reported no executables for package `{PACKAGE}`; does it define a binary?");
    }
    let summary = format!(
        "{} for {}: {} crates compiled, {} up to date",
        profile_name(req.profile),
        req.target,
        output.compiled,
        output.fresh
    );
    Ok((output.executables, summary))
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
pub(super) async fn copy_out(
    docker: &Docker,
    id: &str,
    req: &BuildRequest<'_>,
    executables: &[String],
) -> Result<Vec<Artifact>> {
    let phase = Phase::start("copy", format!("{} artifact(s)", executables.len()));
    let result = async {
        let dir = req.out.join(req.target.dir_name());
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
                target: req.target,
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
