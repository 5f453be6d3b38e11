//! What a run's plan decides: its level, root, ids, network, limits and interpreter, and
//! the jail they make (`jail`), which alone travels to the helper or the fork server: as
//! JSON on their sockets before anything else (never on a command line, where any user
//! of the host could read it with `ps`); the snippet itself comes later.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::jail::Jail;
pub use crate::protocol::{JOB_MOUNT, OUT_MOUNT};

/// How strongly the host lets us isolate a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsolationLevel {
    /// mount, pid, ipc, uts and net namespaces, a read-only bind-mounted root,
    /// pivot_root.
    Namespaces,
    /// No namespaces (an unprivileged container): chroot into a copied root.
    Chroot,
    /// Not root: a user namespace first (the caller's uid mapped to the run's uid, no
    /// other), then the same namespaces and root as `Namespaces`. No cgroups: memory and
    /// processes are limited by rlimits.
    Rootless,
}

impl IsolationLevel {
    /// Whether runs get their own mount namespace and pivot into a private root.
    pub fn private_root(self) -> bool {
        matches!(self, Self::Namespaces | Self::Rootless)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Namespaces => "namespaces (mount, pid, ipc, uts, net) + pivot_root + seccomp",
            Self::Chroot => "chroot + setuid + seccomp (no namespaces on this host)",
            Self::Rootless => {
                "rootless: user namespace + mount, pid, ipc, uts, net + pivot_root + seccomp (one uid, rlimits instead of cgroups)"
            }
        }
    }
}

/// The network namespace a run's processes live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkSetup {
    /// An empty namespace of its own (no network): loopback only, down.
    Offline,
    /// A namespace of its own prepared by the server (a veth pair to the host); its
    /// descriptor comes with the spec.
    Own,
    /// The server's own network namespace (the chroot level, or shared by request).
    Host,
}

impl NetworkSetup {
    pub fn networked(self) -> bool {
        !matches!(self, Self::Offline)
    }
}

/// Which seccomp allow-list a run gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    Python,
    Nodejs,
    /// A package installer (pip, npm): exec and child processes allowed, what would
    /// reach past its jail refused (see `seccomp::apply::build_installer`).
    Installer,
}

/// The files and directories that make up a language's read-only root.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootPlan {
    /// Host paths bind-mounted read-only at the same place in the root.
    pub binds: Vec<PathBuf>,
    /// Symbolic links recreated in the root: (link path, link target as on the host).
    pub symlinks: Vec<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Limits {
    /// Enforced by a cgroup when `cgroup_procs` is set, else by RLIMIT_AS (when set).
    pub address_space_bytes: Option<u64>,
    pub max_processes: u64,
    pub tmp_bytes: u64,
    pub cpu_seconds: u64,
    pub open_files: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSpec {
    pub level: IsolationLevel,
    /// Namespaces: an empty host directory the private root is mounted on.
    /// Chroot: the prepared root directory itself.
    pub root_dir: PathBuf,
    pub root: RootPlan,
    pub uid: u32,
    pub gid: u32,
    pub network: NetworkSetup,
    /// Files written into the private root (over what the plan binds at the same
    /// place): `/etc/passwd`, a networked run's `/etc/resolv.conf`.
    pub root_files: Vec<(PathBuf, String)>,
    pub limits: Limits,
    /// `cgroup.procs` files the helper writes its pid into before anything else.
    pub cgroup_procs: Vec<PathBuf>,
    pub profile: Profile,
    /// The interpreter: opened inside the root and executed through its descriptor.
    pub program: PathBuf,
    /// Working directory (and HOME/TMPDIR) of the run: its private /tmp, or under the
    /// chroot level a private directory inside the shared /tmp.
    pub workdir: PathBuf,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    /// A host directory bound read-only at `JOB_MOUNT` (the script and its input files),
    /// which becomes the run's cwd. Private roots only.
    #[serde(default)]
    pub job_dir: Option<PathBuf>,
    /// A host directory, writable by the run's uid, bound at `OUT_MOUNT`: what the run
    /// leaves there outlives it. Private roots only.
    #[serde(default)]
    pub out_dir: Option<PathBuf>,
    /// The run's extra packages: a generation's directory on the host and its place in
    /// the root, bound read-only there for the whole run. Private roots only.
    #[serde(default)]
    pub packages: Option<(PathBuf, PathBuf)>,
    /// The jail these decisions make, step by step: what the helper or the fork server
    /// carries out (and all either of them receives).
    pub jail: Jail,
}

impl SandboxSpec {
    /// The directory the interpreter starts in.
    pub fn cwd(&self) -> &Path {
        match self.job_dir {
            Some(_) => Path::new(JOB_MOUNT),
            None => &self.workdir,
        }
    }
}
