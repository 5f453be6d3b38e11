//! A request's way through the engine: a worker slot, a warm worker or a fresh one
//! (the fork server's first, a plain one when that fails before the snippet ran), the run
//! on it, its release once it is over, the outcome in words.

use std::time::Instant;

use tokio::sync::OwnedSemaphorePermit;

use super::install::RunKind;
use super::request::rerunnable;
use super::worker::{Aftermath, RunBounds, Watch, Worker};
use super::{
    Engine, LimitHit, PoolKey, RunError, RunFiles, RunOutcome, RunRequest, SetupError, outcome,
};
use crate::isolation::snippet;
use crate::isolation::spec::IsolationLevel;
use std::sync::atomic::Ordering;

impl Engine {
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
            let worker = self
                .spawn_worker(key, false, &req.files, RunKind::Snippet)
                .await?;
            return self.finish_fresh(worker, &req, slot).await;
        }
        let none = RunFiles::default();
        let mut allow_fork = true;
        let mut warm = self.warm.take_or_wait(key).await;
        let live = self.run_packages(key.language).map(|(dir, _)| dir);
        if let Some(stale) = warm.take_if(|w| w.packages() != live.as_deref()) {
            // Started before another package generation went live.
            self.tasks.spawn(stale.discard());
        }
        if let Some(worker) = warm {
            let forked = worker.is_forked();
            match self.run_worker(worker, &req, slot, RunKind::Snippet).await {
                // Killed while it waited: the snippet never ran, so running it on a fresh
                // worker is safe.
                Err(RunError::EndedBeforeCode) if rerunnable(&req) => {}
                // A forked run that could not jail itself ran nothing either.
                Err(RunError::Setup(e)) if e.is_fork_servers() && rerunnable(&req) => {
                    self.fork_failed(&e);
                    allow_fork = false;
                }
                other => {
                    if forked && let Some(fs) = &self.fork_server {
                        fs.record(
                            !matches!(&other, Err(RunError::Setup(e)) if e.is_fork_servers()),
                        );
                    }
                    return other;
                }
            }
        }
        let worker = self
            .spawn_worker(key, allow_fork, &none, RunKind::Snippet)
            .await?;
        if worker.is_forked() {
            match self.run_worker(worker, &req, slot, RunKind::Snippet).await {
                Err(RunError::Setup(e)) if e.is_fork_servers() && rerunnable(&req) => {
                    self.fork_failed(&e)
                }
                Err(RunError::EndedBeforeCode) if rerunnable(&req) => {
                    self.fork_failed("the run ended before it read its snippet")
                }
                other => {
                    if let Some(fs) = &self.fork_server {
                        let started = !matches!(&other, Err(RunError::EndedBeforeCode))
                            && !matches!(&other, Err(RunError::Setup(e)) if e.is_fork_servers());
                        fs.record(started);
                    }
                    return other;
                }
            }
            let worker = self
                .spawn_worker(key, false, &none, RunKind::Snippet)
                .await?;
            return self.finish_fresh(worker, &req, slot).await;
        }
        self.finish_fresh(worker, &req, slot).await
    }

    /// Note a forked run that failed to start; a fork server that keeps failing is put
    /// out of use.
    fn fork_failed(&self, message: impl std::fmt::Display) {
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
        match self.run_worker(worker, req, slot, RunKind::Snippet).await {
            Err(RunError::EndedBeforeCode) => Err(SetupError::InterpreterEnded.into()),
            other => other,
        }
    }

    /// run holds `slot` until its last process is gone; a run answered before that takes
    /// it along, any other gives it back (for a retry).
    pub(super) async fn run_worker(
        &self,
        mut worker: Worker,
        req: &RunRequest,
        slot: &mut Option<OwnedSemaphorePermit>,
        kind: RunKind,
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
        let l = self.limits_for(kind);
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
        let caught = outcome::caught(exit_code, limit, c.counters, l);
        Ok(RunOutcome {
            stdout: String::from_utf8_lossy(&c.stdout).into_owned(),
            stderr,
            exit_code,
            error,
            limit: limit.or(caught.as_ref().map(|_| LimitHit::Processes)),
            caught,
            duration: started.elapsed(),
            uid,
        })
    }
}
