//! Per-run cgroups for memory and process limits, on cgroup v2 or v1. Paths are
//! parameters (the cgroup mount root and the content of /proc/self/cgroup), so the file
//! logic is testable on a temp dir; the real thing runs in the integration tests.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup: cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup: no usable hierarchy ({0})")]
    Unusable(String),
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Where per-run cgroups are created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupDriver {
    /// v1: separate memory and pids hierarchies, runs created under our own cgroup in each.
    V1 { memory: PathBuf, pids: PathBuf },
    /// v2: one unified tree, runs created under `base` (memory and pids enabled there).
    V2 { base: PathBuf },
}

impl CgroupDriver {
    pub fn describe(&self) -> String {
        match self {
            Self::V1 { memory, pids } => format!(
                "cgroup v1 (memory: {}, pids: {})",
                memory.display(),
                pids.display()
            ),
            Self::V2 { base } => format!("cgroup v2 ({})", base.display()),
        }
    }

    /// Find a writable place for per-run cgroups. `mount_root` is normally
    /// /sys/fs/cgroup and `self_cgroup` the text of /proc/self/cgroup.
    pub fn detect(mount_root: &Path, self_cgroup: &str) -> Result<Self, CgroupError> {
        let entries: Vec<(String, String)> = self_cgroup
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(3, ':');
                let _id = parts.next()?;
                Some((parts.next()?.to_string(), parts.next()?.to_string()))
            })
            .collect();
        let v1_path = |ctrl: &str| {
            entries
                .iter()
                .find(|(c, _)| c.split(',').any(|x| x == ctrl))
                .map(|(_, p)| join_cgroup(&mount_root.join(ctrl), p))
        };
        // Pure v2 first (its mount root has cgroup.controllers), then v1.
        if mount_root.join("cgroup.controllers").exists()
            && let Some((_, p)) = entries.iter().find(|(c, _)| c.is_empty())
        {
            let mut base = join_cgroup(mount_root, p);
            // Started from the leaf an earlier server moved its cgroup's processes into
            // (a restart from its shell, say): that server's runs, and the place for ours,
            // are beside it.
            if base.file_name().is_some_and(|n| n == SERVER_LEAF)
                && let Some(parent) = base.parent()
            {
                base = parent.to_path_buf();
            }
            return Self::prepare_v2(&base).map(|base| Self::V2 { base });
        }
        match (v1_path("memory"), v1_path("pids")) {
            (Some(memory), Some(pids)) => {
                for dir in [&memory, &pids] {
                    probe_dir(dir)?;
                }
                Ok(Self::V1 { memory, pids })
            }
            _ => Err(CgroupError::Unusable(
                "neither a cgroup v2 tree nor v1 memory and pids hierarchies are mounted".into(),
            )),
        }
    }

    /// v2 only lets a cgroup delegate controllers to children when it holds no process
    /// itself: if ours does, move this process into a leaf `sandbox-server` first.
    fn prepare_v2(base: &Path) -> Result<PathBuf, CgroupError> {
        let controllers = fs::read_to_string(base.join("cgroup.controllers"))
            .map_err(io_err("read", &base.join("cgroup.controllers")))?;
        for needed in ["memory", "pids"] {
            if !controllers.split_whitespace().any(|c| c == needed) {
                return Err(CgroupError::Unusable(format!(
                    "the {needed} controller is not available in {}",
                    base.display()
                )));
            }
        }
        let subtree = base.join("cgroup.subtree_control");
        if fs::write(&subtree, "+memory +pids").is_err() {
            let leaf = base.join(SERVER_LEAF);
            fs::create_dir_all(&leaf).map_err(io_err("create", &leaf))?;
            let procs = fs::read_to_string(base.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.split_whitespace() {
                // Processes that exit meanwhile are fine to miss.
                let _ = fs::write(leaf.join("cgroup.procs"), pid);
            }
            fs::write(&subtree, "+memory +pids")
                .map_err(io_err("enable controllers in", &subtree))?;
        }
        probe_dir(base)?;
        Ok(base.to_path_buf())
    }

    /// The directories per-run cgroups are created in.
    pub fn bases(&self) -> Vec<PathBuf> {
        match self {
            Self::V1 { memory, pids } => vec![memory.clone(), pids.clone()],
            Self::V2 { base } => vec![base.clone()],
        }
    }

    /// Create the cgroup of one run with its limits.
    pub fn create_run(
        &self,
        name: &str,
        memory_bytes: u64,
        max_pids: u64,
    ) -> Result<RunCgroup, CgroupError> {
        match self {
            Self::V1 { memory, pids } => {
                let mem = memory.join(name);
                let pid = pids.join(name);
                let cg = RunCgroup {
                    v2: false,
                    memory: mem.clone(),
                    pids: pid.clone(),
                };
                fs::create_dir(&mem).map_err(io_err("create", &mem))?;
                fs::create_dir(&pid).map_err(io_err("create", &pid))?;
                write(&mem.join("memory.limit_in_bytes"), memory_bytes)?;
                // Without swap accounting this file is absent; the plain limit still holds.
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, memory_bytes)?;
                }
                write(&pid.join("pids.max"), max_pids)?;
                Ok(cg)
            }
            Self::V2 { base } => {
                let dir = base.join(name);
                fs::create_dir(&dir).map_err(io_err("create", &dir))?;
                let cg = RunCgroup {
                    v2: true,
                    memory: dir.clone(),
                    pids: dir.clone(),
                };
                write(&dir.join("memory.max"), memory_bytes)?;
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, 0)?;
                }
                write(&dir.join("pids.max"), max_pids)?;
                Ok(cg)
            }
        }
    }

    /// Remove per-run cgroups left behind by servers that died: names are
    /// `<prefix><server pid>-<n>`, and only those whose server is gone are touched
    /// (another live server may have just created one that is still empty).
    pub fn remove_stale(&self, prefix: &str) {
        for dir in self.bases() {
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(rest) = name.strip_prefix(prefix) else {
                    continue;
                };
                let owner = rest.split('-').next().unwrap_or("");
                if !owner.is_empty() && !alive(owner) {
                    // Its runs may still be running, past any timeout: killed first.
                    let path = entry.path();
                    let orphan = RunCgroup {
                        v2: matches!(self, Self::V2 { .. }),
                        memory: path.clone(),
                        pids: path,
                    };
                    orphan.remove();
                }
            }
        }
    }
}

