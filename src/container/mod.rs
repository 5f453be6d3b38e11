//! `--engine docker`: the same commands, carried out by a `sandbox` inside a container of
//! the local Docker engine, found the way `cargo xtask` finds it (`docker-find`). On a
//! Mac the jail cannot exist (no namespaces, no seccomp); there the engine's Linux VM
//! runs it. On Linux it is selectable (`--engine docker`, `SANDBOX_ENGINE=docker`).
//!
//! The container runs `image` (`SANDBOX_IMAGE`, default `dify-sandbox:local` from
//! `cargo xtask image`) with the Linux binary from `cargo xtask build-linux`
//! (`SANDBOX_LINUX_BINARY`, default `dist/linux-<arch>/sandbox` when present) bound over
//! the image's own. It gets what the server inside needs to build its jails at the
//! namespaces level (see `Engine::create`), not `--privileged`.

mod doctor;
mod run;
mod serve;

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures::StreamExt;

pub use doctor::execute as doctor;
pub use run::execute as run;
pub use serve::execute as serve;

/// Where the commands run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// On this host (Linux).
    Local,
    /// In a container of the local Docker engine.
    Docker,
}

impl EngineKind {
    /// The default where `--engine` and `SANDBOX_ENGINE` say nothing: the jail needs Linux.
    pub fn default_here() -> Self {
        if cfg!(target_os = "linux") {
            Self::Local
        } else {
            Self::Docker
        }
    }
}

/// The image the containers run.
pub const DEFAULT_IMAGE: &str = "dify-sandbox:local";
/// Where the Linux binary is bound in the container.
const BINARY_IN_CONTAINER: &str = "/usr/local/bin/sandbox";
const CAPABILITIES: [&str; 3] = ["SYS_ADMIN", "NET_ADMIN", "SYS_RAWIO"];
const SECURITY_OPTS: [&str; 2] = ["seccomp=unconfined", "apparmor=unconfined"];
/// Labels every container this module makes, so a leftover one can be found.
const LABEL: &str = "org.dify-sandbox.engine";

/// What a container is made from.
#[derive(Debug, Clone)]
struct Target {
    image: String,
    /// The Linux binary bound over the image's, when there is one.
    binary: Option<PathBuf>,
}

/// The engine's architecture as `build-linux` names it.
fn arch_name(engine_arch: &str) -> &str {
    match engine_arch {
        "x86_64" | "amd64" => "amd64",
        "aarch64" | "arm64" => "arm64",
        other => other,
    }
}

/// The engine, connected, and what its containers run.
struct Engine {
    docker: Docker,
    /// Where the engine was found, for messages.
    found_at: String,
    arch: String,
    target: Target,
}

