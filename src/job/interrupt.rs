//! SIGINT into a running snippet, as python3 and node get it: sent to the run's init (pid
//! 1 of the run's pid namespace, see `isolation::init`), which forwards it. The init is
//! found in /proc: locally as this command's descendant, on a server by the run's /job
//! (its stage directory's name is the job's, unique).

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Every process that is pid 1 of a pid namespace below this one (the last field of its
/// NSpid).
fn nested_inits() -> Vec<i32> {
    let is_init = |pid: i32| -> bool {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return false;
        };
        status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .map(|ids| ids.split_whitespace().collect::<Vec<_>>())
            .is_some_and(|ids| ids.len() > 1 && ids.last() == Some(&"1"))
    };
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&pid| is_init(pid))
        .collect()
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command's name, which may hold spaces and parentheses.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split(' ').nth(1)?.parse().ok()
}

/// The init of a run below `ancestor` (a local run: this command's).
pub fn init_under(ancestor: Pid) -> Option<Pid> {
    let descends = |mut pid: i32| {
        for _ in 0..64 {
            match parent_of(pid) {
                Some(p) if p == ancestor.as_raw() => return true,
                Some(p) if p > 1 => pid = p,
                _ => return false,
            }
        }
        false
    };
    nested_inits()
        .into_iter()
        .find(|&pid| descends(pid))
        .map(Pid::from_raw)
}

/// The init of the run whose /job is the stage directory named `job` (`runs/<job>/job`).
pub fn init_of_job(job: &str) -> Option<Pid> {
    let suffix = format!("/{job}/job");
    nested_inits()
        .into_iter()
        .find(|&pid| {
            let Ok(mounts) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
                return false;
            };
            // Fields: id, parent, dev, root, mount point, ...
            mounts.lines().any(|l| {
                let mut f = l.split(' ').skip(3);
                matches!((f.next(), f.next()), (Some(root), Some("/job")) if root.ends_with(&suffix))
            })
        })
        .map(Pid::from_raw)
}

/// SIGINT to `init`, which passes it to the snippet.
pub fn interrupt(init: Pid) -> bool {
    kill(init, Signal::SIGINT).is_ok()
}
