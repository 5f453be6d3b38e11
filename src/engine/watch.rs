//! Limits the kernel cannot enforce at some levels, enforced by watching: without a
//! cgroup (rootless, or a container without a writable cgroup tree) the resident memory
//! of a run's processes; the size of a run's directories on the host's disk: at the
//! chroot level, which has no size-limited tmpfs, its private directory, and the
//! directory bound at its /tmp/out. Each watch resolves when its limit is passed, and the
//! run is then stopped and reported as having hit that limit.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a watch looks. A run can grow between two looks: by what it can allocate
/// or write in this time, on top of the limit.
const EVERY: Duration = Duration::from_millis(50);

/// Resolves once the processes under `root` together hold more than `limit` bytes of
/// resident memory. Never resolves if `root` is gone.
pub async fn memory_over(root: u32, limit: u64) {
    loop {
        tokio::time::sleep(EVERY).await;
        let pids = tree(root);
        if pids.is_empty() {
            return std::future::pending().await;
        }
        let rss: u64 = pids.iter().map(|p| resident_bytes(*p)).sum();
        if rss > limit {
            return;
        }
    }
}

/// What an entry is charged at least: a block, as a filesystem allocates it. This also
/// bounds how many empty files a run can leave on the host.
const ENTRY_BYTES: u64 = 4096;

/// Resolves once the files under `dirs` together take more than `limit` bytes of disk.
pub async fn disk_over(dirs: Vec<PathBuf>, limit: u64) {
    loop {
        tokio::time::sleep(EVERY).await;
        let dirs = dirs.clone();
        let used = tokio::task::spawn_blocking(move || dirs.iter().map(|d| disk_usage(d)).sum())
            .await
            .unwrap_or(0);
        if used > limit {
            return;
        }
    }
}

/// `root` and its descendants, through the kernel's per-task lists of children.
fn tree(root: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        out.push(pid);
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    out
}

fn resident_bytes(pid: u32) -> u64 {
    // statm: sizes in pages; the second field is the resident set.
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * page_size()
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as u64)
}

/// Bytes the files under `dir` occupy (allocated blocks, so sparse files count as what
/// they really take; at least `ENTRY_BYTES` each).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            total += (meta.blocks() * 512).max(ENTRY_BYTES);
            if meta.is_dir() {
                todo.push(e.path());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_usage_counts_what_files_take() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a"), vec![1u8; 256 << 10]).unwrap();
        let sparse = std::fs::File::create(dir.path().join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        let used = disk_usage(dir.path());
        assert!((256 << 10..8 << 20).contains(&used), "{used}");
    }

    #[test]
    fn this_process_tree_is_found_and_measured() {
        let me = std::process::id();
        let pids = tree(me);
        assert_eq!(pids.first(), Some(&me));
        assert!(resident_bytes(me) > 1 << 20);
    }

    #[tokio::test]
    async fn a_tree_past_its_limit_is_noticed() {
        let me = std::process::id();
        tokio::time::timeout(Duration::from_secs(5), memory_over(me, 1))
            .await
            .expect("this process holds more than a byte");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![1u8; 64 << 10]).unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            disk_over(vec![dir.path().into()], 1024),
        )
        .await
        .expect("more than a kilobyte is written");
        // Empty files count too: a run cannot fill the host with them.
        let empty = tempfile::tempdir().unwrap();
        for i in 0..4 {
            std::fs::write(empty.path().join(i.to_string()), b"").unwrap();
        }
        assert_eq!(disk_usage(empty.path()), 4 * ENTRY_BYTES);
    }
}