impl Engine {
    async fn connect() -> Result<Self> {
        let connected = docker_find::Discovery::from_process()
            .connect()
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let docker = connected.docker;
        let version = docker
            .version()
            .await
            .context("the Docker engine does not say its version")?;
        let arch = arch_name(version.arch.as_deref().unwrap_or(std::env::consts::ARCH)).to_string();
        let image = std::env::var("SANDBOX_IMAGE")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_IMAGE.to_string());
        let binary = match std::env::var_os("SANDBOX_LINUX_BINARY").filter(|s| !s.is_empty()) {
            Some(path) => {
                let path = std::path::absolute(PathBuf::from(path))?;
                if !path.is_file() {
                    bail!(
                        "SANDBOX_LINUX_BINARY names {}, which is not a file: build it with `cargo xtask build-linux`",
                        path.display()
                    );
                }
                Some(path)
            }
            None => {
                let dist = std::path::absolute(format!("dist/linux-{arch}/sandbox"))?;
                dist.is_file().then_some(dist)
            }
        };
        Ok(Self {
            docker,
            found_at: format!(
                "{} ({})",
                connected.candidate.host, connected.candidate.origin
            ),
            arch,
            target: Target { image, binary },
        })
    }

    /// Fails, saying how to make it, when the image is not in the engine.
    async fn require_image(&self) -> Result<()> {
        match self.docker.inspect_image(&self.target.image).await {
            Ok(_) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => bail!(
                "the image {} is not in the Docker engine at {}: build it with `cargo xtask build-linux --arch {} && cargo xtask image --arch {}`, or name another with SANDBOX_IMAGE",
                self.target.image,
                self.found_at,
                self.arch,
                self.arch
            ),
            Err(e) => Err(e).context(format!("cannot inspect the image {}", self.target.image)),
        }
    }

    /// A container running `sandbox <args>`, not started. `binds` are `host:container[:ro]`.
    async fn create(
        &self,
        args: Vec<String>,
        binds: Vec<String>,
        env: Vec<String>,
        extra: impl FnOnce(&mut ContainerCreateBody),
    ) -> Result<String> {
        let mut binds = binds;
        if let Some(binary) = &self.target.binary {
            binds.push(format!("{}:{BINARY_IN_CONTAINER}:ro", binary.display()));
        }
        let mut body = ContainerCreateBody {
            image: Some(self.target.image.clone()),
            entrypoint: Some(vec![BINARY_IN_CONTAINER.to_string()]),
            cmd: Some(args),
            env: Some(env),
            labels: Some(HashMap::from([(LABEL.to_string(), "run".to_string())])),
            tty: Some(false),
            host_config: Some(HostConfig {
                binds: Some(binds),
                // The jail is built inside: namespaces and mounts (SYS_ADMIN), each run's
                // network (NET_ADMIN, a writable /proc/sys), the exec page below
                // mmap_min_addr (SYS_RAWIO); the engine's own seccomp and AppArmor
                // profiles refuse unshare and mount. Not --privileged: no host devices,
                // and engines in a restricted VM refuse it.
                cap_add: Some(CAPABILITIES.map(String::from).to_vec()),
                security_opt: Some(SECURITY_OPTS.map(String::from).to_vec()),
                // What the CLI's `--security-opt systempaths=unconfined` does.
                masked_paths: Some(Vec::new()),
                readonly_paths: Some(Vec::new()),
                ..Default::default()
            }),
            ..Default::default()
        };
        extra(&mut body);
        let options = CreateContainerOptionsBuilder::default()
            .platform(&format!("linux/{}", self.arch))
            .build();
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .with_context(|| format!("cannot create a container from {}", self.target.image))?;
        Ok(created.id)
    }

    async fn remove(&self, id: &str) {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        if let Err(e) = self.docker.remove_container(id, Some(options)).await {
            eprintln!(
                "sandbox: warning: could not remove container {}: {e}; remove it with `docker rm -f {}`",
                short(id),
                short(id)
            );
        }
    }

    async fn exit_code(&self, id: &str) -> Result<i64> {
        let options = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut wait = self.docker.wait_container(id, Some(options));
        match wait.next().await {
            Some(Ok(r)) => Ok(r.status_code),
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(e).context("cannot read the container's exit status"),
            None => Err(anyhow!("the engine closed the wait without an exit status")),
        }
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// The environment a container's `sandbox` gets from ours: its own settings (what the
/// configuration's environment overrides read), nothing else of this shell.
fn forwarded_env() -> Vec<String> {
    const NAMES: &[&str] = &[
        "API_KEY",
        "WORKER_TIMEOUT",
        "MAX_WORKERS",
        "MAX_REQUESTS",
        "ENABLE_NETWORK",
        "NETWORK_ISOLATION",
        "NETWORK_DENY",
        "NETWORK_ALLOW",
        "NETWORK_DNS",
        "ENABLE_PRELOAD",
        "MEMORY_LIMIT_MB",
        "MAX_PROCESSES",
        "MAX_OUTPUT_BYTES",
        "TMP_SIZE_MB",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "SOCKS5_PROXY",
        "PIP_MIRROR_URL",
        "NPM_MIRROR_URL",
        "WARM_WORKERS",
        "PYTHON_FORK_SERVER",
        "LOG_FORMAT",
        "SANDBOX_LOG",
    ];
    NAMES
        .iter()
        .filter_map(|name| std::env::var(name).ok().map(|v| format!("{name}={v}")))
        .collect()
}

/// The arguments after the subcommand, without `--engine`.
pub fn args_after(subcommand: &str) -> Vec<String> {
    let all: Vec<String> = std::env::args().skip(1).collect();
    let mut out = Vec::new();
    let mut seen = false;
    let mut skip = false;
    for arg in all {
        if skip {
            skip = false;
            continue;
        }
        if arg == "--engine" {
            skip = true;
            continue;
        }
        if arg.starts_with("--engine=") {
            continue;
        }
        if !seen {
            seen = arg == subcommand;
            continue;
        }
        out.push(arg);
    }
    out
}

/// A tokio runtime for one command.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_architectures_are_named_as_build_linux_names_them() {
        assert_eq!(arch_name("x86_64"), "amd64");
        assert_eq!(arch_name("aarch64"), "arm64");
        assert_eq!(arch_name("arm64"), "arm64");
    }
}
