//! The engine: runs one snippet in a fresh sandbox and reports what happened. Shared by
//! `serve` (through the HTTP API) and `run` (locally).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore};

use crate::config::Config;
use crate::isolation::cgroup::{CgroupError, RunCgroup};
use crate::isolation::detect::Host;
use crate::isolation::helper::HelperReport;
use crate::isolation::spec::{IsolationLevel, Limits, SandboxSpec};
use crate::pool::{Idle, PoolError, UidLease, UidPool, WarmPool};
use crate::runtime::{Language, Runtime, nodejs, python};

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Receives output as it is produced (used by `sandbox run` to stream to a terminal).
pub type Sink = Arc<dyn Fn(Stream, &[u8]) + Send + Sync>;

/// The limit that stopped a run, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitHit {
    Timeout,
    Memory,
    Output,
    Processes,
}

impl LimitHit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Memory => "memory",
            Self::Output => "output",
            Self::Processes => "processes",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunLimits {
    pub timeout: Duration,
    pub memory_mb: u64,
    pub max_processes: u64,
    pub max_output_bytes: usize,
    pub tmp_mb: u64,
}

pub struct RunRequest {
    pub language: Language,
    pub code: String,
    pub preload: String,
    pub network: bool,
    pub sink: Option<Sink>,
}

#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    pub error: String,
    pub limit: Option<LimitHit>,
    pub duration: Duration,
    pub uid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0} is not available on this server: {1}")]
    LanguageUnavailable(Language, String),
    #[error(transparent)]
    Uid(#[from] PoolError),
    #[error(
        "could not create the run's cgroup: {0}; run `sandbox doctor` to check the cgroup setup"
    )]
    Cgroup(#[from] CgroupError),
    #[error(
        "could not start the sandbox helper: {0}; the server re-executes itself through /proc/self/exe, which must be mounted"
    )]
    Spawn(std::io::Error),
    #[error(
        "the sandbox could not be set up: {0}; run `sandbox doctor` to see what this host allows"
    )]
    Setup(String),
    #[error("the server is shutting down; retry on another instance")]
    ShuttingDown,
    #[error("the interpreter ended before the snippet reached it")]
    EndedBeforeCode,
}

pub struct Engine {
    pub config: Arc<Config>,
    pub host: Host,
    runtimes: HashMap<Language, Result<Runtime, String>>,
    uids: UidPool,
    /// Every run's limits, from the configuration.
    limits: RunLimits,
    workers: Arc<Semaphore>,
    counter: AtomicU64,
    mount_dir: PathBuf,
    pub(crate) warm: WarmPool<Worker>,
    queued: std::sync::atomic::AtomicI64,
    /// Extra Python packages (None when Python is unavailable).
    pub deps: Option<Arc<crate::deps::Dependencies>>,
    /// What networked runs may not reach: `Ok(None)` when nothing is guarded (no network,
    /// or `network_deny` empty), `Err` with the reason when the guard could not be set.
    pub net_guard: Result<Option<crate::isolation::netguard::NetGuard>, String>,
    /// Background work that must finish before the server exits: warm workers being
    /// started, clean-up after runs.
    tasks: tokio_util::task::TaskTracker,
}

const RUN_PREFIX: &str = "sandbox-run-";

/// The helper is this very binary (`sandbox __exec`).
const HELPER: &str = "/proc/self/exe";

/// Which warm workers a run can use: they differ in namespaces and seccomp rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub language: Language,
    pub network: bool,
}

/// A sandbox whose interpreter is started and waits for its snippet on fd 3. Used for
/// exactly one run; dropping it kills the helper (and through it the interpreter).
pub struct Worker {
    child: tokio::process::Child,
    channel: tokio::net::UnixStream,
    stdout: Option<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
    cgroup: Option<RunCgroup>,
    lease: UidLease,
    language: Language,
    /// The run's private directory on the host, under the chroot level (which has no
    /// private tmpfs to vanish with the run).
    chroot_tmp: Option<PathBuf>,
}

impl Worker {
    pub fn uid(&self) -> u32 {
        self.lease.uid
    }

    /// After the process tree is gone: remove the cgroup and private files, then give
    /// the uid back (dropping the lease last).
    async fn release(mut self) {
        if let Some(cg) = self.cgroup.take() {
            let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
        }
        if let Some(dir) = self.chroot_tmp.take() {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        }
    }
}

