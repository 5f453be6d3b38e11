//! The Python fork server: one interpreter that has imported what Dify's payloads use
//! (json, base64, jinja2 and its template compiler, `python_preload_modules`) and forks
//! once per run, so a run pays neither an interpreter's start nor those imports. The
//! fork server itself (`runtime/zygote.py`, started by `sandbox __zygote`) never runs a
//! snippet: each fork carries out the run's jail, the same steps a helper's run carries
//! out (its own cgroup, namespaces, root, uid, rlimits, no_new_privs), up to a seccomp
//! filter that refuses every exec, before it reads a byte of its snippet.
//!
//! Requests travel on a socket, framed like the helper's jail (see `channel`), with the
//! run's descriptors alongside: stdout and stderr pipes, fd 3, the keeper's report pipe,
//! stdin pipe and network namespace, if any. While the fork server is down, runs go to
//! plain workers and it is restarted in the background.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::worker::ForkedPipes;
use super::{RunError, SetupError};
use crate::isolation::cgroup::CgroupDriver;
use crate::isolation::channel;
use crate::isolation::jail::{Jail, Op};
use crate::isolation::spec::SandboxSpec;
use crate::isolation::zygote::ZygoteSpec;
use crate::runtime::Runtime;

/// The fork server's code.
const ZYGOTE: &str = include_str!("../runtime/zygote.py");
/// The executor of a jail's steps, the Python twin of `isolation::jail::execute`.
pub const JAIL: &str = include_str!("../runtime/jail.py");
/// How long the fork server may take to import its modules and say it is ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What the fork server is built from, kept to restart it.
pub struct Recipe {
    pub spec: ZygoteSpec,
    /// The first message on its control socket (see `Config`).
    config: Vec<u8>,
}

/// The fork server's configuration message.
#[derive(Serialize)]
struct Config<'a> {
    sys_path: &'a [String],
    preload: &'a [String],
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    ready: bool,
    pid: Option<i32>,
    refused: Option<String>,
}

/// One run's request, as the fork server reads it.
#[derive(Serialize)]
struct Request<'a> {
    jail: &'a Jail,
}

impl Recipe {
    pub fn new(
        runtime: &Runtime,
        mount_point: PathBuf,
        cgroup: Option<&CgroupDriver>,
        preload: &[String],
        readonly_beneath: bool,
    ) -> Result<Self, serde_json::Error> {
        let config = serde_json::to_vec(&Config {
            sys_path: &runtime.search_path,
            preload,
        })?;
        let cgroup_bases = cgroup.map(CgroupDriver::bases).unwrap_or_default();
        let program = runtime.program.clone();
        let code = crate::isolation::snippet::with_markers(
            &ZYGOTE
                .replace("__FRAME__", crate::runtime::python::FRAME)
                .replace("__JAIL__", JAIL),
        );
        // Isolated, no site, no bytecode written, unbuffered, UTF-8.
        let flags = ["-I", "-S", "-B", "-u", "-X", "utf8", "-c"];
        let mut argv = vec![program.to_string_lossy().into_owned()];
        argv.extend(flags.map(String::from));
        argv.push(code);
        Ok(Self {
            spec: ZygoteSpec {
                root_dir: mount_point.clone(),
                root: runtime.root.clone(),
                // The host's files, as a helper's run's root has them: each run's root
                // is built from these and writes its own over them.
                root_files: Vec::new(),
                cgroup_dirs: cgroup_bases,
                run_root_dir: mount_point,
                readonly_beneath,
                program,
                argv,
                // A forked run's /proc/self/environ is this one: the start of every
                // run's own (the rest, proxies say, is in its os.environ only).
                env: super::plan::base_env(std::path::Path::new("/tmp"), runtime),
            },
            config,
        })
    }
}

/// A running fork server.
struct Zygote {
    child: tokio::process::Child,
    control: UnixStream,
    /// Runs it has forked.
    forked: u32,
}

/// Runs one fork server forks before it is replaced. Its runs share its address-space
/// layout and str hash seed; a replacement draws new ones, so no layout outlives this
/// many runs. A replacement costs one interpreter start with the preloads (about 0.3 s
/// of CPU), under 1 ms per run.
pub const FORKS_PER_FORK_SERVER: u32 = 500;

