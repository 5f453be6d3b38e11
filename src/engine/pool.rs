//! Keeping workers ready: the warm pool refilled in the background, the Python fork
//! server restarted when it is gone or worn out, or when new packages went live.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::install::RunKind;
use super::{Engine, PoolKey, RunFiles};
use crate::runtime::Language;

impl Engine {
    /// Keep warm workers ready for the keys Dify uses (each language with the server's
    /// network setting); other keys are added when first asked for.
    pub fn start_warm_pool(self: &Arc<Self>) {
        if self.warm.target() == 0 {
            return;
        }
        // Networked workers only where networked runs are served.
        let network = self.network.policy().serves_networked();
        for language in Language::ALL {
            if self.runtime(language).is_ok() {
                self.warm.want(PoolKey { language, network });
            }
        }
        let engine = Arc::clone(self);
        tokio::spawn(async move { engine.tend_pool().await });
        for set in self.packages.values() {
            let (engine, mut generations) = (Arc::clone(self), set.generations());
            let language = set.language();
            tokio::spawn(async move {
                while generations.changed().await.is_ok() {
                    engine.packages_went_live(language).await;
                }
            });
        }
    }

    /// New packages went live: what was started on the old ones makes way. The
    /// language's warm workers (their roots hold the old generation; one taken before
    /// this drain is caught by `execute`), then the Python fork server, which may have
    /// imported older ones.
    async fn packages_went_live(&self, language: Language) {
        let stale = self.warm.drain_where(|key, _| key.language == language);
        for worker in stale {
            worker.discard().await;
        }
        if language == Language::Python3
            && let Some(fs) = &self.fork_server
            && let Err(e) = fs.restart().await
        {
            tracing::error!(error = %e, "cannot restart the Python fork server after new packages; it is restarted when it is next found down");
        }
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
                dead.discard().await;
            }
            self.tend_fork_server();
            for key in self.warm.missing() {
                let engine = Arc::clone(&self);
                self.tasks.spawn(async move {
                    match engine
                        .spawn_worker(key, true, &RunFiles::default(), RunKind::Snippet)
                        .await {
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

    /// Restart the fork server in the background when it is gone (runs go to plain
    /// workers meanwhile) or worn out (it serves until its replacement is ready).
    fn tend_fork_server(self: &Arc<Self>) {
        let Some(fs) = &self.fork_server else { return };
        if !fs.in_use() {
            return;
        }
        let worn_out = fs.up() && fs.worn_out();
        if (fs.up() && !worn_out) || self.restarting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (fs, engine) = (fs.clone(), Arc::clone(self));
        self.tasks.spawn(async move {
            if worn_out {
                tracing::debug!("replacing the Python fork server: it has forked its share of runs");
            } else {
                tracing::warn!("the Python fork server is gone; restarting it");
            }
            match fs.restart().await {
                Ok(()) if worn_out => {}
                Ok(()) => tracing::info!("the Python fork server is back"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot restart the Python fork server; Python runs start their own interpreters meanwhile");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
            engine.restarting.store(false, Ordering::Release);
        });
    }
}
