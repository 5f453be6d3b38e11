//! The uid pool: every run executes as its own unprivileged uid, so concurrent runs
//! cannot signal, trace or read each other, and RLIMIT_NPROC counts one run only.
//! A uid is leased with flock on a file in the state directory, so two servers on the
//! same host never hand out the same uid either.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::fcntl::{Flock, FlockArg};

pub const UID_BASE: u32 = 10000;
pub const UID_COUNT: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "cannot create the uid lease directory {path}: {source}. Make the state directory writable (state_dir / SANDBOX_STATE_DIR)"
    )]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("all {0} sandbox uids are in use; lower max_workers or wait for runs to finish")]
    Exhausted(u32),
}

pub struct UidPool {
    dir: PathBuf,
    base: u32,
    count: u32,
    cursor: AtomicU32,
}

/// A leased uid; the lease ends when this is dropped.
pub struct UidLease {
    pub uid: u32,
    _lock: Flock<File>,
}

impl UidPool {
    pub fn new(state_dir: &Path) -> Result<Self, PoolError> {
        Self::with_range(state_dir, UID_BASE, UID_COUNT)
    }

    pub fn with_range(state_dir: &Path, base: u32, count: u32) -> Result<Self, PoolError> {
        let dir = state_dir.join("uids");
        fs::create_dir_all(&dir).map_err(|source| PoolError::Dir {
            path: dir.clone(),
            source,
        })?;
        // Start at a different place in each process so servers rarely contend.
        let start = std::process::id() % count;
        Ok(Self {
            dir,
            base,
            count,
            cursor: AtomicU32::new(start),
        })
    }

    pub fn acquire(&self) -> Result<UidLease, PoolError> {
        for _ in 0..self.count {
            let offset = self.cursor.fetch_add(1, Ordering::Relaxed) % self.count;
            let uid = self.base + offset;
            let path = self.dir.join(uid.to_string());
            let Ok(file) = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
            else {
                continue;
            };
            if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                return Ok(UidLease { uid, _lock: lock });
            }
        }
        Err(PoolError::Exhausted(self.count))
    }
}

/// What the warm pool needs to know about an idle worker.
pub trait Idle {
    /// Whether its process has exited while it waited.
    fn is_dead(&mut self) -> bool;
}

/// Warm, single-use workers per key (language and network setting): a run takes one,
/// and the pool is topped up in the background. A worker is never given back.
pub struct WarmPool<W> {
    target: usize,
    state: std::sync::Mutex<WarmState<W>>,
    taken: tokio::sync::Notify,
    added: tokio::sync::Notify,
}

struct WarmState<W> {
    idle: std::collections::HashMap<crate::engine::PoolKey, std::collections::VecDeque<W>>,
    pending: std::collections::HashMap<crate::engine::PoolKey, usize>,
}

impl<W: Idle> WarmPool<W> {
    pub fn new(target: usize) -> Self {
        Self {
            target,
            state: std::sync::Mutex::new(WarmState {
                idle: Default::default(),
                pending: Default::default(),
            }),
            taken: tokio::sync::Notify::new(),
            added: tokio::sync::Notify::new(),
        }
    }

