//! One worker: a sandbox started for a single run, its interpreter waiting for the
//! snippet, and the protocol to talk to it (send the frame, read the capped output, read
//! how it ended). Two kinds of process own a run: the `__exec` helper (started for it),
//! or a fork server's keeper (forked for it; see `forkserver`).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use super::RunError;
use super::capture::{DRAIN, EXIT_GRACE, join_reader, read_capped};
use super::outcome::{Counters, Ending, LimitHit};
use super::warm::Idle;
use super::watch;
use crate::isolation::cgroup::RunCgroup;
use crate::isolation::helper::HelperReport;
use crate::isolation::net::netns::NetLease;
use crate::isolation::spec::SandboxSpec;
use crate::isolation::uids::UidLease;
use crate::isolation::{channel, snippet};

/// The helper is this very binary (`sandbox __exec`).
const HELPER: &str = "/proc/self/exe";

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Receives output as it is produced (used by `sandbox run` to stream to a terminal).
pub type Sink = Arc<dyn Fn(Stream, &[u8]) + Send + Sync>;

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
/// exactly one run; dropping it kills the owner (and through it the interpreter).
pub struct Worker {
    owner: Owner,
    channel: tokio::net::UnixStream,
    stdout: Option<Output>,
    stderr: Option<Output>,
    cgroup: Option<RunCgroup>,
    /// The run's network on the host (its own namespace's veth pair).
    network: Option<NetLease>,
    uid: u32,
    /// Given back after everything else, or kept with the run's namespace (see `release`).
    lease: Option<UidLease>,
    /// The run ended by itself and its owner was seen gone: nothing of it is left, so its
    /// network namespace may serve another run.
    ended_cleanly: bool,
    /// The run's private directory on the host, under the chroot level (which has no
    /// private tmpfs to vanish with the run).
    chroot_tmp: Option<PathBuf>,
    /// The host directory bound at the run's /tmp/out, if any: on the host's disk, not
    /// in the size-limited tmpfs, so its size is watched.
    out_dir: Option<PathBuf>,
    /// The write end of the run's stdin pipe, until the run starts (see `stdin`).
    stdin: Option<OwnedFd>,
}

/// The limits a worker enforces by watching (see `watch`), where the kernel does not.
#[derive(Debug, Clone, Copy, Default)]
pub struct Watch {
    /// Resident memory of the run's processes (no cgroup).
    pub memory_bytes: Option<u64>,
    /// The size of the run's directories on the host: its private directory (the chroot
    /// level) and its /tmp/out.
    pub disk_bytes: Option<u64>,
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

/// What a run left behind, before it is put into words (see `outcome::conclude`).
pub struct Collected {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub ending: Ending,
    /// The limit the server stopped the run for (timeout, output), if any.
    pub stopped_for: Option<LimitHit>,
    pub counters: Counters,
}

impl Worker {
    /// Start the helper for `spec` (and `netns`, the run's own network namespace); the
    /// interpreter waits for its snippet from then on. The cgroup, network and leases are
    /// the worker's from here: they are freed with it.
    pub fn spawn(
        spec: &SandboxSpec,
        netns: Option<OwnedFd>,
        lease: UidLease,
        network: Option<NetLease>,
        cgroup: Option<RunCgroup>,
        chroot_tmp: Option<PathBuf>,
    ) -> Result<Self, RunError> {
        let started = (|| {
            let spec_json = serde_json::to_vec(spec).map_err(|e| RunError::Setup(e.to_string()))?;
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(RunError::Spawn)?;
            let (stdin_read, stdin_write) = super::stdin::pipe()?;
            // Sent before the helper starts: the socket's buffer holds it, and the spec
            // never appears on a command line. The order is `channel`'s.
            let mut fds = vec![stdin_read.as_fd()];
            fds.extend(netns.as_ref().map(|f| f.as_fd()));
            channel::send_message(&ours, &spec_json, &fds).map_err(RunError::Spawn)?;
            drop(fds);
            drop((stdin_read, netns));
            let child = tokio::process::Command::new(HELPER)
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
            Ok::<_, RunError>((child, channel, stdin_write))
        })();
        match started {
            Ok((mut child, channel, stdin)) => Ok(Self {
                stdout: child.stdout.take().map(|s| Box::new(s) as Output),
                stderr: child.stderr.take().map(|s| Box::new(s) as Output),
                owner: Owner::Helper(child),
                channel,
                cgroup,
                network,
                uid: lease.uid,
                lease: Some(lease),
                ended_cleanly: false,
                chroot_tmp,
                out_dir: spec.out_dir.clone(),
                stdin: Some(stdin),
            }),
            Err(e) => {
                if let Some(cg) = cgroup {
                    cg.remove();
                }
                if let Some(net) = network {
                    tokio::spawn(net.release(None, false));
                }
                Err(e)
            }
        }
    }

