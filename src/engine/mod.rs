//! The engine: admits a run, finds it a fresh sandbox (a warm one when ready), runs the
//! snippet and reports what happened. Shared by `serve` (through the HTTP API) and `run`
//! (locally).
//!
//! - `build`: the composition root, `Engine::build(config)`.
//! - `plan`: the pure function from host, runtime, limits and run to a `SandboxSpec`.
//! - `worker`: one helper process and the protocol to talk to it; `capture` reads its
//!   output.
//! - `outcome`: which limit stopped a run, and the `error` text.
//! - `warm`: the pool of warm, single-use workers.
//! - `request`: what a run asks for, and how it can fail.
//! - `stdin`: what a run reads on fd 0.

mod build;
mod capture;
pub mod forkserver;
pub mod network;
pub mod outcome;
pub mod plan;
mod request;
pub mod stdin;
pub mod warm;
mod watch;
pub mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use build::BuildError;
pub use outcome::{LimitHit, RunLimits, RunOutcome};
use plan::PlanInput;
use request::rerunnable;
pub use request::{RunError, RunFiles, RunRequest};
pub use stdin::StdinFeed;
pub use warm::PoolKey;
use warm::WarmPool;
use worker::{Aftermath, RunBounds, Watch, Worker};
pub use worker::{Sink, Stream};

