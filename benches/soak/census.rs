//! What a server may leak over hours, counted before and after the load: memory,
//! descriptors, per-run cgroups, mounts, uid leases, network interfaces and tables,
//! and the state directory's size.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::procfs;

#[derive(Clone, Debug)]
pub struct Census {
    pub rss_kb: u64,
    pub fds: usize,
    pub below: (usize, u64),
    pub warm_ready: usize,
    /// Directories `sandbox-run-<server pid>-*`, per hierarchy they were found in.
    pub run_cgroups: Vec<(PathBuf, usize)>,
    pub server_mounts: usize,
    pub host_mounts: usize,
    /// Locked lease files: all of them, and those the server locked.
    pub leases_held: (usize, usize),
    /// Interfaces named `sbx*`: all of them, and those with the server's tag.
    pub sbx_interfaces: (usize, usize),
    /// `sbx<tag>`, the prefix of the server's interfaces, once one was seen.
    pub sbx_prefix: Option<String>,
    /// Tables named `sandbox_*`: all of them, and those ending in `_<server pid>`.
    pub nft_tables: (usize, usize),
    pub state_bytes: u64,
    /// Other `sandbox serve` processes on the host, whose resources host-wide counts include.
    pub other_servers: usize,
}

fn count_lines(path: &str) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

/// The directories per-run cgroups of `pid` can be in: under its cgroup in each
/// hierarchy, and for v2 beside it too (the server moves itself into a leaf).
fn cgroup_dirs(pid: u32) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() && root.join("cgroup.controllers").exists() {
            let own = root.join(rel);
            dirs.extend(own.parent().map(Path::to_path_buf));
            dirs.push(own);
        }
        for c in ["memory", "pids"] {
            if controllers.split(',').any(|x| x == c) {
                dirs.push(root.join(c).join(rel));
            }
        }
    }
    dirs.sort();
    dirs.dedup();
    dirs
}

fn count_run_cgroups(dir: &Path, pid: u32) -> usize {
    let prefix = format!("sandbox-run-{pid}-");
    std::fs::read_dir(dir).map_or(0, |rd| {
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .count()
    })
}

/// Lease files someone holds a lock on (our own non-blocking lock on them fails), and
/// of them those whose lock /proc/locks says `pid` took: servers sharing the
/// directory lock their files too.
pub fn leases_held(dir: &Path, pid: u32) -> (usize, usize) {
    let (all, own) = leases(dir, pid);
    (all, own.len())
}

/// The number of locked lease files, and the uids (file names) of those `pid` locked.
fn leases(dir: &Path, pid: u32) -> (usize, Vec<u32>) {
    use nix::fcntl::{Flock, FlockArg};
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return (0, Vec::new());
    };
    let held: Vec<(u64, String)> = rd
        .flatten()
        .filter_map(|e| Some((File::open(e.path()).ok()?, e.file_name())))
        .filter_map(|(f, name)| {
            let inode = f.metadata().ok()?.ino();
            // A lock we get is released at once when the guard drops.
            Flock::lock(f, FlockArg::LockExclusiveNonblock)
                .is_err()
                .then(|| (inode, name.to_string_lossy().into_owned()))
        })
        .collect();
    // "1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF"
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let by_pid: Vec<u64> = locks
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.get(1) == Some(&"FLOCK") && f.get(4) == Some(&pid.to_string().as_str()))
        .filter_map(|f| f.get(5)?.rsplit(':').next()?.parse().ok())
        .collect();
    let own = held
        .iter()
        .filter(|(inode, _)| by_pid.contains(inode))
        .filter_map(|(_, name)| name.parse().ok())
        .collect();
    (held.len(), own)
}

/// The prefix of the server's interfaces: a networked run's host end is
/// `sbx<server tag, 3 characters><uid>`, so it is learnt from the interface of a uid
/// the server leases.
fn sbx_prefix(own_uids: &[u32]) -> Option<String> {
    sbx_names("sbx").into_iter().find_map(|n| {
        let uid: u32 = n.get(6..)?.parse().ok()?;
        own_uids.contains(&uid).then(|| n[..6].to_string())
    })
}

/// Network interfaces whose name starts with `prefix`.
pub fn sbx_names(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/sys/class/net").map_or(Vec::new(), |rd| {
        rd.flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(prefix))
            .collect()
    })
}

/// Other `sandbox serve` processes of the host.
fn other_servers(pid: u32) -> usize {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0;
    };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy() != pid.to_string())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| {
            let mut args = c.split(|b| *b == 0);
            let program = args.next().unwrap_or_default();
            program.ends_with(b"sandbox") && args.next() == Some(b"serve".as_slice())
        })
        .count()
}

pub fn nft_tables(pid: u32) -> (usize, usize) {
    let out = Command::new("nft").args(["list", "tables"]).output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|n| n.starts_with("sandbox_"))
        .collect();
    let own = format!("_{pid}");
    (
        names.len(),
        names.iter().filter(|n| n.ends_with(&own)).count(),
    )
}

/// Total size of the files below `dir`, links not followed.
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .filter_map(|e| Some((e.path(), e.path().symlink_metadata().ok()?)))
        .map(|(p, m)| if m.is_dir() { tree_bytes(&p) } else { m.len() })
        .sum()
}