/// A worker dropped without `release` (its request was cancelled, say, because the client
/// went away): the helper is killed by `kill_on_drop`, and the cgroup is removed from a
/// plain thread, since Drop cannot wait.
impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            let _ = self.child.start_kill();
            std::thread::spawn(move || cg.remove());
        }
    }
}

impl Idle for Worker {
    /// Dead when the helper exited, or when it already sent its report (the
    /// interpreter ended, or its setup failed) before any snippet was sent.
    fn is_dead(&mut self) -> bool {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return true;
        }
        let mut byte = [0u8; 1];
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        !matches!(
            nix::sys::socket::recv(self.channel.as_raw_fd(), &mut byte, flags),
            Err(nix::errno::Errno::EAGAIN)
        )
    }
}

impl Engine {
    pub fn new(
        config: Arc<Config>,
        host: Host,
        runtimes: HashMap<Language, Result<Runtime, String>>,
        mount_dir: PathBuf,
        deps: Option<Arc<crate::deps::Dependencies>>,
        net_guard: Result<Option<crate::isolation::netguard::NetGuard>, String>,
    ) -> Result<Self, PoolError> {
        let uids = UidPool::new(&config.state_dir)?;
        if let Some(cg) = &host.cgroup {
            cg.remove_stale(RUN_PREFIX);
        }
        Ok(Self {
            limits: RunLimits {
                timeout: config.worker_timeout,
                memory_mb: config.memory_limit_mb,
                max_processes: config.max_processes,
                max_output_bytes: config.max_output_bytes,
                tmp_mb: config.tmp_size_mb,
            },
            workers: Arc::new(Semaphore::new(config.max_workers)),
            warm: WarmPool::new(config.warm_workers),
            config,
            host,
            runtimes,
            uids,
            counter: AtomicU64::new(0),
            mount_dir,
            queued: std::sync::atomic::AtomicI64::new(0),
            deps,
            net_guard,
            tasks: tokio_util::task::TaskTracker::new(),
        })
    }

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

    /// Warm workers ready, per language and network setting.
    pub fn warm_ready(&self) -> Vec<(PoolKey, usize)> {
        self.warm.ready()
    }

