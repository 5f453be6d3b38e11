//! The uid pool: every run executes as its own unprivileged uid, so concurrent runs
//! cannot signal, trace or read each other, and RLIMIT_NPROC counts one run only.
//! A uid is leased with flock on a file in a lease directory, so two servers sharing
//! that directory never hand out the same uid either; and a uid some live process runs
//! as (one this pool does not know about) is skipped.

use std::fs::{self, File, OpenOptions};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::fcntl::{Flock, FlockArg};

/// The uids runs execute as: 10000-10999, as in the original service.
pub const SANDBOX_UIDS: Range<u32> = 10000..11000;

#[derive(Debug, thiserror::Error)]
pub enum UidError {
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
    range: Range<u32>,
    cursor: AtomicU32,
}

/// A leased uid; the lease ends when this is dropped.
pub struct UidLease {
    pub uid: u32,
    _lock: Flock<File>,
}

impl UidPool {
    /// Lease uids of `range`, with lock files in `dir`.
    pub fn new(dir: &Path, range: Range<u32>) -> Result<Self, UidError> {
        fs::create_dir_all(dir).map_err(|source| UidError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        // Start at a different place in each process so servers rarely contend.
        let start = std::process::id() % range.len().max(1) as u32;
        Ok(Self {
            dir: dir.to_path_buf(),
            range,
            cursor: AtomicU32::new(start),
        })
    }

    /// The uids this pool hands out.
    pub fn range(&self) -> Range<u32> {
        self.range.clone()
    }

    /// Whether some process (this one included) holds the lease of `uid`.
    pub fn is_held(&self, uid: u32) -> bool {
        let path = self.dir.join(uid.to_string());
        let Ok(file) = OpenOptions::new().write(true).open(&path) else {
            return false;
        };
        Flock::lock(file, FlockArg::LockExclusiveNonblock).is_err()
    }

    pub fn acquire(&self) -> Result<UidLease, UidError> {
        let count = self.range.len() as u32;
        let busy = uids_of_live_processes();
        for _ in 0..count {
            let offset = self.cursor.fetch_add(1, Ordering::Relaxed) % count;
            let uid = self.range.start + offset;
            if busy.contains(&uid) {
                continue;
            }
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
        Err(UidError::Exhausted(count))
    }
}

/// The uids processes visible in /proc run as (a process's directory belongs to its
/// effective uid).
fn uids_of_live_processes() -> std::collections::HashSet<u32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = fs::read_dir("/proc") else {
        return Default::default();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.uid())
        .collect()
}

/// The processes running as `uid` (real, effective or saved), read from each process's
/// `status`: its /proc directory belongs to root once it is not dumpable (a forked run).
pub fn processes_of(uid: u32) -> Vec<nix::unistd::Pid> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .is_some_and(|ids| {
                        ids.split_whitespace()
                            .take(3)
                            .any(|id| id.parse() == Ok(uid))
                    })
            })
        })
        .map(nix::unistd::Pid::from_raw)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_exclusive_until_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = UidPool::new(dir.path(), 20000..20002).expect("pool");
        let a = pool.acquire().expect("first");
        let b = pool.acquire().expect("second");
        assert_ne!(a.uid, b.uid);
        assert!(matches!(pool.acquire(), Err(UidError::Exhausted(2))));
        let freed = a.uid;
        drop(a);
        assert_eq!(pool.acquire().expect("after release").uid, freed);
    }

    #[test]
    fn processes_are_found_by_their_uid() {
        let me = nix::unistd::getuid().as_raw();
        assert!(processes_of(me).contains(&nix::unistd::getpid()));
        // No process runs as the last uid.
        assert!(processes_of(u32::MAX - 1).is_empty());
    }

    #[test]
    fn a_uid_a_live_process_runs_as_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        // This test's own uid is a live process's uid.
        let me = nix::unistd::geteuid().as_raw();
        let pool = UidPool::new(dir.path(), me..me + 2).expect("pool");
        assert_eq!(pool.acquire().expect("the other uid").uid, me + 1);
    }

    #[test]
    fn two_pools_on_one_directory_never_share_a_uid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p1 = UidPool::new(dir.path(), 20000..20003).expect("pool");
        let p2 = UidPool::new(dir.path(), 20000..20003).expect("pool");
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
