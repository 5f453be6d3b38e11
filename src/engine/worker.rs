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
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::RunError;
use super::capture::{DRAIN, EXIT_GRACE, join_reader, read_capped};
use super::outcome::{Counters, Ending, LimitHit};
use super::warm::Idle;
use super::watch;
use crate::isolation::cgroup::RunCgroup;
use crate::isolation::helper::HelperReport;
use crate::isolation::net::netns::NetLease;
use crate::isolation::spec::SandboxSpec;
use crate::isolation::uids::{UidLease, processes_of};
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
    /// The exit status a run announced and was answered on while its processes may still
    /// run: `release` holds it to the owner's own report.
    announced: Option<i32>,
    /// The helper's reports (lines on the channel) read so far and not yet taken.
    reports: ReportLines,
    /// The run announced an end but kept its output open, and was killed for it.
    lied: bool,
    /// `until_gone` saw every process of the run gone, its owner included.
    owner_gone: bool,
    /// The run's private directory on the host, under the chroot level (which has no
    /// private tmpfs to vanish with the run).
    chroot_tmp: Option<PathBuf>,
    /// The host directory bound at the run's /tmp/out, if any: on the host's disk, not
    /// in the size-limited tmpfs, so its size is watched.
    out_dir: Option<PathBuf>,
    /// The write end of the run's stdin pipe, until the run starts (see `stdin`).
    stdin: Option<OwnedFd>,
    /// The run's worker slot while it runs: held until its last process is gone, even
    /// when the request is dropped before that (see `Drop`).
    slot: Option<OwnedSemaphorePermit>,
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
            let spec_json =
                serde_json::to_vec(&spec.jail).map_err(|e| RunError::Setup(e.to_string()))?;
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
                announced: None,
                reports: ReportLines::default(),
                lied: false,
                owner_gone: false,
                chroot_tmp,
                out_dir: spec.out_dir.clone(),
                stdin: Some(stdin),
                slot: None,
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
            announced: None,
            reports: ReportLines::default(),
            lied: false,
            owner_gone: false,
            chroot_tmp: None,
            out_dir: None,
            stdin: Some(pipes.stdin),
            slot: None,
        }
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

    /// Send `frame` (see `isolation::snippet`) and collect the output, each stream
    /// capped at `cap` bytes, until the run ends or `timeout` passes. With `early_answer`
    /// a run that announced its end (its output closed) is answered at once and held to
    /// it by `release`; without, the run is watched until its owner says how it really
    /// ended.
    pub async fn run(
        &mut self,
        frame: &[u8],
        limits: RunBounds,
        watch: Watch,
        sink: Option<Sink>,
        cancel: Option<CancellationToken>,
    ) -> Result<Collected, RunError> {
        let RunBounds {
            timeout,
            output_cap: cap,
            early_answer,
        } = limits;
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
        let (owner, reports) = (&mut self.owner, &mut self.reports);
        let talk = async {
            // The run may fail before reading everything; its report says why.
            let _ = code_wr.write_all(frame).await;
            let _ = code_wr.shutdown().await;
            let first = match &mut *owner {
                // The helper's report: sent once the run has ended, or once it announced
                // its end with its output closed (then a second one when it is gone).
                Owner::Helper(_) => reports.next(&mut status_rd).await,
                Owner::Keeper { report, .. } => {
                    // The run's fd 3: the acknowledgement, then perhaps its announced end.
                    let mut text = Vec::new();
                    let _ = (&mut status_rd)
                        .take(snippet::CHANNEL_CAP)
                        .read_to_end(&mut text)
                        .await;
                    if let Some(code) = snippet::announced_end(&text) {
                        return Some(HelperReport::Announced { code });
                    }
                    let acknowledged = text.first() == Some(&snippet::ACK);
                    match read_report(report).await {
                        Some(r @ HelperReport::SetupFailed { .. }) => Some(r),
                        Some(_) | None if !acknowledged => Some(HelperReport::EndedBeforeCode),
                        other => other,
                    }
                }
            };
            if early_answer || !matches!(first, Some(HelperReport::Announced { .. })) {
                return first;
            }
            // Without an early answer the run's limits stay watched until it is gone.
            match owner {
                Owner::Helper(_) => reports.next(&mut status_rd).await,
                Owner::Keeper { report, .. } => read_report(report).await,
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
        let mut killed = false;
        let mut stopped_for = None;
        let report = tokio::select! {
            r = talk => r,
            _ = tokio::time::sleep(timeout) => { stopped_for = Some(LimitHit::Timeout); None }
            _ = overflow.notified() => { stopped_for = Some(LimitHit::Output); None }
            _ = memory => { stopped_for = Some(LimitHit::Memory); None }
            _ = disk => { stopped_for = Some(LimitHit::Disk); None }
            _ = cancelled(cancel.as_ref()) => { killed = true; None }
        };
        // A report comes once the run is gone, or once it announced its end with its
        // output closed; then the owner's own report is awaited after the answer, by
        // `release`.
        let reported = report.is_some();
        if stopped_for.is_some() || killed {
            self.stop().await;
        } else if !reported {
            let _ = tokio::time::timeout(DRAIN, self.owner.wait()).await;
        }
        let readers = futures::future::join(join_reader(stdout), join_reader(stderr));
        let ((out, out_over), (err, err_over)) = if reported {
            // Both streams end now, or the run did not end as it said and is stopped.
            tokio::pin!(readers);
            match tokio::time::timeout(EXIT_GRACE, &mut readers).await {
                Ok(both) => both,
                Err(_) => {
                    self.lied = true;
                    self.kill_tree();
                    readers.await
                }
            }
        } else {
            readers.await
        };
        if self.lied {
            tracing::warn!(
                uid = self.uid,
                "a run announced its end but kept its output open; killed"
            );
        }
        self.ended_cleanly = stopped_for.is_none() && reported && !self.lied;
        if stopped_for.is_none() && (out_over || err_over) {
            stopped_for = Some(LimitHit::Output);
        }
        let ending = match report {
            // Its end was not the one it announced: the server's kill.
            Some(HelperReport::Announced { .. }) if self.lied => Ending::Killed,
            Some(HelperReport::Announced { code }) => {
                self.announced = Some(code);
                Ending::Exited(code)
            }
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

    /// SIGKILL everything of the run. Where a cgroup holds the run, its owner is spared
    /// to reap the run and exit by itself (see `RunCgroup::kill_all_but`); without one,
    /// the owner's death takes the run along (its parent-death signal).
    fn kill_tree(&mut self) {
        match (&self.cgroup, self.owner.pid()) {
            (Some(cg), Some(owner)) => cg.kill_all_but(owner),
            (cg, _) => {
                self.owner.start_kill();
                if let Some(cg) = cg {
                    cg.kill_all();
                }
            }
        }
    }

    /// Kill the run and wait for its owner; an owner that does not go is killed too.
    async fn stop(&mut self) {
        self.kill_tree();
        // A helper leaves once the server's side of its channel is shut.
        let _ = self.channel.shutdown().await;
        if tokio::time::timeout(DRAIN, self.owner.wait())
            .await
            .is_err()
        {
            self.owner.start_kill();
            if let Some(cg) = &self.cgroup {
                cg.kill_all();
            }
            let _ = tokio::time::timeout(DRAIN, self.owner.wait()).await;
        }
    }

    /// Once every process of the run is gone: remove the cgroup, the network and private
    /// files, then give the uid back (dropping the lease last). A run answered on its
    /// announced end is held to it: its owner must report the same end within
    /// `EXIT_GRACE`, or the run is killed now, and either way its network is not kept.
    pub async fn release(mut self) -> Aftermath {
        let aftermath = self.until_gone().await;
        self.free(aftermath).await;
        aftermath
    }

    /// Until every process of the run is gone (see `release`).
    pub async fn until_gone(&mut self) -> Aftermath {
        let mut aftermath = match self.lied {
            true => Aftermath::FalseEnd,
            false => Aftermath::Ended,
        };
        let gone = match self.announced {
            Some(said) => match tokio::time::timeout(EXIT_GRACE, self.real_end()).await {
                Ok(real) => {
                    if real != Some(HelperReport::Exited { code: said }) {
                        tracing::warn!(uid = self.uid, announced = said, real = ?real, "a run announced an end it did not make");
                        aftermath = Aftermath::FalseEnd;
                    }
                    true
                }
                Err(_) => false,
            },
            None => tokio::time::timeout(EXIT_GRACE, self.owner.wait())
                .await
                .is_ok(),
        };
        if !gone {
            if self.announced.is_some() {
                tracing::warn!(
                    uid = self.uid,
                    "a run kept running after its announced end; killed after its answer"
                );
                aftermath = Aftermath::KilledAfterAnswer;
            }
            self.stop().await;
        }
        // Whatever ended by itself and still left a process behind was not over either.
        if !self.wait_until_empty().await && self.ended_cleanly && aftermath == Aftermath::Ended {
            tracing::warn!(
                uid = self.uid,
                "a run left processes behind its end; killed"
            );
            aftermath = Aftermath::KilledAfterAnswer;
        }
        aftermath
    }

    /// Free what the run held once it is gone; its network is kept for another run only
    /// when it ended as it said and left no trace.
    pub async fn free(mut self, aftermath: Aftermath) {
        if let Some(cg) = self.cgroup.take() {
            let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
        }
        if let Some(net) = self.network.take() {
            let keep = self.ended_cleanly && aftermath == Aftermath::Ended;
            net.release(self.lease.take(), keep).await;
        }
        if let Some(dir) = self.chroot_tmp.take() {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        }
    }

    /// The owner's report of how the run really ended, once it is gone.
    async fn real_end(&mut self) -> Option<HelperReport> {
        let real = match &mut self.owner {
            Owner::Helper(_) => self.reports.next(&mut self.channel).await,
            Owner::Keeper { report, .. } => read_report(report).await,
        };
        self.owner.wait().await;
        real
    }

    /// Whether no process of the run is left: its cgroup is empty, or, at the chroot
    /// level without one (no pid namespace to take them down), its uid runs nothing.
    fn is_empty(&self) -> bool {
        match &self.cgroup {
            Some(cg) => cg.is_empty(),
            None if self.chroot_tmp.is_some() => processes_of(self.uid).is_empty(),
            None => true,
        }
    }

    /// Until no process of the run is left, killing what stays: false when something
    /// had to be killed (or would not go). Seen empty, the owner is known gone.
    async fn wait_until_empty(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + DRAIN;
        let mut pause = Duration::from_millis(1);
        let mut killed = false;
        while !self.is_empty() {
            if tokio::time::Instant::now() >= deadline {
                tracing::error!(uid = self.uid, "a run's processes would not go");
                return false;
            }
            // The owner's exit takes the run's pid namespace down; give the kernel a
            // moment before killing what is left.
            if pause >= Duration::from_millis(16) {
                killed = true;
                self.kill_tree();
                if self.cgroup.is_none() {
                    for pid in processes_of(self.uid) {
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    }
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        self.owner_gone = true;
        !killed
    }

    /// Kill a worker that will not run anything and free what it held.
    pub async fn discard(mut self) {
        self.stop().await;
        self.release().await;
    }
}

/// How a run's processes ended after its answer, as `release` found them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aftermath {
    /// As reported: nothing of the run outlived its end.
    Ended,
    /// It announced an end and then exited otherwise (another status, a signal).
    FalseEnd,
    /// It was still running after its announced end (or its owner's), and was killed.
    KilledAfterAnswer,
}

/// The bounds `Worker::run` holds a run to.
#[derive(Debug, Clone, Copy)]
pub struct RunBounds {
    pub timeout: Duration,
    /// Bytes kept of each output stream; more stops the run.
    pub output_cap: usize,
    /// Answer on a run's announced end (see `Worker::run`).
    pub early_answer: bool,
}

/// The helper's reports, one JSON line each, read as they come: bytes past a line are
/// kept for the next one.
#[derive(Default)]
struct ReportLines {
    pending: Vec<u8>,
}

impl ReportLines {
    /// The next whole report; None when the helper closed its side first.
    async fn next(&mut self, from: &mut (impl AsyncRead + Unpin)) -> Option<HelperReport> {
        let mut chunk = [0u8; 512];
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return serde_json::from_slice(line.trim_ascii()).ok();
            }
            match from.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    let rest = std::mem::take(&mut self.pending);
                    return serde_json::from_slice(rest.trim_ascii()).ok();
                }
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Until `cancel` is cancelled; never without one.
async fn cancelled(cancel: Option<&CancellationToken>) {
    match cancel {
        Some(c) => c.cancelled().await,
        None => std::future::pending().await,
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
        // A keeper is not our child: nothing kills it on drop but this. One seen gone is
        // not signalled: its pid may be another process's by now.
        if !self.owner_gone
            && (matches!(self.owner, Owner::Keeper { .. })
                || self.cgroup.is_some()
                || self.network.is_some()
                || self.chroot_tmp.is_some())
        {
            self.owner.start_kill();
        }
        // What the run held is given back once its cgroup is empty and gone: its private
        // directory, network and uid, its slot last.
        let (slot, cgroup, tmp) = (self.slot.take(), self.cgroup.take(), self.chroot_tmp.take());
        let (network, lease) = (self.network.take(), self.lease.take());
        // Removing a cgroup or a directory takes a while: not on the runtime's thread.
        let busy = cgroup.is_some() || tmp.is_some();
        let release = move || {
            if let Some(cg) = cgroup {
                cg.remove();
            }
            if let Some(dir) = tmp {
                let _ = std::fs::remove_dir_all(dir);
            }
            match (network, tokio::runtime::Handle::try_current()) {
                (Some(net), Ok(rt)) => {
                    rt.spawn(async move {
                        net.release(lease, false).await;
                        drop(slot);
                    });
                }
                _ => drop((lease, slot)),
            }
        };
        match (busy, tokio::runtime::Handle::try_current()) {
            (true, Ok(rt)) => {
                let _ = std::thread::spawn(move || {
                    let _guard = rt.enter();
                    release();
                });
            }
            _ => release(),
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