use crate::config::Config;
use crate::deps::Dependencies;
use crate::isolation::detect::Host;
use crate::isolation::rootfs;
use crate::isolation::seccomp::Start;
use crate::isolation::snippet;
use crate::isolation::spec::IsolationLevel;
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
    state: StateDir,
    runtimes: HashMap<Language, Result<Runtime, String>>,
    uids: UidPool,
    /// Every run's limits, from the configuration.
    limits: RunLimits,
    workers: Arc<Semaphore>,
    counter: AtomicU64,
    warm: WarmPool<Worker>,
    queued: AtomicI64,
    /// Extra Python packages (None when Python is unavailable).
    pub deps: Option<Arc<Dependencies>>,
    /// The chroot level's roots, prepared in the background; workers wait for them.
    roots: crate::isolation::chroot_root::Roots,
    /// How networked runs reach the network.
    pub network: network::RunNetwork,
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
                "not configured".into(),
            )),
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

    /// Keep warm workers ready for the keys Dify uses (each language with the server's
    /// network setting); other keys are added when first asked for.
    pub fn start_warm_pool(self: &Arc<Self>) {
        if self.warm.target() == 0 {
            return;
        }
        // Networked workers only where networked runs can be served.
        let network = self.config.enable_network && self.network.available();
        for language in Language::ALL {
            if self.runtime(language).is_ok() {
                self.warm.want(PoolKey { language, network });
            }
        }
        let engine = Arc::clone(self);
        tokio::spawn(async move { engine.tend_pool().await });
        if let (Some(_), Some(deps)) = (&self.fork_server, &self.deps) {
            let (engine, mut generations) = (Arc::clone(self), deps.generations());
            tokio::spawn(async move {
                while generations.changed().await.is_ok() {
                    engine.reload_python().await;
                }
            });
        }
    }

    /// New Python packages went live: the fork server (which may have imported older
    /// ones) and the runs it already forked make way for fresh ones.
    async fn reload_python(&self) {
        let Some(fs) = &self.fork_server else { return };
        if let Err(e) = fs.restart().await {
            tracing::error!(error = %e, "cannot restart the Python fork server after new packages; it is restarted when it is next found down");
        }
        for worker in self.warm.drain_where(|w| w.is_forked()) {
            worker.discard().await;
        }
    }

    /// Refill the pool after each take and on a short timer, dropping workers whose
    /// interpreter died while it waited.
    async fn tend_pool(self: Arc<Self>) {
        loop {
            if self.workers.is_closed() {
                return;
            }
            for dead in self.warm.remove_dead() {
                tracing::warn!("a warm worker died while waiting; replacing it");
                dead.discard().await;
            }
            self.tend_fork_server();
            for key in self.warm.missing() {
                let engine = Arc::clone(&self);
                self.tasks.spawn(async move {
                    match engine.spawn_worker(key, true, &RunFiles::default()).await {
                        Ok(worker) => engine.warm.put(key, worker),
                        Err(e) => {
                            tracing::error!(error = %e, language = %key.language, "cannot start a warm worker");
                            // Back off before the tender tries again.
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            engine.warm.spawn_failed(key);
                        }
                    }
                });
            }
            tokio::select! {
                _ = self.warm.wait_for_take() => {},
                _ = tokio::time::sleep(Duration::from_millis(250)) => {},
            }
        }
    }

    /// Restart the fork server in the background when it is gone (runs go to plain
    /// workers meanwhile) or worn out (it serves until its replacement is ready).
    fn tend_fork_server(self: &Arc<Self>) {
        let Some(fs) = &self.fork_server else { return };
        if !fs.in_use() {
            return;
        }
        let worn_out = fs.up() && fs.worn_out();
        if (fs.up() && !worn_out) || self.restarting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (fs, engine) = (fs.clone(), Arc::clone(self));
        self.tasks.spawn(async move {
            if worn_out {
                tracing::debug!("replacing the Python fork server: it has forked its share of runs");
            } else {
                tracing::warn!("the Python fork server is gone; restarting it");
            }
            match fs.restart().await {
                Ok(()) if worn_out => {}
                Ok(()) => tracing::info!("the Python fork server is back"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot restart the Python fork server; Python runs start their own interpreters meanwhile");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
            engine.restarting.store(false, Ordering::Release);
        });
    }

    /// Whether this server runs `req` at all: its language works here, and it asks for
    /// network only where the configuration allows it.
    fn admit(&self, req: &RunRequest) -> Result<(), RunError> {
        self.runtime(req.language)?;
        if req.network && !self.config.enable_network {
            return Err(RunError::NetworkDisabled);
        }
        if let (true, network::RunNetwork::Unavailable(reason)) = (req.network, &self.network) {
            return Err(RunError::NetworkUnavailable(reason.clone()));
        }
        if !req.files.is_empty() && !self.host.level.private_root() {
            return Err(RunError::FilesNeedPrivateRoot);
        }
        Ok(())
    }

    /// Run one snippet: waits for a worker slot, then runs it in a fresh sandbox (a warm
    /// one when the pool has it ready).
    pub async fn execute(&self, req: RunRequest) -> Result<RunOutcome, RunError> {
        self.admit(&req)?;
        self.queued.fetch_add(1, Ordering::Relaxed);
        let slot = self.workers.clone().acquire_owned().await;
        self.queued.fetch_sub(1, Ordering::Relaxed);
        // Held until the last process of the run that answers is gone (see `run_worker`),
        // so max_workers bounds live runs, not open requests.
        let mut slot = Some(slot.map_err(|_| RunError::ShuttingDown)?);
        let slot = &mut slot;
        let key = PoolKey {
            language: req.language,
            network: req.network,
        };
        if !req.files.is_empty() {
            // Its directories are bound when its sandbox is built: a worker of its own.
            let worker = self.spawn_worker(key, false, &req.files).await?;
            return self.finish_fresh(worker, &req, slot).await;
        }
        let none = RunFiles::default();
        let mut allow_fork = true;
        if let Some(worker) = self.warm.take_or_wait(key).await {
            let forked = worker.is_forked();
            match self.run_worker(worker, &req, slot).await {
                // Killed while it waited: the snippet never ran, so running it on a fresh
                // worker is safe.
                Err(RunError::EndedBeforeCode) if rerunnable(&req) => {}
                // A forked run that could not jail itself ran nothing either.
                Err(RunError::Setup(message)) if forked && rerunnable(&req) => {
                    self.fork_failed(&message);
                    allow_fork = false;
                }
                other => {
                    if forked && let Some(fs) = &self.fork_server {
                        fs.record(!matches!(other, Err(RunError::Setup(_))));
                    }
                    return other;
                }
            }
        }
        let worker = self.spawn_worker(key, allow_fork, &none).await?;
        if worker.is_forked() {
            match self.run_worker(worker, &req, slot).await {
                Err(RunError::Setup(message)) if rerunnable(&req) => self.fork_failed(&message),
                Err(RunError::EndedBeforeCode) if rerunnable(&req) => {
                    self.fork_failed("the run ended before it read its snippet")
                }
                other => {
                    if let Some(fs) = &self.fork_server {
                        let started =
                            !matches!(other, Err(RunError::Setup(_) | RunError::EndedBeforeCode));
                        fs.record(started);
                    }
                    return other;
                }
            }
            let worker = self.spawn_worker(key, false, &none).await?;
            return self.finish_fresh(worker, &req, slot).await;
        }
        self.finish_fresh(worker, &req, slot).await
    }

    /// Note a forked run that failed to start; a fork server that keeps failing is put
    /// out of use.
    fn fork_failed(&self, message: &str) {
        tracing::error!(%message, "a run forked by the Python fork server could not start; running it in a fresh interpreter");
        if let Some(fs) = &self.fork_server {
            fs.record(false);
        }
    }

    /// Run `req` on a worker started for it; a run that ends before its snippet was read
    /// is the sandbox's failure.
    async fn finish_fresh(
        &self,
        worker: Worker,
        req: &RunRequest,
        slot: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<RunOutcome, RunError> {
        match self.run_worker(worker, req, slot).await {
            Err(RunError::EndedBeforeCode) => Err(RunError::Setup(
                "the interpreter exited before it could read the snippet; check that it starts \
                 within memory_limit_mb (sandbox doctor)"
                    .into(),
            )),
            other => other,
        }
    }

    /// Start a sandbox and its interpreter; the snippet is sent later by `run_worker`.
    async fn spawn_worker(
        &self,
        key: PoolKey,
        allow_fork: bool,
        files: &RunFiles,
    ) -> Result<Worker, RunError> {
        let runtime = self.runtime(key.language)?;
        self.roots
            .wait(&self.state.chroot_root(key.language))
            .await
            .map_err(RunError::Setup)?;
        // A networked run takes a namespace a finished run left untouched, with its uid.
        let (lease, reused) = match key.network.then(|| self.network.reuse()).flatten() {
            Some((lease, netns)) => (lease, Some(netns)),
            None => (self.uids.acquire()?, None),
        };
        // Without root the run's uid is the caller's own (its user namespace maps only
        // that one), which already owns the directory.
        if let Some(out) = &files.out
            && self.host.level == IsolationLevel::Namespaces
        {
            std::os::unix::fs::chown(out, Some(lease.uid), Some(lease.uid)).map_err(|source| {
                RunError::OutputDir {
                    path: out.clone(),
                    source,
                }
            })?;
        }
        let run_no = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("{RUN_PREFIX}{}-{run_no}", std::process::id());
        let cgroup = match &self.host.cgroup {
            // One more task than the run's own: its init (see `isolation::init`).
            Some(driver) => Some(driver.create_run(
                &name,
                self.limits.memory_mb << 20,
                self.limits.max_processes + 1,
            )?),
            None => None,
        };
        let net = match self
            .network
            .prepare(lease.uid, key.network, &self.config.proxy, reused)
            .await
        {
            Ok(net) => net,
            Err(e) => {
                if let Some(cg) = cgroup {
                    cg.remove();
                }
                return Err(e);
            }
        };
        let forkable = match &self.fork_server {
            Some(fs) => {
                allow_fork && files.is_empty() && key.language == Language::Python3 && fs.up()
            }
            None => false,
        };
        let cgroup_procs = cgroup.as_ref().map(|c| c.procs_files()).unwrap_or_default();
        let plan_for = |start| {
            plan::plan(PlanInput {
                level: self.host.level,
                state: &self.state,
                runtime,
                limits: &self.limits,
                network: net.setup,
                resolv_conf: net.resolv_conf.clone(),
                uid: lease.uid,
                cgroup_procs: cgroup_procs.clone(),
                proxy: &net.proxy,
                seccomp: &self.seccomp,
                start,
                files,
            })
        };
        let (netns, net_lease) = match net.netns {
            Some(n) => (Some(n.fd), Some(n.lease)),
            None => (None, None),
        };
        if let Some(fs) = self.fork_server.as_ref().filter(|_| forkable) {
            let spec = plan_for(Start::Fork);
            // The fork server gets the namespace and keeps nothing of it; the server
            // keeps its own copy in case the fork fails.
            let shared = match &netns {
                Some(fd) => Some(fd.try_clone().map_err(RunError::Spawn)?),
                None => None,
            };
            match fs.fork(&spec, shared).await {
                Ok((keeper, pipes)) => {
                    return Ok(Worker::forked(keeper, pipes, lease, net_lease, cgroup));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the Python fork server failed a run's start; using a fresh interpreter")
                }
            }
        }
        let spec = plan_for(Start::Exec);
        let chroot_tmp = (spec.level == IsolationLevel::Chroot)
            .then(|| rootfs::inside(&spec.root_dir, &spec.workdir));
        Worker::spawn(&spec, netns, lease, net_lease, cgroup, chroot_tmp)
    }

    /// Send the snippet to `worker`, collect its output under the limits, clean up. The
    /// run holds `slot` until its last process is gone; a run answered before that takes
    /// it along, any other gives it back (for a retry).
    async fn run_worker(
        &self,
        mut worker: Worker,
        req: &RunRequest,
        slot: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<RunOutcome, RunError> {
        let started = Instant::now();
        let frame = snippet::encode(&req.preload, &req.code, &req.invocation);
        // The run's stdin: fed from its source, or closed now (end of input).
        if let Some(pipe) = worker.take_stdin() {
            let fed = match &req.stdin {
                Some(feed) => feed.start(pipe),
                None => {
                    drop(pipe);
                    Ok(())
                }
            };
            if let Err(e) = fed {
                self.tasks.spawn(worker.discard());
                return Err(RunError::Spawn(e));
            }
        }
        let l = &self.limits;
        let on_disk = self.host.level == IsolationLevel::Chroot || req.files.out.is_some();
        let watch = Watch {
            memory_bytes: self.host.cgroup.is_none().then_some(l.memory_mb << 20),
            disk_bytes: on_disk.then_some(l.tmp_mb << 20),
        };
        let bounds = RunBounds {
            timeout: l.timeout,
            output_cap: l.max_output_bytes,
            early_answer: !req.wait_for_exit,
        };
        worker.hold_slot(slot.take());
        let collected = worker
            .run(&frame, bounds, watch, req.sink.clone(), req.cancel.clone())
            .await;
        let uid = worker.uid();
        let false_ends = self.false_ends.clone();
        let early = !req.wait_for_exit && collected.is_ok();
        // Returns the slot once the run is over: it may serve the next run (or a retry).
        let release = async move {
            let aftermath = worker.until_gone().await;
            let slot = worker.take_slot();
            let counter = match aftermath {
                Aftermath::Ended => None,
                Aftermath::FalseEnd => Some(&false_ends.misreported),
                Aftermath::KilledAfterAnswer => Some(&false_ends.killed_after_answer),
            };
            if let Some(c) = counter {
                c.inc();
            }
            if early {
                drop(slot);
                worker.free(aftermath).await;
                None
            } else {
                worker.free(aftermath).await;
                slot
            }
        };
        if early {
            // The answer goes now; the slot stays taken until the run is gone.
            self.tasks.spawn(release);
        } else {
            *slot = release.await;
        }
        let c = collected?;
        let stderr = String::from_utf8_lossy(&c.stderr).into_owned();
        let (exit_code, limit, error) = outcome::conclude(
            c.ending,
            c.stopped_for,
            c.counters,
            req.language,
            &stderr,
            l,
        );
        Ok(RunOutcome {
            stdout: String::from_utf8_lossy(&c.stdout).into_owned(),
            stderr,
            exit_code,
            error,
            limit,
            duration: started.elapsed(),
            uid,
        })
    }
}