/// The fork server, when one runs, and how to start another.
pub struct ForkServer {
    recipe: Recipe,
    running: Mutex<Option<Zygote>>,
    /// Forked runs that could not start, in a row.
    failures: std::sync::atomic::AtomicU32,
    /// Put out of use: its runs kept failing to start.
    disabled: std::sync::atomic::AtomicBool,
}

/// Forked runs failing to start in a row before the fork server is put out of use.
const FAILURES_TO_DISABLE: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ForkServerError {
    #[error("the fork server cannot start: {0}")]
    Start(String),
    #[error("the fork server refused: {0}")]
    Refused(String),
    #[error("the fork server is gone: {0}")]
    Gone(String),
}

impl ForkServer {
    /// Start it and wait until it is ready.
    pub async fn start(recipe: Recipe) -> Result<Self, ForkServerError> {
        let zygote = launch(&recipe).await?;
        Ok(Self {
            recipe,
            running: Mutex::new(Some(zygote)),
            failures: std::sync::atomic::AtomicU32::new(0),
            disabled: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Count a forked run's start: a fork server whose runs keep failing to start serves
    /// no more (each failed run is run again in a fresh interpreter).
    pub fn record(&self, started: bool) {
        use std::sync::atomic::Ordering;
        if started {
            self.failures.store(0, Ordering::Relaxed);
            return;
        }
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= FAILURES_TO_DISABLE
            && !self.disabled.swap(true, Ordering::AcqRel)
        {
            tracing::error!(
                "the Python fork server's runs keep failing to start: it is out of use until the server restarts; Python runs start their own interpreters"
            );
            *self.lock() = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Zygote>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether it may still serve (it was not put out of use).
    pub fn in_use(&self) -> bool {
        !self.disabled.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether a fork server runs now.
    pub fn up(&self) -> bool {
        if self.disabled.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        let mut running = self.lock();
        match running.as_mut() {
            Some(z) => {
                if matches!(z.child.try_wait(), Ok(None)) {
                    true
                } else {
                    *running = None;
                    false
                }
            }
            None => false,
        }
    }

    /// Whether it has forked its share of runs and wants replacing (see
    /// `FORKS_PER_FORK_SERVER`); it goes on serving until the replacement is ready.
    pub fn worn_out(&self) -> bool {
        self.lock()
            .as_ref()
            .is_some_and(|z| z.forked >= FORKS_PER_FORK_SERVER)
    }

    /// Start a new fork server in place of one that is gone or worn out.
    pub async fn restart(&self) -> Result<(), ForkServerError> {
        if self.disabled.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ForkServerError::Refused("out of use".into()));
        }
        let zygote = launch(&self.recipe).await?;
        *self.lock() = Some(zygote);
        Ok(())
    }

    /// Fork the run of `spec`: its sandbox waits for the snippet on the returned
    /// channel. `netns` is the run's own network namespace, when it has one.
    pub async fn fork(
        self: &std::sync::Arc<Self>,
        spec: &SandboxSpec,
        netns: Option<OwnedFd>,
    ) -> Result<(nix::unistd::Pid, ForkedPipes), RunError> {
        let request = self.request(spec)?;
        let (ours, theirs) = UnixStream::pair().map_err(RunError::Spawn)?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let (report_r, report_w) = pipe()?;
        let (stdin_r, stdin_w) = super::stdin::pipe()?;
        let this = self.clone();
        let pid = tokio::task::spawn_blocking(move || {
            // The order zygote.py reads them in.
            let mut fds: Vec<BorrowedFd<'_>> = vec![
                out_w.as_fd(),
                err_w.as_fd(),
                theirs.as_fd(),
                report_w.as_fd(),
                stdin_r.as_fd(),
            ];
            if let Some(ns) = &netns {
                fds.push(ns.as_fd());
            }
            this.send(&request, &fds)
        })
        .await
        .map_err(|e| SetupError::ForkServer(e.into()))?
        .map_err(|e| SetupError::ForkServer(e.into()))?;
        ours.set_nonblocking(true).map_err(RunError::Spawn)?;
        let pipes = ForkedPipes {
            channel: tokio::net::UnixStream::from_std(ours).map_err(RunError::Spawn)?,
            stdout: receiver(out_r)?,
            stderr: receiver(err_r)?,
            report: receiver(report_r)?,
            stdin: stdin_w,
        };
        Ok((nix::unistd::Pid::from_raw(pid), pipes))
    }

    fn request(&self, spec: &SandboxSpec) -> Result<Vec<u8>, RunError> {
        if !matches!(spec.jail.run.last(), Some(Op::Start { .. })) {
            // A jail that ends in an exec is a helper's: its filter admits that exec.
            return Err(SetupError::NotPlannedForFork.into());
        }
        serde_json::to_vec(&Request { jail: &spec.jail }).map_err(|e| SetupError::Encode(e).into())
    }

    /// One request and its answer (the keeper's pid), on the blocking control socket.
    fn send(&self, request: &[u8], fds: &[BorrowedFd<'_>]) -> Result<i32, ForkServerError> {
        let mut running = self.lock();
        let Some(zygote) = running.as_mut() else {
            return Err(ForkServerError::Gone("not running".into()));
        };
        let exchanged = channel::send_message(&zygote.control, request, fds)
            .map_err(|e| e.to_string())
            .and_then(|()| channel::recv_message(&zygote.control).map_err(|e| e.to_string()));
        let answer = match exchanged {
            Ok(a) => a,
            Err(e) => {
                *running = None;
                return Err(ForkServerError::Gone(e));
            }
        };
        match serde_json::from_slice::<Answer>(&answer) {
            Ok(Answer { pid: Some(pid), .. }) => {
                zygote.forked += 1;
                Ok(pid)
            }
            Ok(Answer {
                refused: Some(why), ..
            }) => {
                *running = None;
                Err(ForkServerError::Refused(why))
            }
            _ => {
                *running = None;
                Err(ForkServerError::Gone(format!(
                    "unreadable answer {}",
                    String::from_utf8_lossy(&answer)
                )))
            }
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), RunError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| RunError::Spawn(std::io::Error::from(e)))
}

fn receiver(fd: OwnedFd) -> Result<tokio::net::unix::pipe::Receiver, RunError> {
    tokio::net::unix::pipe::Receiver::from_owned_fd(fd).map_err(RunError::Spawn)
}

/// Start `sandbox __zygote` and wait for the fork server to say it is ready.
async fn launch(recipe: &Recipe) -> Result<Zygote, ForkServerError> {
    let start = |e: std::io::Error| ForkServerError::Start(e.to_string());
    let (ours, theirs) = UnixStream::pair().map_err(start)?;
    let spec =
        serde_json::to_vec(&recipe.spec).map_err(|e| ForkServerError::Start(e.to_string()))?;
    channel::send_message(&ours, &spec, &[]).map_err(start)?;
    channel::send_message(&ours, &recipe.config, &[]).map_err(start)?;
    let child = tokio::process::Command::new("/proc/self/exe")
        .arg("__zygote")
        .env_clear()
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(start)?;
    let (control, answer) = tokio::task::spawn_blocking(move || {
        let _ = ours.set_read_timeout(Some(START_TIMEOUT));
        let answer = channel::recv_message(&ours);
        let _ = ours.set_read_timeout(None);
        (ours, answer)
    })
    .await
    .map_err(|e| ForkServerError::Start(e.to_string()))?;
    let answer = answer.map_err(|e| {
        ForkServerError::Start(format!(
            "it ended before it was ready ({e}); see its message above"
        ))
    })?;
    match serde_json::from_slice::<Answer>(&answer) {
        Ok(Answer { ready: true, .. }) => Ok(Zygote {
            child,
            control,
            forked: 0,
        }),
        Ok(Answer {
            refused: Some(why), ..
        }) => Err(ForkServerError::Refused(why)),
        _ => Err(ForkServerError::Start(format!(
            "unreadable answer {}",
            String::from_utf8_lossy(&answer)
        ))),
    }
}
