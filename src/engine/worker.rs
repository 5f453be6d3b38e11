//! One worker: the `__exec` helper started for a single run, its interpreter waiting
//! for the snippet, and the protocol to talk to it (send the frame, read the capped
//! output, read the helper's report).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use super::RunError;
use super::outcome::{Counters, Ending, LimitHit};
use super::warm::Idle;
use crate::isolation::cgroup::RunCgroup;
use crate::isolation::channel;
use crate::isolation::helper::HelperReport;
use crate::isolation::net::netns::NetLease;
use crate::isolation::spec::SandboxSpec;
use crate::isolation::uids::UidLease;

/// The helper is this very binary (`sandbox __exec`).
const HELPER: &str = "/proc/self/exe";
/// How long the output readers may take to drain once the process tree is gone.
const DRAIN: Duration = Duration::from_secs(5);

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Receives output as it is produced (used by `sandbox run` to stream to a terminal).
pub type Sink = Arc<dyn Fn(Stream, &[u8]) + Send + Sync>;

/// A sandbox whose interpreter is started and waits for its snippet on fd 3. Used for
/// exactly one run; dropping it kills the helper (and through it the interpreter).
pub struct Worker {
    child: tokio::process::Child,
    channel: tokio::net::UnixStream,
    stdout: Option<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
    cgroup: Option<RunCgroup>,
    /// The run's network on the host (its own namespace's veth pair).
    network: Option<NetLease>,
    lease: UidLease,
    /// The run's private directory on the host, under the chroot level (which has no
    /// private tmpfs to vanish with the run).
    chroot_tmp: Option<PathBuf>,
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
            // Sent before the helper starts: the socket's buffer holds it, and the spec
            // never appears on a command line.
            channel::send_spec(&ours, &spec_json, netns.as_ref().map(|f| f.as_fd()))
                .map_err(RunError::Spawn)?;
            drop(netns);
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
            Ok::<_, RunError>((child, channel))
        })();
        match started {
            Ok((mut child, channel)) => Ok(Self {
                stdout: child.stdout.take(),
                stderr: child.stderr.take(),
                child,
                channel,
                cgroup,
                network,
                lease,
                chroot_tmp,
            }),
            Err(e) => {
                if let Some(cg) = cgroup {
                    cg.remove();
                }
                if let Some(net) = network {
                    tokio::spawn(net.release());
                }
                Err(e)
            }
        }
    }

    pub fn uid(&self) -> u32 {
        self.lease.uid
    }

    /// Send `frame` (see `isolation::snippet`) and collect the output, each stream
    /// capped at `cap` bytes, until the run ends or `timeout` passes.
    pub async fn run(
        &mut self,
        frame: &[u8],
        timeout: Duration,
        cap: usize,
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

        let (mut status_rd, mut code_wr) = self.channel.split();
        let talk = async {
            // The helper may fail before reading everything; its report says why.
            let _ = code_wr.write_all(frame).await;
            let _ = code_wr.shutdown().await;
            let mut text = String::new();
            let _ = status_rd.read_to_string(&mut text).await;
            serde_json::from_str::<HelperReport>(text.trim()).ok()
        };
        let mut stopped_for = None;
        let report = tokio::select! {
            r = talk => r,
            _ = tokio::time::sleep(timeout) => { stopped_for = Some(LimitHit::Timeout); None }
            _ = overflow.notified() => { stopped_for = Some(LimitHit::Output); None }
        };
        if stopped_for.is_some() {
            self.kill_tree();
        }
        let _ = tokio::time::timeout(DRAIN, self.child.wait()).await;
        let (out, out_over) = join_reader(stdout).await;
        let (err, err_over) = join_reader(stderr).await;
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

    /// SIGKILL the helper and everything left in the run's cgroup.
    fn kill_tree(&mut self) {
        let _ = self.child.start_kill();
        if let Some(cg) = &self.cgroup {
            cg.kill_all();
        }
    }

    /// After the process tree is gone: remove the cgroup, the network and private files,
    /// then give the uid back (dropping the lease last).
    pub async fn release(mut self) {
        if let Some(cg) = self.cgroup.take() {
            let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
        }
        if let Some(net) = self.network.take() {
            net.release().await;
        }
        if let Some(dir) = self.chroot_tmp.take() {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        }
    }

    /// Kill a worker that will not run anything and free what it held.
    pub async fn discard(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        self.release().await;
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
        if let Some(net) = self.network.take() {
            let _ = self.child.start_kill();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(net.release());
            }
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
    match tokio::time::timeout(DRAIN, h).await {
        Ok(Ok(v)) => v,
        _ => (Vec::new(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_past_its_cap_is_cut_and_reported() {
        let overflow = Arc::new(Notify::new());
        let data: &[u8] = &[b'x'; 100];
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink: Sink = {
            let seen = seen.clone();
            Arc::new(move |_, bytes: &[u8]| seen.lock().unwrap().extend_from_slice(bytes))
        };
        let (kept, over) =
            read_capped(data, 60, Stream::Stdout, Some(sink), overflow.clone()).await;
        assert_eq!((kept.len(), over), (60, true));
        assert_eq!(seen.lock().unwrap().len(), 60, "the sink sees what is kept");
        // notify_one stored a permit for the next waiter.
        tokio::time::timeout(Duration::from_millis(100), overflow.notified())
            .await
            .expect("the overflow was signalled");
        let (kept, over) = read_capped(&data[..10], 60, Stream::Stderr, None, overflow).await;
        assert_eq!((kept.len(), over), (10, false));
    }
}
