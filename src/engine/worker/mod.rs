//! One worker: a sandbox started for a single run, its interpreter waiting for the
//! snippet. Two kinds of process own a run: the `__exec` helper (started for it), or a
//! fork server's keeper (forked for it; see `forkserver`). What the run holds on the
//! host is its `RunResources`, held by the worker until the run is over.
//!
//! - here: starting a worker (the helper spawned, or a keeper's ends taken over);
//! - `protocol`: the run itself: the frame sent, the output read capped, the owner's
//!   reports, the limits watched;
//! - `teardown`: the run's end: killing, waiting until no process of it is left, then
//!   giving its resources back (from `Drop` too).

mod protocol;
mod teardown;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::OwnedSemaphorePermit;

use protocol::ReportLines;
pub use protocol::{RunBounds, Watch};
pub use teardown::Aftermath;

use super::resources::RunResources;
use super::warm::Idle;
use super::{RunError, SetupError};
use crate::isolation::channel;
use crate::isolation::spec::SandboxSpec;

/// The helper is this very binary (`sandbox __exec`).
const HELPER: &str = "/proc/self/exe";

/// An output stream of a run, whoever owns it.
type Output = Box<dyn AsyncRead + Send + Unpin>;

/// The process that owns a run and reports how it ended.
enum Owner {
    /// The `__exec` helper: the channel carries the snippet in and its report out.
    Helper(tokio::process::Child),
    /// A fork server's keeper: the channel is the run's own fd 3 (the snippet in, its
    /// acknowledgement out); the keeper reports on a pipe of its own.
    Keeper {
        pid: nix::unistd::Pid,
        report: tokio::net::unix::pipe::Receiver,
    },
}

impl Owner {
    fn pid(&self) -> Option<u32> {
        match self {
            Self::Helper(child) => child.id(),
            Self::Keeper { pid, .. } => u32::try_from(pid.as_raw()).ok(),
        }
    }