/// Whether process `pid` runs: a zombie (killed, its parent not yet told) does not.
fn alive(pid: &str) -> bool {
    fs::read_to_string(Path::new("/proc").join(pid).join("stat")).is_ok_and(|stat| {
        // The state follows the command name, which ends at the last ')'.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// The leaf a server moves its cgroup's processes into, so that the cgroup may hold runs'.
const SERVER_LEAF: &str = "sandbox-server";

fn join_cgroup(root: &Path, rel: &str) -> PathBuf {
    root.join(rel.trim_start_matches('/'))
}

fn probe_dir(dir: &Path) -> Result<(), CgroupError> {
    let probe = dir.join(format!("sandbox-probe-{}", std::process::id()));
    fs::create_dir(&probe).map_err(io_err("create a cgroup under", dir))?;
    fs::remove_dir(&probe).map_err(io_err("remove", &probe))
}

fn write(path: &Path, value: u64) -> Result<(), CgroupError> {
    fs::write(path, value.to_string()).map_err(io_err("write", path))
}

/// One run's cgroup (two directories on v1, one on v2).
#[derive(Debug)]
pub struct RunCgroup {
    v2: bool,
    memory: PathBuf,
    pids: PathBuf,
}

impl RunCgroup {
    /// The run's directories: one on v2 (memory and pids share it), two on v1.
    fn dirs(&self) -> Vec<&Path> {
        if self.v2 {
            vec![&self.memory]
        } else {
            vec![&self.memory, &self.pids]
        }
    }

    /// The files the helper writes its pid into.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    fn counter(path: &Path, key: &str) -> u64 {
        fs::read_to_string(path)
            .ok()
            .and_then(|text| {
                text.lines().find_map(|l| {
                    let mut it = l.split_whitespace();
                    (it.next() == Some(key))
                        .then(|| it.next().and_then(|v| v.parse().ok()))
                        .flatten()
                })
            })
            .unwrap_or(0)
    }

    /// Whether the kernel OOM-killed something in this run.
    pub fn oom_killed(&self) -> bool {
        if self.v2 {
            Self::counter(&self.memory.join("memory.events"), "oom_kill") > 0
        } else {
            Self::counter(&self.memory.join("memory.oom_control"), "oom_kill") > 0
        }
    }

    /// Whether a fork or thread creation was refused by pids.max.
    pub fn pids_limit_hit(&self) -> bool {
        Self::counter(&self.pids.join("pids.events"), "max") > 0
    }

    /// Whether no process is left in the run (a directory already gone counts as empty).
    pub fn is_empty(&self) -> bool {
        self.dirs().into_iter().all(|d| {
            fs::read_to_string(d.join("cgroup.procs")).map_or(true, |p| p.trim().is_empty())
        })
    }

    /// SIGKILL every process of the run but `spared` (the run's owner, which then reaps
    /// what it forked: a process whose parent is killed too is left a zombie for init).
    /// One pass: a run cannot fork, and the caller waits for the cgroup to empty.
    pub fn kill_all_but(&self, spared: u32) {
        self.signal_procs(Some(spared));
    }

    /// SIGKILL every process left in the run.
    pub fn kill_all(&self) {
        if self.v2 && fs::write(self.memory.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for _ in 0..50 {
            if self.signal_procs(None) == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGKILL the processes listed in the run's cgroup but `spared`; how many there were.
    fn signal_procs(&self, spared: Option<u32>) -> usize {
        let procs = fs::read_to_string(self.memory.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|p| u32::try_from(*p).ok() != spared)
            .collect();
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        pids.len()
    }

    /// Kill what is left and remove the directories (retrying while the kernel
    /// finishes tearing the processes down).
    pub fn remove(self) {
        self.kill_all();
        for dir in self.dirs() {
            for attempt in 0..100 {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) => {
                        if attempt == 99 {
                            tracing::warn!(path = %dir.display(), error = %e, "could not remove a run's cgroup");
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_detection_uses_our_own_cgroup_paths() {
        let root = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(root.path().join("memory/process_api/abc")).unwrap();
        fs::create_dir_all(root.path().join("pids")).unwrap();
        let text = "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/abc\n0::/\n";
        let d = CgroupDriver::detect(root.path(), text).expect("detects v1");
        assert_eq!(
            d,
            CgroupDriver::V1 {
                memory: root.path().join("memory/process_api/abc"),
                pids: root.path().join("pids")
            }
        );
    }

    #[test]
    fn v2_runs_get_memory_swap_and_pids_limits_under_our_cgroup() {
        let root = tempfile::tempdir().expect("tempdir");
        let base = root.path().join("system.slice/sandbox.service");
        fs::create_dir_all(&base).unwrap();
        fs::write(root.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        fs::write(base.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        fs::write(base.join("cgroup.subtree_control"), "").unwrap();
        let d = CgroupDriver::detect(root.path(), "0::/system.slice/sandbox.service\n")
            .expect("detects v2");
        assert_eq!(d, CgroupDriver::V2 { base: base.clone() });
        assert_eq!(
            fs::read_to_string(base.join("cgroup.subtree_control")).unwrap(),
            "+memory +pids"
        );
        let cg = d
            .create_run("sandbox-run-1-0", 64 << 20, 32)
            .expect("run cgroup");
        let dir = base.join("sandbox-run-1-0");
        assert_eq!(
            fs::read_to_string(dir.join("memory.max")).unwrap(),
            (64u64 << 20).to_string()
        );
        assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap(), "32");
        assert_eq!(cg.procs_files(), vec![dir.join("cgroup.procs")]);
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert!(cg.oom_killed());
    }

    #[test]
    fn v2_without_the_memory_controller_is_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        fs::write(root.path().join("cgroup.controllers"), "cpu pids\n").unwrap();
        let err = CgroupDriver::detect(root.path(), "0::/\n").unwrap_err();
        assert!(err.to_string().contains("memory controller"), "{err}");
    }

    #[test]
    fn missing_hierarchies_are_reported() {
        let root = tempfile::tempdir().expect("tempdir");
        let err = CgroupDriver::detect(root.path(), "0::/\n").unwrap_err();
        assert!(err.to_string().contains("no usable hierarchy"), "{err}");
    }

    #[test]
    fn counters_are_read_from_event_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(
            dir.path().join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        fs::write(dir.path().join("pids.events"), "max 0\n").unwrap();
        let cg = RunCgroup {
            v2: false,
            memory: dir.path().into(),
            pids: dir.path().into(),
        };
        assert!(cg.oom_killed());
        assert!(!cg.pids_limit_hit());
    }
}