    /// The copied root a language's runs chroot into (chroot level only).
    pub fn chroot_dir(&self, language: Language) -> PathBuf {
        chroot_dir(&self.config.state_dir, language)
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
            self.discard(worker).await;
        }
    }

    /// Keep warm workers ready for the keys Dify uses (each language with the server's
    /// network setting); other keys are added when first asked for.
    pub fn start_warm_pool(self: &Arc<Self>) {
        if self.warm.target() == 0 {
            return;
        }
        for language in Language::ALL {
            if self.runtime(language).is_ok() {
                self.warm.want(PoolKey {
                    language,
                    network: self.config.enable_network,
                });
            }
        }
        let engine = Arc::clone(self);
        tokio::spawn(async move { engine.tend_pool().await });
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
                self.discard(dead).await;
            }
            for key in self.warm.missing() {
                let engine = Arc::clone(&self);
                self.tasks.spawn(async move {
                    match engine.spawn_worker(key.language, key.network) {
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

    /// Run one snippet: waits for a worker slot, then runs it in a fresh sandbox (a warm
    /// one when the pool has it ready).
    pub async fn execute(&self, req: RunRequest) -> Result<RunOutcome, RunError> {
        self.runtime(req.language)?;
        self.queued.fetch_add(1, Ordering::Relaxed);
        let slot = self.workers.clone().acquire_owned().await;
        self.queued.fetch_sub(1, Ordering::Relaxed);
        let _slot = slot.map_err(|_| RunError::ShuttingDown)?;
        let key = PoolKey {
            language: req.language,
            network: req.network,
        };
        if let Some(worker) = self.warm.take_or_wait(key).await {
            match self.run_worker(worker, &req).await {
                // Killed while it waited: the snippet never ran, so running it on a fresh
                // worker is safe.
                Err(RunError::EndedBeforeCode) => {}
                other => return other,
            }
        }
        let worker = self.spawn_worker(req.language, req.network)?;
        match self.run_worker(worker, &req).await {
            Err(RunError::EndedBeforeCode) => Err(RunError::Setup(
                "the interpreter exited before it could read the snippet; check that it starts \
                 within memory_limit_mb (sandbox doctor)"
                    .into(),
            )),
            other => other,
        }
    }

    /// Start a sandbox and its interpreter; the snippet is sent later by `run_worker`.
    fn spawn_worker(&self, language: Language, network: bool) -> Result<Worker, RunError> {
        let runtime = self.runtime(language)?;
        let limits = &self.limits;
        let lease = self.uids.acquire()?;
        let run_no = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("{RUN_PREFIX}{}-{run_no}", std::process::id());
        let cgroup = match &self.host.cgroup {
            Some(driver) => {
                Some(driver.create_run(&name, limits.memory_mb << 20, limits.max_processes)?)
            }
            None => None,
        };
        let spec = self.spec(runtime, network, limits, lease.uid, cgroup.as_ref());
        let chroot_tmp = (spec.level == IsolationLevel::Chroot)
            .then(|| crate::isolation::rootfs::inside(&spec.root_dir, &spec.workdir));
        let spawned = (|| {
            let spec_json =
                serde_json::to_string(&spec).map_err(|e| RunError::Setup(e.to_string()))?;
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(RunError::Spawn)?;
            let mut child = tokio::process::Command::new(HELPER)
                .arg("__exec")
                .arg(spec_json)
                .env_clear()
                .stdin(Stdio::from(OwnedFd::from(theirs)))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(RunError::Spawn)?;
            ours.set_nonblocking(true).map_err(RunError::Spawn)?;
            let channel = tokio::net::UnixStream::from_std(ours).map_err(RunError::Spawn)?;
            Ok::<_, RunError>((child.stdout.take(), child.stderr.take(), child, channel))
        })();
        match spawned {
            Ok((stdout, stderr, child, channel)) => Ok(Worker {
                child,
                channel,
                stdout,
                stderr,
                cgroup,
                lease,
                language,
                chroot_tmp,
            }),
            Err(e) => {
                if let Some(cg) = cgroup {
                    cg.remove();
                }
                Err(e)
            }
        }
    }

    fn spec(
        &self,
        runtime: &Runtime,
        network: bool,
        l: &RunLimits,
        uid: u32,
        cgroup: Option<&RunCgroup>,
    ) -> SandboxSpec {
        let workdir = match self.host.level {
            IsolationLevel::Namespaces | IsolationLevel::Rootless => PathBuf::from("/tmp"),
            IsolationLevel::Chroot => PathBuf::from(format!("/tmp/run-{uid}")),
        };
        let mut env = vec![
            "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
            format!("HOME={}", workdir.display()),
            format!("TMPDIR={}", workdir.display()),
            "LANG=C.UTF-8".to_string(),
        ];
        env.extend(runtime.env.iter().cloned());
        if network {
            let p = &self.config.proxy;
            for (vars, value) in [
                (["HTTP_PROXY", "http_proxy"], &p.http),
                (["HTTPS_PROXY", "https_proxy"], &p.https),
                (["ALL_PROXY", "all_proxy"], &p.socks5),
            ] {
                if !value.is_empty() {
                    env.extend(vars.iter().map(|v| format!("{v}={value}")));
                }
            }
        }
        // Without a cgroup, RLIMIT_AS is the memory limit; V8 reserves far more address
        // space than it uses, so Node gets its heap flag instead.
        let address_space = match (cgroup, runtime.language) {
            (None, Language::Python3) => Some((l.memory_mb << 20).max(64 << 20)),
            _ => None,
        };
        let root_dir = match self.host.level {
            IsolationLevel::Namespaces | IsolationLevel::Rootless => self.mount_dir.clone(),
            IsolationLevel::Chroot => self.chroot_dir(runtime.language),
        };
        SandboxSpec {
            level: self.host.level,
            root_dir,
            root: runtime.root.clone(),
            uid,
            gid: uid,
            network,
            limits: Limits {
                address_space_bytes: address_space,
                max_processes: l.max_processes,
                tmp_bytes: l.tmp_mb << 20,
                cpu_seconds: l.timeout.as_secs() + 2,
                open_files: 256,
            },
            cgroup_procs: cgroup.map(|c| c.procs_files()).unwrap_or_default(),
            profile: runtime.profile,
            allowed_syscalls: self.config.allowed_syscalls.clone(),
            extra_syscalls: self.config.extra_syscalls.clone(),
            program: runtime.program.clone(),
            workdir,
            argv: runtime.argv(l.memory_mb),
            env,
            mmap_min_addr: self.host.report.mmap_min_addr,
        }
    }

    /// Kill a worker that will not run anything and free what it held.
    async fn discard(&self, mut worker: Worker) {
        let _ = worker.child.start_kill();
        let _ = worker.child.wait().await;
        worker.release().await;
    }

    /// Send the snippet to `worker`, collect its output under the limits, clean up.
    async fn run_worker(
        &self,
        mut worker: Worker,
        req: &RunRequest,
    ) -> Result<RunOutcome, RunError> {
        let started = Instant::now();
        let limits = &self.limits;
        let overflow = Arc::new(Notify::new());
        let cap = limits.max_output_bytes;
        let stdout = worker.stdout.take().map(|s| {
            tokio::spawn(read_capped(
                s,
                cap,
                Stream::Stdout,
                req.sink.clone(),
                overflow.clone(),
            ))
        });
        let stderr = worker.stderr.take().map(|s| {
            tokio::spawn(read_capped(
                s,
                cap,
                Stream::Stderr,
                req.sink.clone(),
                overflow.clone(),
            ))
        });

        let mut payload = Vec::with_capacity(req.preload.len() + req.code.len() + 24);
        payload.extend_from_slice(format!("{}\n", req.preload.len()).as_bytes());
        payload.extend_from_slice(req.preload.as_bytes());
        payload.extend_from_slice(req.code.as_bytes());

        let (mut status_rd, mut code_wr) = worker.channel.split();
        let talk = async {
            // The helper may fail before reading everything; its report says why.
            let _ = code_wr.write_all(&payload).await;
            let _ = code_wr.shutdown().await;
            let mut text = String::new();
            let _ = status_rd.read_to_string(&mut text).await;
            serde_json::from_str::<HelperReport>(text.trim()).ok()
        };
        let mut limit = None;
        let report = tokio::select! {
            r = talk => r,
            _ = tokio::time::sleep(limits.timeout) => { limit = Some(LimitHit::Timeout); None }
            _ = overflow.notified() => { limit = Some(LimitHit::Output); None }
        };
        if limit.is_some() {
            let _ = worker.child.start_kill();
            if let Some(cg) = &worker.cgroup {
                cg.kill_all();
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), worker.child.wait()).await;
        let (out, out_over) = join_reader(stdout).await;
        let (err, err_over) = join_reader(stderr).await;
        if limit.is_none() && (out_over || err_over) {
            limit = Some(LimitHit::Output);
        }
        let (cgroup_memory, cgroup_pids) = match &worker.cgroup {
            Some(cg) => (cg.oom_killed(), cg.pids_limit_hit()),
            None => (false, false),
        };
        let uid = worker.uid();
        let language = worker.language;
        // The process tree is gone; the cgroup and uid are freed after the answer.
        self.tasks.spawn(worker.release());

        let stderr_text = String::from_utf8_lossy(&err).into_owned();
        let mut exit_code = match (&report, limit) {
            (_, Some(LimitHit::Timeout)) => -1,
            (Some(HelperReport::Exited { code }), _) => *code,
            (Some(HelperReport::Signaled { signal }), _) => 128 + signal,
            (Some(HelperReport::SetupFailed { message }), _) => {
                return Err(RunError::Setup(message.clone()));
            }
            (Some(HelperReport::EndedBeforeCode), _) => {
                return Err(RunError::EndedBeforeCode);
            }
            (None, _) => 137,
        };
        if limit.is_none() && exit_code != 0 {
            limit = classify_failure(cgroup_memory, cgroup_pids, language, &stderr_text);
        }
        if limit == Some(LimitHit::Output) && exit_code == 0 {
            exit_code = 137;
        }
        let mut error = describe_error(exit_code, &stderr_text, limit, limits);
        // Another limit stopped the run, but hitting pids.max on the way explains the
        // traceback the user sees ("can't start new thread"): say so too.
        if cgroup_pids && limit.is_some() && limit != Some(LimitHit::Processes) {
            error.push_str(&format!(
                "\nprocess limit reached as well: at most {} processes and threads per run",
                limits.max_processes
            ));
        }
        Ok(RunOutcome {
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: stderr_text,
            exit_code,
            error,
            limit,
            duration: started.elapsed(),
            uid,
        })
    }
}

/// Which limit explains a failed run, from the cgroup's counters or the runtime's own
/// words when no cgroup is available.
fn classify_failure(
    oom_killed: bool,
    pids_limit_hit: bool,
    language: Language,
    stderr: &str,
) -> Option<LimitHit> {
    if oom_killed {
        return Some(LimitHit::Memory);
    }
    if pids_limit_hit {
        return Some(LimitHit::Processes);
    }
    let mut start = stderr.len().saturating_sub(4096);
    while !stderr.is_char_boundary(start) {
        start += 1;
    }
    let tail = &stderr[start..];
    let memory = match language {
        Language::Python3 => tail.contains("MemoryError"),
        Language::Nodejs => {
            tail.contains("heap out of memory") || tail.contains("Reached heap limit")
        }
    };
    if memory {
        return Some(LimitHit::Memory);
    }
    if tail.contains("can't start new thread") || tail.contains("Resource temporarily unavailable")
    {
        return Some(LimitHit::Processes);
    }
    None
}

fn describe_error(
    exit_code: i32,
    stderr: &str,
    limit: Option<LimitHit>,
    limits: &RunLimits,
) -> String {
    if exit_code == 0 && limit.is_none() {
        return String::new();
    }
    let mut msg = match limit {
        Some(LimitHit::Timeout) => format!(
            "timeout: the run took longer than {}s and was killed",
            limits.timeout.as_secs_f64()
        ),
        _ => format!("process exited with code {exit_code}"),
    };
    if !stderr.is_empty() {
        msg.push('\n');
        msg.push_str(stderr);
    }
    let note = match limit {
        Some(LimitHit::Timeout) | None => None,
        Some(LimitHit::Memory) => Some(format!(
            "memory limit exceeded: the run used more than {} MB and was stopped",
            limits.memory_mb
        )),
        Some(LimitHit::Output) => Some(format!(
            "output limit exceeded: a stream passed {} bytes and the run was stopped",
            limits.max_output_bytes
        )),
        Some(LimitHit::Processes) => Some(format!(
            "process limit reached: at most {} processes and threads per run",
            limits.max_processes
        )),
    };
    let eperm = stderr.contains("Operation not permitted") || stderr.contains("EPERM");
    let note = note.or_else(|| {
        eperm.then(|| {
            "sandbox: operation not permitted: the snippet tried something the sandbox forbids \
             (running programs, creating processes, network without enable_network, or a blocked system call)"
                .to_string()
        })
    });
    if let Some(note) = note {
        if !msg.ends_with('\n') {
            msg.push('\n');
        }
        msg.push_str(&note);
    }
    msg
}

/// Read a stream up to `cap` bytes; on overflow, tell the run to stop.
async fn read_capped<R: AsyncRead + Unpin>(
    mut r: R,
    cap: usize,
    stream: Stream,
    sink: Option<Sink>,
    overflow: Arc<Notify>,
) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return (buf, false),
            Ok(n) => {
                let room = cap.saturating_sub(buf.len());
                let take = n.min(room);
                buf.extend_from_slice(&chunk[..take]);
                if let Some(s) = &sink {
                    s(stream, &chunk[..take]);
                }
                if n > room {
                    overflow.notify_one();
                    return (buf, true);
                }
            }
        }
    }
}