impl Census {
    pub fn take(pid: u32, warm_ready: usize, lease_dir: &Path, state_dir: &Path) -> Self {
        let (held, own_uids) = leases(lease_dir, pid);
        let prefix = sbx_prefix(&own_uids);
        Self {
            rss_kb: procfs::status_kb(pid, "VmRSS:"),
            fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |rd| rd.count()),
            below: procfs::descendants_rss_kb(pid),
            warm_ready,
            run_cgroups: cgroup_dirs(pid)
                .into_iter()
                .map(|d| {
                    let n = count_run_cgroups(&d, pid);
                    (d, n)
                })
                .collect(),
            server_mounts: count_lines(&format!("/proc/{pid}/mountinfo")),
            host_mounts: count_lines("/proc/self/mountinfo"),
            leases_held: (held, own_uids.len()),
            sbx_interfaces: (
                sbx_names("sbx").len(),
                prefix.as_deref().map_or(0, |p| sbx_names(p).len()),
            ),
            sbx_prefix: prefix,
            nft_tables: nft_tables(pid),
            state_bytes: tree_bytes(state_dir),
            other_servers: other_servers(pid),
        }
    }

    fn cgroups(&self) -> usize {
        self.run_cgroups.iter().map(|(_, n)| n).sum()
    }

    /// Per-run cgroups of `pid` still in the directories this census looked in (for
    /// after the server has exited, when its /proc entry is gone).
    pub fn cgroups_left(&self, pid: u32) -> usize {
        self.run_cgroups
            .iter()
            .map(|(d, _)| count_run_cgroups(d, pid))
            .sum()
    }

    /// Named counts of the server's own that must not grow.
    fn own_counts(&self) -> [(&'static str, usize); 8] {
        [
            ("open descriptors", self.fds),
            ("processes below the server", self.below.0),
            ("per-run cgroups", self.cgroups()),
            ("server mounts", self.server_mounts),
            ("uid leases it holds", self.leases_held.1),
            ("its sbx* interfaces", self.sbx_interfaces.1),
            ("its nft tables", self.nft_tables.1),
            ("warm workers ready", self.warm_ready),
        ]
    }

    /// Named host-wide counts, which other servers change too.
    fn host_counts(&self) -> [(&'static str, usize); 5] {
        [
            ("host mounts", self.host_mounts),
            ("uid leases held (all)", self.leases_held.0),
            ("sbx* interfaces (all)", self.sbx_interfaces.0),
            ("sandbox_* nft tables (all)", self.nft_tables.0),
            ("other sandbox servers", self.other_servers),
        ]
    }
}

/// Side by side, start and end.
pub fn print(start: &Census, end: &Census) {
    let mb = |kb: u64| format!("{:.1} MB", kb as f64 / 1024.0);
    println!("{:<30} {:>14} {:>14}", "", "start", "end");
    println!(
        "{:<30} {:>14} {:>14}",
        "server RSS",
        mb(start.rss_kb),
        mb(end.rss_kb)
    );
    println!(
        "{:<30} {:>14} {:>14}",
        "RSS below the server",
        mb(start.below.1),
        mb(end.below.1)
    );
    for ((name, a), (_, b)) in start.own_counts().into_iter().zip(end.own_counts()) {
        println!("{name:<30} {a:>14} {b:>14}");
    }
    for ((dir, a), (_, b)) in start.run_cgroups.iter().zip(&end.run_cgroups) {
        println!("  {a:>3} -> {b:>3} per-run cgroups in {}", dir.display());
    }
    for ((name, a), (_, b)) in start.host_counts().into_iter().zip(end.host_counts()) {
        println!("{name:<30} {a:>14} {b:>14}");
    }
    println!(
        "{:<30} {:>14} {:>14}",
        "state directory bytes", start.state_bytes, end.state_bytes
    );
}

/// Memory may grow by this share or this many kB, whichever is larger: allocators keep
/// some memory after a burst, a leak keeps growing with the duration.
const RSS_SHARE: f64 = 0.25;
const RSS_SLACK_KB: u64 = 4096;
/// The state directory may grow by this many bytes (a log line, a lock file).
const STATE_SLACK: u64 = 1 << 20;

pub const TOLERANCE: &str = "RSS (server, and below it) within +25% or +4 MB, state directory within +1 MiB, every count unchanged or lower (host-wide ones only while no other sandbox server runs)";

/// What grew past the tolerance, empty when everything stayed flat.
pub fn grew(start: &Census, end: &Census) -> Vec<String> {
    let mut out = Vec::new();
    let rss_ok = |a: u64, b: u64| b <= a + RSS_SLACK_KB.max((a as f64 * RSS_SHARE) as u64);
    if !rss_ok(start.rss_kb, end.rss_kb) {
        out.push(format!("server RSS {} -> {} kB", start.rss_kb, end.rss_kb));
    }
    if !rss_ok(start.below.1, end.below.1) {
        out.push(format!(
            "RSS below the server {} -> {} kB",
            start.below.1, end.below.1
        ));
    }
    let alone = start.other_servers == 0 && end.other_servers == 0;
    let host = alone.then(|| start.host_counts().into_iter().zip(end.host_counts()));
    for ((name, a), (_, b)) in start
        .own_counts()
        .into_iter()
        .zip(end.own_counts())
        .chain(host.into_iter().flatten())
    {
        if b > a {
            out.push(format!("{name} {a} -> {b}"));
        }
    }
    if end.state_bytes > start.state_bytes + STATE_SLACK {
        out.push(format!(
            "state directory {} -> {} bytes",
            start.state_bytes, end.state_bytes
        ));
    }
    out
}