    pub fn target(&self) -> usize {
        self.target
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WarmState<W>> {
        // A panic while holding the lock leaves plain collections behind: still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep workers ready for `key` from now on.
    pub fn want(&self, key: crate::engine::PoolKey) {
        if self.target > 0 {
            self.lock().idle.entry(key).or_default();
        }
    }

    /// A ready worker for `key`, if any. Asking for a new key starts keeping it warm.
    pub fn take(&self, key: crate::engine::PoolKey) -> Option<W> {
        if self.target == 0 {
            return None;
        }
        let mut state = self.lock();
        let queue = state.idle.entry(key).or_default();
        let mut found = None;
        let mut dead = Vec::new();
        while let Some(mut w) = queue.pop_front() {
            if w.is_dead() {
                dead.push(w);
            } else {
                found = Some(w);
                break;
            }
        }
        // Dead ones go back to be found and cleaned up by the tender.
        for w in dead {
            queue.push_back(w);
        }
        drop(state);
        self.taken.notify_one();
        found
    }

    /// Workers to start now: per key, the target less what is idle or starting. The
    /// returned starts are counted as pending until `put` or `spawn_failed`.
    pub fn missing(&self) -> Vec<crate::engine::PoolKey> {
        let mut state = self.lock();
        let keys: Vec<_> = state.idle.keys().copied().collect();
        let mut out = Vec::new();
        for key in keys {
            let have = state.idle.get(&key).map_or(0, |q| q.len())
                + state.pending.get(&key).copied().unwrap_or(0);
            for _ in have..self.target {
                out.push(key);
            }
            *state.pending.entry(key).or_default() += self.target.saturating_sub(have);
        }
        out
    }

    pub fn put(&self, key: crate::engine::PoolKey, worker: W) {
        let mut state = self.lock();
        if let Some(p) = state.pending.get_mut(&key) {
            *p = p.saturating_sub(1);
        }
        state.idle.entry(key).or_default().push_back(worker);
        drop(state);
        self.added.notify_waiters();
    }

    /// Like `take`, but when none is ready and one is being started, wait for it: it is
    /// further along than a worker started now would be.
    pub async fn take_or_wait(&self, key: crate::engine::PoolKey) -> Option<W> {
        loop {
            let added = self.added.notified();
            if let Some(w) = self.take(key) {
                return Some(w);
            }
            if self.lock().pending.get(&key).copied().unwrap_or(0) == 0 {
                return None;
            }
            added.await;
        }
    }

    pub fn spawn_failed(&self, key: crate::engine::PoolKey) {
        if let Some(p) = self.lock().pending.get_mut(&key) {
            *p = p.saturating_sub(1);
        }
    }

    /// Idle workers whose process has died.
    pub fn remove_dead(&self) -> Vec<W> {
        let mut state = self.lock();
        let mut dead = Vec::new();
        for queue in state.idle.values_mut() {
            let mut keep = std::collections::VecDeque::new();
            while let Some(mut w) = queue.pop_front() {
                if w.is_dead() {
                    dead.push(w)
                } else {
                    keep.push_back(w)
                }
            }
            *queue = keep;
        }
        dead
    }

    /// Every idle worker, taken out (at shutdown).
    pub fn drain(&self) -> Vec<W> {
        let mut state = self.lock();
        state.idle.values_mut().flat_map(|q| q.drain(..)).collect()
    }

    /// How many workers are ready, per key.
    pub fn ready(&self) -> Vec<(crate::engine::PoolKey, usize)> {
        self.lock()
            .idle
            .iter()
            .map(|(k, q)| (*k, q.len()))
            .collect()
    }

    pub async fn wait_for_take(&self) {
        self.taken.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_exclusive_until_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = UidPool::with_range(dir.path(), 20000, 2).expect("pool");
        let a = pool.acquire().expect("first");
        let b = pool.acquire().expect("second");
        assert_ne!(a.uid, b.uid);
        assert!(matches!(pool.acquire(), Err(PoolError::Exhausted(2))));
        let freed = a.uid;
        drop(a);
        assert_eq!(pool.acquire().expect("after release").uid, freed);
    }

    #[test]
    fn two_pools_on_one_directory_never_share_a_uid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p1 = UidPool::with_range(dir.path(), 20000, 3).expect("pool");
        let p2 = UidPool::with_range(dir.path(), 20000, 3).expect("pool");
        let leases: Vec<UidLease> = (0..3)
            .map(|i| {
                if i % 2 == 0 {
                    p1.acquire()
                } else {
                    p2.acquire()
                }
                .expect("lease")
            })
            .collect();
        let mut uids: Vec<u32> = leases.iter().map(|l| l.uid).collect();
        uids.sort();
        uids.dedup();
        assert_eq!(uids.len(), 3);
        assert!(p2.acquire().is_err());
    }
}
