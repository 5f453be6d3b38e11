//! The run's end: killing what is left, holding an announced end to the owner's own
//! report, waiting until no process of the run is left, then giving back what it held
//! (its `RunResources`) and its worker slot; from `Drop` when the request went away.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::protocol::read_report;
use super::{Owner, Worker};
use crate::engine::capture::{DRAIN, EXIT_GRACE};
use crate::isolation::helper::HelperReport;
use crate::isolation::uids::processes_of;

impl Worker {
    /// SIGKILL everything of the run. Where a cgroup holds the run, its owner is spared
    /// to reap the run and exit by itself (see `RunCgroup::kill_all_but`); without one,
    /// the owner's death takes the run along (its parent-death signal).
    pub(super) fn kill_tree(&mut self) {
        match (self.resources.cgroup(), self.owner.pid()) {
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
    pub(super) async fn stop(&mut self) {
        self.kill_tree();
        // A helper leaves once the server's side of its channel is shut.
        let _ = self.channel.shutdown().await;
        if tokio::time::timeout(DRAIN, self.owner.wait())
            .await
            .is_err()
        {
            self.owner.start_kill();
            if let Some(cg) = self.resources.cgroup() {
                cg.kill_all();
            }
            let _ = tokio::time::timeout(DRAIN, self.owner.wait()).await;
        }
    }

    /// Once every process of the run is gone, give back what it held (see `free`). A run answered on its
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

    /// Give back what the run held, once it is gone (see `RunResources::release`); its
    /// network is kept for another run only when it ended as it said and left no trace.
    pub async fn free(mut self, aftermath: Aftermath) {
        let keep = self.ended_cleanly && aftermath == Aftermath::Ended;
        std::mem::take(&mut self.resources).release(keep).await;
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
        match self.resources.cgroup() {
            Some(cg) => cg.is_empty(),
            None if self.resources.private_dir().is_some() => processes_of(self.uid).is_empty(),
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
                if self.resources.cgroup().is_none() {
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

/// A worker dropped without `release` (its request was cancelled, say, because the client
/// went away): its owner is killed, and what the run held is given back in the
/// background, its cgroup's removal first (which kills what is left and waits until it
/// is empty), its worker slot last.
impl Drop for Worker {
    fn drop(&mut self) {
        // A keeper is not our child: nothing kills it on drop but this (a helper is also
        // killed by `kill_on_drop`). One seen gone is not signalled: its pid may be
        // another process's by now.
        if !self.owner_gone {
            self.owner.start_kill();
        }
        std::mem::take(&mut self.resources).release_in_background(self.slot.take());
    }
}
