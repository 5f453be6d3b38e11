//! The engine: runs one snippet in a fresh sandbox and reports what happened. Shared by
//! `serve` (through the HTTP API) and `run` (locally).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
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
use crate::pool::{PoolError, UidPool};
use crate::runner::{Language, Runtime, nodejs, python};

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
    pub limits: RunLimits,
    pub sink: Option<Sink>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunOutcome {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    pub error: String,
    pub limit: Option<LimitHit>,
    #[serde(skip)]
    pub duration: Duration,
    #[serde(skip)]
    pub uid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0} is not available on this server: {1}")]
    LanguageUnavailable(Language, String),
    #[error(transparent)]
    Uid(#[from] PoolError),
    #[error("could not create the run's cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("could not start the sandbox helper: {0}")]
    Spawn(std::io::Error),
    #[error("the sandbox could not be set up: {0}")]
    Setup(String),
    #[error("the server is shutting down")]
    ShuttingDown,
}

pub struct Engine {
    pub config: Arc<Config>,
    pub host: Host,
    runtimes: HashMap<Language, Result<Runtime, String>>,
    uids: UidPool,
    workers: Arc<Semaphore>,
    counter: AtomicU64,
    mount_dir: PathBuf,
    helper: PathBuf,
}

const RUN_PREFIX: &str = "sandbox-run-";