    /// A worker whose run a fork server's keeper (`keeper`) owns: `channel` is the run's
    /// fd 3, the other pipes its output and the keeper's report.
    pub fn forked(
        keeper: nix::unistd::Pid,
        pipes: ForkedPipes,
        lease: UidLease,
        network: Option<NetLease>,
        cgroup: Option<RunCgroup>,
    ) -> Self {
        Self {
            owner: Owner::Keeper {
                pid: keeper,
                report: pipes.report,
            },
            channel: pipes.channel,
            stdout: Some(Box::new(pipes.stdout)),
            stderr: Some(Box::new(pipes.stderr)),
            cgroup,
            network,
            uid: lease.uid,
            lease: Some(lease),
            ended_cleanly: false,
            chroot_tmp: None,
            out_dir: None,
            stdin: Some(pipes.stdin),
        }
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Whether a fork server's keeper owns the run.
    pub fn is_forked(&self) -> bool {
        matches!(self.owner, Owner::Keeper { .. })
    }

    /// The write end of the run's stdin pipe (once): feed it, or drop it for end of input.
    pub fn take_stdin(&mut self) -> Option<OwnedFd> {
        self.stdin.take()
    }

    /// Send `frame` (see `isolation::snippet`) and collect the output, each stream
    /// capped at `cap` bytes, until the run ends or `timeout` passes.
    pub async fn run(
        &mut self,
        frame: &[u8],
        timeout: Duration,
        cap: usize,
        watch: Watch,
        sink: Option<Sink>,
    ) -> Result<Collected, RunError> {
        let overflow = Arc::new(Notify::new());
        let (out_sink, err_sink) = (sink.clone(), sink);
        let stdout = self.stdout.take().map(|s| {
            tokio::spawn(read_capped(
                s,
                cap,
                Stream::Stdout,
                out_sink,
                overflow.clone(),
            ))
        });
        let stderr = self.stderr.take().map(|s| {
            tokio::spawn(read_capped(
                s,
                cap,
                Stream::Stderr,
                err_sink,
                overflow.clone(),
            ))
        });

        let root = self.owner.pid();
        let (mut status_rd, mut code_wr) = self.channel.split();
        let owner = &mut self.owner;
        let talk = async {
            // The run may fail before reading everything; its report says why.
            let _ = code_wr.write_all(frame).await;
            let _ = code_wr.shutdown().await;
            match owner {
                // The helper's report: sent once the run has ended, or once it announced
                // its end with its output closed (the helper then waits for its exit).
                Owner::Helper(_) => read_report(&mut status_rd).await,
                Owner::Keeper { report, .. } => {
                    // The run's fd 3: the acknowledgement, then perhaps its announced end.
                    let mut text = Vec::new();
                    let _ = (&mut status_rd)
                        .take(snippet::CHANNEL_CAP)
                        .read_to_end(&mut text)
                        .await;
                    if let Some(code) = snippet::announced_end(&text) {
                        return Some(HelperReport::Exited { code });
                    }
                    let acknowledged = text.first() == Some(&snippet::ACK);
                    match read_report(report).await {
                        Some(r @ HelperReport::SetupFailed { .. }) => Some(r),
                        Some(_) | None if !acknowledged => Some(HelperReport::EndedBeforeCode),
                        other => other,
                    }
                }
            }
        };
        let memory = async {
            match (watch.memory_bytes, root) {
                (Some(limit), Some(root)) => watch::memory_over(root, limit).await,
                _ => std::future::pending().await,
            }
        };
        let watched: Vec<PathBuf> = self
            .chroot_tmp
            .iter()
            .chain(&self.out_dir)
            .cloned()
            .collect();
        let disk = async {
            match watch.disk_bytes {
                Some(limit) if !watched.is_empty() => watch::disk_over(watched, limit).await,
                _ => std::future::pending().await,
            }
        };
        let mut stopped_for = None;
        let report = tokio::select! {
            r = talk => r,
            _ = tokio::time::sleep(timeout) => { stopped_for = Some(LimitHit::Timeout); None }
            _ = overflow.notified() => { stopped_for = Some(LimitHit::Output); None }
            _ = memory => { stopped_for = Some(LimitHit::Memory); None }
            _ = disk => { stopped_for = Some(LimitHit::Disk); None }
        };
        if stopped_for.is_some() {
            self.kill_tree();
        }
        // A report comes once the run is gone, or once it announced its end with its
        // output closed; the owner's own exit is awaited after the answer, by `release`.
        let reported = report.is_some();
        if !reported {
            let _ = tokio::time::timeout(DRAIN, self.owner.wait()).await;
        }
        self.ended_cleanly = stopped_for.is_none() && reported;
        let readers = futures::future::join(join_reader(stdout), join_reader(stderr));
        let ((out, out_over), (err, err_over)) = if reported {
            // Both streams end now, or the run did not end as it said and is stopped.
            tokio::pin!(readers);
            match tokio::time::timeout(EXIT_GRACE, &mut readers).await {
                Ok(both) => both,
                Err(_) => {
                    self.kill_tree();
                    readers.await
                }
            }
        } else {
            readers.await
        };
        if stopped_for.is_none() && (out_over || err_over) {
            stopped_for = Some(LimitHit::Output);
        }
        let ending = match report {
            Some(HelperReport::Exited { code }) => Ending::Exited(code),
            Some(HelperReport::Signaled { signal }) => Ending::Signaled(signal),
            Some(HelperReport::SetupFailed { message }) => return Err(RunError::Setup(message)),
            Some(HelperReport::EndedBeforeCode) => return Err(RunError::EndedBeforeCode),
            None => Ending::Killed,
        };
        let counters = match &self.cgroup {
            Some(cg) => Counters {
                oom_killed: cg.oom_killed(),
                pids_limit_hit: cg.pids_limit_hit(),
            },
            None => Counters::default(),
        };
        Ok(Collected {
            stdout: out,
            stderr: err,
            ending,
            stopped_for,
            counters,
        })
    }

    /// SIGKILL the owner and everything left in the run's cgroup.
    fn kill_tree(&mut self) {
        self.owner.start_kill();
        if let Some(cg) = &self.cgroup {
            cg.kill_all();
        }
    }

    /// After the process tree is gone: remove the cgroup, the network and private files,
    /// then give the uid back (dropping the lease last).
    pub async fn release(mut self) {
        // The owner may still be exiting after the run's end was reported (a keeper is in
        // the run's cgroup); one that is not gone soon (its run announced an end it did
        // not make) is killed, and the run's network is not kept.
        let gone = tokio::time::timeout(EXIT_GRACE, self.owner.wait())
            .await
            .is_ok();
        if !gone {
            self.kill_tree();
            let _ = tokio::time::timeout(DRAIN, self.owner.wait()).await;
        }
        if let Some(cg) = self.cgroup.take() {
            let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
        }
        if let Some(net) = self.network.take() {
            net.release(self.lease.take(), self.ended_cleanly && gone)
                .await;
        }
        if let Some(dir) = self.chroot_tmp.take() {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        }
    }

    /// Kill a worker that will not run anything and free what it held.
    pub async fn discard(mut self) {
        self.owner.start_kill();
        let _ = tokio::time::timeout(DRAIN, self.owner.wait()).await;
        self.release().await;
    }
}

/// A helper's or keeper's report: read until it is whole, not until its sender exits.
async fn read_report(report: &mut (impl AsyncRead + Unpin)) -> Option<HelperReport> {
    let mut said = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        match report.read(&mut chunk).await {
            Ok(0) | Err(_) => return serde_json::from_slice(said.trim_ascii()).ok(),
            Ok(n) => said.extend_from_slice(&chunk[..n]),
        }
        if let Ok(whole) = serde_json::from_slice(said.trim_ascii()) {
            return Some(whole);
        }
    }
}

/// A worker dropped without `release` (its request was cancelled, say, because the client
/// went away): the helper is killed by `kill_on_drop`, and the cgroup is removed from a
/// plain thread, since Drop cannot wait.
impl Drop for Worker {
    fn drop(&mut self) {
        // A keeper is not our child: nothing kills it on drop but this.
        if matches!(self.owner, Owner::Keeper { .. })
            || self.cgroup.is_some()
            || self.network.is_some()
        {
            self.owner.start_kill();
        }
        if let Some(cg) = self.cgroup.take() {
            std::thread::spawn(move || cg.remove());
        }
        if let Some(net) = self.network.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(net.release(self.lease.take(), false));
        }
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
