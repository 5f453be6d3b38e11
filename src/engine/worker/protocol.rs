//! The run itself: the frame sent on the channel, the output read capped, the owner's
//! reports read, the limits the kernel does not enforce watched, until the run ends or
//! announces its end.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Owner, Worker};
use crate::engine::capture::{DRAIN, EXIT_GRACE, Sink, Stream, join_reader, read_capped};
use crate::engine::outcome::{Counters, Ending};
use crate::engine::watch;
use crate::engine::{RunError, SetupError};
use crate::isolation::helper::HelperReport;
use crate::isolation::snippet;
use crate::protocol::LimitHit;

/// The limits a worker enforces by watching (see `watch`), where the kernel does not.
#[derive(Debug, Clone, Copy, Default)]
pub struct Watch {
    /// Resident memory of the run's processes (no cgroup).
    pub memory_bytes: Option<u64>,
    /// The size of the run's directories on the host: its private directory (the chroot
    /// level) and its /tmp/out.
    pub disk_bytes: Option<u64>,
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
        let watched: Vec<PathBuf> = self.resources.watched_dirs();
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
            Some(HelperReport::SetupFailed { message }) => {
                let forked = self.is_forked();
                return Err(SetupError::Jail { message, forked }.into());
            }
            Some(HelperReport::EndedBeforeCode) => return Err(RunError::EndedBeforeCode),
            None => Ending::Killed,
        };
        let counters = match self.resources.cgroup() {
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
pub(super) struct ReportLines {
    pending: Vec<u8>,
}

impl ReportLines {
    /// The next whole report; None when the helper closed its side first.
    pub(super) async fn next(
        &mut self,
        from: &mut (impl AsyncRead + Unpin),
    ) -> Option<HelperReport> {
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
pub(super) async fn read_report(report: &mut (impl AsyncRead + Unpin)) -> Option<HelperReport> {
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
