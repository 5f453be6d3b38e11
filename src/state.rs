//! The state directory's layout, in one place: what the server keeps on disk between
//! runs and where. Everything below `state_dir` is named here and nowhere else.
//!
//! ```text
//! <state_dir>/
//!   rootfs/               empty mount point; each run mounts its private root here,
//!                         inside its own mount namespace
//!   root-<language>/      the copied root runs chroot into (chroot level only)
//!   python-packages/      extra Python packages, one generation per install
//!   nodejs-packages/      extra Node.js packages, likewise
//!   uids/                 uid leases, without root only (see `uid_leases`)
//!   runs/<id>/job/        `sandbox run`: the script and its input files, bound
//!                         read-only at /job
//!   runs/<id>/out/        `sandbox run`: bound at the run's /tmp/out, copied back with
//!                         --out once the run is gone
//! ```
//!
//! As root, uid leases live in `/run/sandbox/uids` whatever `state_dir` says: every
//! server on the host must see every lease, or two of them would hand out one uid.

use std::path::PathBuf;

use crate::runtime::Language;

/// Where root's servers lease sandbox uids, shared by all of them on the host.
pub const HOST_UID_LEASES: &str = "/run/sandbox/uids";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir(PathBuf);

impl StateDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    /// The empty directory private roots are mounted on.
    pub fn mount_point(&self) -> PathBuf {
        self.0.join("rootfs")
    }

    /// The copied root a language's runs chroot into (chroot level only).
    pub fn chroot_root(&self, language: Language) -> PathBuf {
        self.0.join(format!("root-{language}"))
    }

    /// Lock files of the uid leases (see `isolation::uids`): host-wide as root; without
    /// root a run's uid exists only inside its own user namespace, so the state
    /// directory will do.
    pub fn uid_leases(&self, root: bool) -> PathBuf {
        if root {
            PathBuf::from(HOST_UID_LEASES)
        } else {
            self.0.join("uids")
        }
    }

    /// A language's extra packages (see `deps`).
    pub fn packages(&self, language: Language) -> PathBuf {
        match language {
            Language::Python3 => self.0.join("python-packages"),
            Language::Nodejs => self.0.join("nodejs-packages"),
        }
    }

    /// Per-run directories of `sandbox run` (see `cli::run::stage`).
    pub fn runs(&self) -> PathBuf {
        self.0.join("runs")
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn every_place_lies_below_the_state_directory() {
        let s = StateDir::new("/var/lib/sandbox");
        assert_eq!(s.mount_point(), Path::new("/var/lib/sandbox/rootfs"));
        assert_eq!(
            s.chroot_root(Language::Python3),
            Path::new("/var/lib/sandbox/root-python3")
        );
        assert_eq!(
            s.packages(Language::Python3),
            Path::new("/var/lib/sandbox/python-packages")
        );
        assert_eq!(s.uid_leases(true), Path::new("/run/sandbox/uids"));
        assert_eq!(s.uid_leases(false), Path::new("/var/lib/sandbox/uids"));
        assert_eq!(s.runs(), Path::new("/var/lib/sandbox/runs"));
    }
}
