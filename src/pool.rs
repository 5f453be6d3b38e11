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
