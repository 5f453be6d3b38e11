//! Readings of /proc about the server and its process tree: resident memory and CPU time.

use std::collections::HashMap;
use std::time::Duration;

/// The unit of the times in /proc/<pid>/stat (USER_HZ), 100 on the architectures the
/// server runs on.
const TICKS_PER_SEC: f64 = 100.0;

/// The fields of /proc/<pid>/stat the benchmarks use; times in clock ticks.
#[derive(Clone, Debug)]
pub struct Stat {
    pub pid: u32,
    pub ppid: u32,
    /// Own user + system time of every thread.
    pub own: u64,
    /// User + system time of the children it has reaped (and theirs, recursively).
    pub reaped: u64,
}

pub fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
    // After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    Some(Stat {
        pid,
        ppid: n(1)? as u32,
        own: n(11)? + n(12)?,
        reaped: n(13)? + n(14)?,
    })
}

/// Whether `pid` still runs: its /proc entry exists and it is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| Some(t[t.rfind(')')? + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// Every process of the host.
fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect()
}

/// `root` and every process below it.
pub fn tree(root: u32) -> Vec<Stat> {
    let stats: Vec<Stat> = all_pids().into_iter().filter_map(stat).collect();
    let parent: HashMap<u32, u32> = stats.iter().map(|s| (s.pid, s.ppid)).collect();
    let below = |mut p: u32| {
        while let Some(&pp) = parent.get(&p) {
            if pp == root {
                return true;
            }
            p = pp;
        }
        false
    };
    stats
        .into_iter()
        .filter(|s| s.pid == root || below(s.pid))
        .collect()
}

/// A field of /proc/<pid>/status in kB (`VmRSS:`, `VmHWM:`); 0 when unreadable.
pub fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Resident memory of the processes below `root` (not `root` itself): their count and kB.
pub fn descendants_rss_kb(root: u32) -> (usize, u64) {
    let below: Vec<u32> = tree(root)
        .iter()
        .map(|s| s.pid)
        .filter(|p| *p != root)
        .collect();
    (
        below.len(),
        below.iter().map(|p| status_kb(*p, "VmRSS:")).sum(),
    )
}

/// CPU used so far by the server and everything it started, split into the server's
/// own threads and the per-run processes (helpers and interpreters, alive or reaped).
#[derive(Clone, Copy, Debug, Default)]
pub struct TreeCpu {
    pub server: Duration,
    pub runs: Duration,
}

impl TreeCpu {
    pub fn read(root: u32) -> Self {
        let ticks = |t: u64| Duration::from_secs_f64(t as f64 / TICKS_PER_SEC);
        let (mut server, mut runs) = (0, 0);
        // Each process's time is counted once: in its own fields while alive, in its
        // parent's reaped fields once waited for.
        for s in tree(root) {
            if s.pid == root {
                server += s.own;
            } else {
                runs += s.own;
            }
            runs += s.reaped;
        }
        Self {
            server: ticks(server),
            runs: ticks(runs),
        }
    }

    pub fn since(self, before: Self) -> Self {
        Self {
            server: self.server.saturating_sub(before.server),
            runs: self.runs.saturating_sub(before.runs),
        }
    }

    pub fn total(self) -> Duration {
        self.server + self.runs
    }
}

/// CPU (user + system) of the children this process has waited for so far.
pub fn children_cpu() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_CHILDREN).expect("getrusage(RUSAGE_CHILDREN)");
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(u.user_time()) + tv(u.system_time())
}