    fn start_kill(&mut self) {
        match self {
            Self::Helper(child) => {
                let _ = child.start_kill();
            }
            Self::Keeper { pid, .. } => {
                let _ = nix::sys::signal::kill(*pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    /// Until the owner is gone (its report pipe closes, for a keeper).
    async fn wait(&mut self) {
        match self {
            Self::Helper(child) => {
                let _ = child.wait().await;
            }
            Self::Keeper { report, .. } => {
                let mut rest = Vec::new();
                let _ = report.read_to_end(&mut rest).await;
            }
        }
    }
}

/// A sandbox whose interpreter is started and waits for its snippet on fd 3. Used for
/// exactly one run; dropping it kills the owner (and through it the interpreter), and
/// the run's resources go back once nothing of it is left (see `teardown`).
pub struct Worker {
    owner: Owner,
    channel: tokio::net::UnixStream,
    stdout: Option<Output>,
    stderr: Option<Output>,
    /// What the run holds on the host, given back once it is over.
    resources: RunResources,
    uid: u32,
    /// The run ended by itself and its owner was seen gone: nothing of it is left, so its
    /// network namespace may serve another run.
    ended_cleanly: bool,
    /// The exit status a run announced and was answered on while its processes may still
    /// run: `until_gone` holds it to the owner's own report.
    announced: Option<i32>,
    /// The helper's reports (lines on the channel) read so far and not yet taken.
    reports: ReportLines,
    /// The run announced an end but kept its output open, and was killed for it.
    lied: bool,
    /// `until_gone` saw every process of the run gone, its owner included.
    owner_gone: bool,
    /// The write end of the run's stdin pipe, until the run starts (see `stdin`).
    stdin: Option<OwnedFd>,
    /// The run's worker slot while it runs: held until its last process is gone, even
    /// when the request is dropped before that (see `Drop`).
    slot: Option<OwnedSemaphorePermit>,
    /// The package generation bound into its root, if any.
    packages: Option<PathBuf>,
}

/// The ends a run forked by a fork server leaves to the server.
pub struct ForkedPipes {
    pub channel: tokio::net::UnixStream,
    pub stdout: tokio::net::unix::pipe::Receiver,
    pub stderr: tokio::net::unix::pipe::Receiver,
    pub report: tokio::net::unix::pipe::Receiver,
    /// The write end of the run's stdin pipe.
    pub stdin: OwnedFd,
}

impl Worker {
    /// Start the helper for `spec` with the run's `resources` (its own network
    /// namespace, if any, goes to the helper); the interpreter waits for its snippet
    /// from then on. The resources are the worker's from here, given back with it; if
    /// the helper cannot start, their own `Drop` gives them back.
    pub fn spawn(spec: &SandboxSpec, resources: RunResources) -> Result<Self, RunError> {
        let spec_json = serde_json::to_vec(&spec.jail).map_err(SetupError::Encode)?;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(RunError::Spawn)?;
        let (stdin_read, stdin_write) = super::stdin::pipe()?;
        // Sent before the helper starts: the socket's buffer holds it, and the spec
        // never appears on a command line. The order is `channel`'s.
        let mut fds = vec![stdin_read.as_fd()];
        fds.extend(resources.netns());
        channel::send_message(&ours, &spec_json, &fds).map_err(RunError::Spawn)?;
        drop(fds);
        drop(stdin_read);
        let mut child = tokio::process::Command::new(HELPER)
            .arg("__exec")
            .env_clear()
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(RunError::Spawn)?;
        ours.set_nonblocking(true).map_err(RunError::Spawn)?;
        let channel = tokio::net::UnixStream::from_std(ours).map_err(RunError::Spawn)?;
        let stdout = child.stdout.take().map(|s| Box::new(s) as Output);
        let stderr = child.stderr.take().map(|s| Box::new(s) as Output);
        Ok(Self::new(
            Owner::Helper(child),
            channel,
            (stdout, stderr),
            resources,
            stdin_write,
        ))
    }

    /// A worker whose run a fork server's keeper (`keeper`) owns: `channel` is the run's
    /// fd 3, the other pipes its output and the keeper's report.
    pub fn forked(keeper: nix::unistd::Pid, pipes: ForkedPipes, resources: RunResources) -> Self {
        Self::new(
            Owner::Keeper {
                pid: keeper,
                report: pipes.report,
            },
            pipes.channel,
            (Some(Box::new(pipes.stdout)), Some(Box::new(pipes.stderr))),
            resources,
            pipes.stdin,
        )
    }

    fn new(
        owner: Owner,
        channel: tokio::net::UnixStream,
        (stdout, stderr): (Option<Output>, Option<Output>),
        resources: RunResources,
        stdin: OwnedFd,
    ) -> Self {
        Self {
            owner,
            channel,
            stdout,
            stderr,
            uid: resources.uid(),
            resources,
            ended_cleanly: false,
            announced: None,
            reports: ReportLines::default(),
            lied: false,
            owner_gone: false,
            stdin: Some(stdin),
            slot: None,
            packages: None,
        }
    }

    /// Note the package generation its root holds.
    pub fn with_packages(mut self, packages: Option<PathBuf>) -> Self {
        self.packages = packages;
        self
    }

    /// The package generation its root holds.
    pub fn packages(&self) -> Option<&Path> {
        self.packages.as_deref()
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Whether a fork server's keeper owns the run.
    pub fn is_forked(&self) -> bool {
        matches!(self.owner, Owner::Keeper { .. })
    }

    /// Hold the run's worker slot until its last process is gone (see `take_slot`).
    pub fn hold_slot(&mut self, slot: Option<OwnedSemaphorePermit>) {
        self.slot = slot;
    }

    /// The worker slot back, once `until_gone` has returned.
    pub fn take_slot(&mut self) -> Option<OwnedSemaphorePermit> {
        self.slot.take()
    }

    /// The write end of the run's stdin pipe (once): feed it, or drop it for end of input.
    pub fn take_stdin(&mut self) -> Option<OwnedFd> {
        self.stdin.take()
    }
}

impl Idle for Worker {
    /// Dead when the helper exited, or when it already sent its report (the
    /// interpreter ended, or its setup failed) before any snippet was sent.
    fn is_dead(&mut self) -> bool {
        match &mut self.owner {
            Owner::Helper(child) => {
                if !matches!(child.try_wait(), Ok(None)) {
                    return true;
                }
            }
            // The keeper writes only once its run has ended (or could not start).
            Owner::Keeper { report, .. } => {
                let mut byte = [0u8; 1];
                if !matches!(report.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                {
                    return true;
                }
            }
        }
        let mut byte = [0u8; 1];
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        !matches!(
            nix::sys::socket::recv(self.channel.as_raw_fd(), &mut byte, flags),
            Err(nix::errno::Errno::EAGAIN)
        )
    }
}
