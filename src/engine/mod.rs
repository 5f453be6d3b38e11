//! The engine: admits a run, finds it a fresh sandbox (a warm one when ready), runs the
//! snippet and reports what happened. Shared by `serve` (through the HTTP API) and `run`
//! (locally).
//!
//! - `build`: the composition root, `Engine::build(config)`.
//! - `execute`: a request's way through the engine; `pool`: keeping workers ready.
//! - `spawn`: a worker started: its resources acquired (`resources`), its sandbox
//!   planned (`plan`, the pure function from host, runtime, limits and run to a
//!   `SandboxSpec`), its helper or fork started.
//! - `worker`: one run's process and the protocol to talk to it; `capture` reads its
//!   output.
//! - `network`: what networked runs may get (a pure policy) and what the server installs
//!   for it.
//! - `outcome`: which limit stopped a run, and the `error` text.
//! - `warm`: the pool of warm, single-use workers.
//! - `request`: what a run asks for, and how it can fail.
//! - `stdin`: what a run reads on fd 0.

mod build;
mod capture;
mod execute;
pub mod forkserver;
mod install;
pub mod network;
pub mod outcome;
pub mod plan;
mod pool;
mod probe;
mod request;
pub mod resources;
mod spawn;
pub mod stdin;
pub mod warm;
mod watch;
pub mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

pub use crate::config::RunLimits;
pub use crate::protocol::LimitHit;
pub use build::BuildError;
pub use capture::{Sink, Stream};
pub use outcome::RunOutcome;
pub use probe::ProbeError;
pub use request::{RunError, RunFiles, RunRequest, SetupError, Unavailable};
pub use stdin::StdinFeed;
pub use warm::PoolKey;
use warm::WarmPool;
use worker::Worker;

use crate::config::Config;
use crate::deps::PackageSet;
use crate::isolation::detect::Host;
use crate::isolation::uids::UidPool;
use crate::runtime::{Language, Runtime};
use crate::state::StateDir;

/// Names of per-run cgroups: `<prefix><server pid>-<n>`.
const RUN_PREFIX: &str = "sandbox-run-";

pub struct Engine {
    pub config: Arc<Config>,
    pub host: Host,
    /// Every seccomp program a run can get, compiled at start.
    seccomp: crate::isolation::seccomp::Programs,
    /// Whether the kernel can make a tree of mounts read-only (mount_setattr).
    readonly_beneath: bool,
    state: StateDir,
    runtimes: HashMap<Language, Result<Runtime, Unavailable>>,
    uids: UidPool,
    /// Every run's limits, from the configuration.
    limits: RunLimits,
    workers: Arc<Semaphore>,
    counter: AtomicU64,
    warm: WarmPool<Worker>,
    queued: AtomicI64,
    /// Extra packages, per language whose interpreter works here.
    packages: HashMap<Language, Arc<PackageSet>>,
    /// Each language's interpreter as its package installer runs it (see `install`).
    installers: HashMap<Language, Runtime>,
    /// What one install may take.
    installer_limits: RunLimits,
    /// The chroot level's roots, prepared in the background; workers wait for them.
    roots: crate::isolation::chroot_root::Roots,
    /// What networked runs may get (its policy), and what the server installed for it.
    pub network: network::ServerNetwork,
    /// Where Python runs are forked from, when it runs (see `forkserver`).
    pub fork_server: Option<Arc<forkserver::ForkServer>>,
    /// A fork server's restart is under way.
    restarting: std::sync::atomic::AtomicBool,
    /// Background work that must finish before the server exits: warm workers being
    /// started, clean-up after runs.
    tasks: tokio_util::task::TaskTracker,
    /// Runs found not to have ended as they reported.
    pub false_ends: crate::metrics::FalseEnds,
}

impl Engine {
    pub fn runtime(&self, language: Language) -> Result<&Runtime, RunError> {
        match self.runtimes.get(&language) {
            Some(Ok(rt)) => Ok(rt),
            Some(Err(reason)) => Err(RunError::LanguageUnavailable(language, reason.clone())),
            None => Err(RunError::LanguageUnavailable(
                language,
                Unavailable::NotConfigured,
            )),
        }
    }

    fn limits_for(&self, kind: install::RunKind) -> &RunLimits {
        match kind {
            install::RunKind::Snippet => &self.limits,
            install::RunKind::Installer => &self.installer_limits,
        }
    }

    /// Runs waiting for a worker slot.
    pub fn queued(&self) -> i64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Clean-ups of finished runs and warm workers being started.
    pub fn background_tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Warm workers ready, per language and network setting.
    pub fn warm_ready(&self) -> Vec<(PoolKey, usize)> {
        self.warm.ready()
    }

    /// Stop handing out worker slots (runs already executing finish, queued ones fail)
    /// and kill the warm workers.
    pub async fn close(&self) {
        self.workers.close();
        // Wait for workers being started and for the clean-up of finished runs, so no
        // cgroup or private directory outlives the server.
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(15), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "some run clean-ups did not finish in 15 s; the next start removes what is left"
            );
        }
        for worker in self.warm.drain() {
            worker.discard().await;
        }
        self.network.close().await;
    }

    /// Whether this server runs `req` at all: its language works here, and it asks for
    /// network only where the network policy grants it.
    fn admit(&self, req: &RunRequest) -> Result<(), RunError> {
        self.runtime(req.language)?;
        let needed = req.language.min_tasks();
        if self.limits.max_processes < needed {
            return Err(RunError::TooFewProcesses {
                language: req.language,
                needed,
                limit: self.limits.max_processes,
            });
        }
        self.network.policy().grant(req.network)?;
        if !req.files.is_empty() && !self.host.level.private_root() {
            return Err(RunError::FilesNeedPrivateRoot);
        }
        Ok(())
    }
}