impl Engine {
    pub fn new(
        config: Arc<Config>,
        host: Host,
        runtimes: HashMap<Language, Result<Runtime, String>>,
        mount_dir: PathBuf,
    ) -> Result<Self, PoolError> {
        let uids = UidPool::new(&config.state_dir)?;
        if let Some(cg) = &host.cgroup {
            cg.remove_stale(RUN_PREFIX);
        }
        Ok(Self {
            workers: Arc::new(Semaphore::new(config.max_workers)),
            config,
            host,
            runtimes,
            uids,
            counter: AtomicU64::new(0),
            mount_dir,
            helper: PathBuf::from("/proc/self/exe"),
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

    /// The copied root a language's runs chroot into (chroot level only).
    pub fn chroot_dir(&self, language: Language) -> PathBuf {
        chroot_dir(&self.config.state_dir, language)
    }

    pub fn default_limits(&self) -> RunLimits {
        let c = &self.config;
        RunLimits {
            timeout: c.worker_timeout,
            memory_mb: c.memory_limit_mb,
            max_processes: c.max_processes,
            max_output_bytes: c.max_output_bytes,
            tmp_mb: c.tmp_size_mb,
        }
    }

    /// Stop handing out worker slots: runs already executing finish, queued ones fail.
    pub fn close(&self) {
        self.workers.close();
    }

    /// Run one snippet: waits for a worker slot, then runs it in a fresh sandbox.
    pub async fn execute(&self, req: RunRequest) -> Result<RunOutcome, RunError> {
        let runtime = self.runtime(req.language)?.clone();
        let _slot = self
            .workers
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| RunError::ShuttingDown)?;
        let lease = self.uids.acquire()?;
        let run_no = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("{RUN_PREFIX}{}-{run_no}", std::process::id());
        let memory_bytes = req.limits.memory_mb << 20;
        let cgroup = match &self.host.cgroup {
            Some(driver) => {
                Some(driver.create_run(&name, memory_bytes, req.limits.max_processes)?)
            }
            None => None,
        };
        let guard = CgroupGuard(cgroup);
        let outcome = self
            .execute_in(&runtime, &req, lease.uid, guard.0.as_ref())
            .await;
        guard.remove().await;
        if self.host.level == IsolationLevel::Chroot {
            let dir = self
                .chroot_dir(req.language)
                .join(format!("tmp/run-{}", lease.uid));
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        }
        drop(lease);
        outcome
    }

    fn spec(
        &self,
        runtime: &Runtime,
        req: &RunRequest,
        uid: u32,
        cgroup: Option<&RunCgroup>,
    ) -> SandboxSpec {
        let l = &req.limits;
        let workdir = match self.host.level {
            IsolationLevel::Namespaces => PathBuf::from("/tmp"),
            IsolationLevel::Chroot => PathBuf::from(format!("/tmp/run-{uid}")),
        };
        let mut env = vec![
            "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
            format!("HOME={}", workdir.display()),
            format!("TMPDIR={}", workdir.display()),
            "LANG=C.UTF-8".to_string(),
        ];
        if req.network {
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
            IsolationLevel::Namespaces => self.mount_dir.clone(),
            IsolationLevel::Chroot => self.chroot_dir(runtime.language),
        };
        SandboxSpec {
            level: self.host.level,
            root_dir,
            root: runtime.root.clone(),
            uid,
            gid: uid,
            network: req.network,
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
            program: runtime.program.clone(),
            workdir,
            argv: runtime.argv(l.memory_mb),
            env,
        }
    }

    async fn execute_in(
        &self,
        runtime: &Runtime,
        req: &RunRequest,
        uid: u32,
        cgroup: Option<&RunCgroup>,
    ) -> Result<RunOutcome, RunError> {
        let started = Instant::now();
        let spec = self.spec(runtime, req, uid, cgroup);
        let spec_json = serde_json::to_string(&spec).map_err(|e| RunError::Setup(e.to_string()))?;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(RunError::Spawn)?;
        let mut child = tokio::process::Command::new(&self.helper)
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
        let (mut status_rd, mut code_wr) = channel.into_split();

        let overflow = Arc::new(Notify::new());
        let cap = req.limits.max_output_bytes;
        let stdout = child.stdout.take().map(|s| {
            tokio::spawn(read_capped(
                s,
                cap,
                Stream::Stdout,
                req.sink.clone(),
                overflow.clone(),
            ))
        });
        let stderr = child.stderr.take().map(|s| {
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
            _ = tokio::time::sleep(req.limits.timeout) => { limit = Some(LimitHit::Timeout); None }
            _ = overflow.notified() => { limit = Some(LimitHit::Output); None }
        };
        if limit.is_some() {
            let _ = child.start_kill();
            if let Some(cg) = cgroup {
                cg.kill_all();
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        let (out, out_over) = join_reader(stdout).await;
        let (err, err_over) = join_reader(stderr).await;
        if limit.is_none() && (out_over || err_over) {
            limit = Some(LimitHit::Output);
        }

        let stderr_text = String::from_utf8_lossy(&err).into_owned();
        let mut exit_code = match (&report, limit) {
            (_, Some(LimitHit::Timeout)) => -1,
            (Some(HelperReport::Exited { code }), _) => *code,
            (Some(HelperReport::Signaled { signal }), _) => 128 + signal,
            (Some(HelperReport::SetupFailed { message }), _) => {
                return Err(RunError::Setup(message.clone()));
            }
            (None, _) => 137,
        };
        if limit.is_none() && exit_code != 0 {
            limit = classify_failure(cgroup, runtime.language, &stderr_text);
        }
        if limit == Some(LimitHit::Output) && exit_code == 0 {
            exit_code = 137;
        }
        let error = describe_error(exit_code, &stderr_text, limit, &req.limits);
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
    cgroup: Option<&RunCgroup>,
    language: Language,
    stderr: &str,
) -> Option<LimitHit> {
    if let Some(cg) = cgroup {
        if cg.oom_killed() {
            return Some(LimitHit::Memory);
        }
        if cg.pids_limit_hit() {
            return Some(LimitHit::Processes);
        }
    }
    let tail = &stderr[stderr.len().saturating_sub(4096)..];
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

/// Removes the run's cgroup after the run (off the async threads: removal may wait for
/// the kernel to finish tearing processes down).
struct CgroupGuard(Option<RunCgroup>);

impl CgroupGuard {
    async fn remove(mut self) {
        if let Some(cg) = self.0.take() {
            let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
        }
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Some(cg) = self.0.take() {
            cg.remove();
        }
    }
}

pub fn chroot_dir(state_dir: &std::path::Path, language: Language) -> PathBuf {
    state_dir.join(format!("root-{language}"))
}

/// Discover every language's interpreter. A language whose interpreter was configured
/// explicitly and does not run is an error; one left to the default is only disabled.
pub fn discover_runtimes(
    config: &Config,
) -> Result<HashMap<Language, Result<Runtime, String>>, crate::runner::DiscoveryError> {
    let mut map = HashMap::new();
    let sys = &config.system_lib_requirements;
    match python::discover(&config.python_path, sys) {
        Ok(rt) => {
            map.insert(Language::Python3, Ok(rt));
        }
        Err(e) if config.python_path_explicit => return Err(e),
        Err(e) => {
            map.insert(Language::Python3, Err(e.to_string()));
        }
    }
    match nodejs::discover(&config.nodejs_path, sys) {
        Ok(rt) => {
            map.insert(Language::Nodejs, Ok(rt));
        }
        Err(e) if config.nodejs_path_explicit => return Err(e),
        Err(e) => {
            map.insert(Language::Nodejs, Err(e.to_string()));
        }
    }
    Ok(map)
}