async fn join_reader(h: Option<tokio::task::JoinHandle<(Vec<u8>, bool)>>) -> (Vec<u8>, bool) {
    let Some(h) = h else {
        return (Vec::new(), false);
    };
    match tokio::time::timeout(Duration::from_secs(5), h).await {
        Ok(Ok(v)) => v,
        _ => (Vec::new(), false),
    }
}

pub fn chroot_dir(state_dir: &std::path::Path, language: Language) -> PathBuf {
    state_dir.join(format!("root-{language}"))
}

/// Discover every language's interpreter. A language whose interpreter was configured
/// explicitly and does not run is an error; one left to the default is only disabled.
pub fn discover_runtimes(
    config: &Config,
) -> Result<HashMap<Language, Result<Runtime, String>>, crate::runtime::DiscoveryError> {
    type Discover = fn(&str, &[PathBuf]) -> Result<Runtime, crate::runtime::DiscoveryError>;
    let languages: [(Language, Discover, &str, bool); 2] = [
        (
            Language::Python3,
            python::discover,
            &config.python_path,
            config.python_path_explicit,
        ),
        (
            Language::Nodejs,
            nodejs::discover,
            &config.nodejs_path,
            config.nodejs_path_explicit,
        ),
    ];
    let mut map = HashMap::new();
    for (language, discover, path, explicit) in languages {
        match discover(path, &config.system_lib_requirements) {
            Ok(rt) => {
                map.insert(language, Ok(rt));
            }
            // A path the operator chose must work; a default one may be missing.
            Err(e) if explicit => return Err(e),
            Err(e) => {
                map.insert(language, Err(e.to_string()));
            }
        }
    }
    Ok(map)
}
