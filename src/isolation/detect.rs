//! What this host lets the sandbox do, found once at start by trying it: namespaces and
//! mounts (in a throw-away child process), chroot, seccomp, cgroups.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use super::cgroup::{CgroupDriver, CgroupError};
use super::spec::IsolationLevel;
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};

/// The capability mapping below vm.mmap_min_addr takes (see `seccomp::programs::exec_page`).
pub const CAP_SYS_RAWIO: u32 = 17;

/// This process's effective capabilities, as /proc/self/status shows them.
pub fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// What the host refused when a probe tried it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refused {
    /// Not tried: only root may (chroot, cgroups).
    #[error("not root")]
    NotRoot,
    #[error("could not start the probe /proc/self/exe: {0}")]
    ProbeNotStarted(Arc<std::io::Error>),
    /// What the probe, a throw-away process, said on stderr.
    #[error("{0}")]
    Probe(String),
    #[error("the kernel lacks the errno action (has: {0})")]
    NoErrnoAction(String),
    #[error("the kernel has no seccomp support")]
    NoSeccomp,
    #[error(transparent)]
    Cgroup(Arc<CgroupError>),
}

#[derive(Debug, Clone)]
pub struct HostReport {
    pub root: bool,
    pub namespaces: Result<(), Refused>,
    pub chroot: Result<(), Refused>,
    pub seccomp: Result<(), Refused>,
    /// The cgroup driver, described.
    pub cgroup: Result<String, Refused>,
    /// vm.mmap_min_addr: where the exec lock's page can go (see `seccomp::programs::exec_page`).
    pub mmap_min_addr: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Host {
    pub level: IsolationLevel,
    pub cgroup: Option<CgroupDriver>,
    pub report: HostReport,
}

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(
        "the sandbox must run as root, or without root in a user namespace, which this host refuses ({0}). Run it with sudo or as root for the full sandbox (its own uid per run and cgroups), or allow unprivileged user namespaces (sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone, or the AppArmor restriction on Ubuntu 24.04: kernel.apparmor_restrict_unprivileged_userns=0). `sandbox run --server URL` runs snippets on a remote `sandbox serve` without either"
    )]
    NotRoot(Refused),
    #[error(
        "seccomp filters are not available: {0}. Use a kernel built with CONFIG_SECCOMP_FILTER"
    )]
    NoSeccomp(Refused),
    #[error(
        "neither namespaces nor chroot are permitted here (namespaces: {namespaces}; chroot: {chroot}). In Docker, keep the default capabilities (CAP_SYS_CHROOT) or run with --privileged"
    )]
    NoIsolation {
        namespaces: Refused,
        chroot: Refused,
    },
}

/// The probe's own entry (`sandbox __probe <dir>`): try what a run will do, in this
/// throw-away process.
pub fn probe_main(mount_dir: &str) -> i32 {
    if !nix::unistd::geteuid().is_root() {
        // Rootless: everything below happens inside a user namespace of our own.
        let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
        if let Err(e) = super::userns::enter(uid.as_raw(), gid.as_raw()) {
            eprintln!("{e}");
            return 1;
        }
    }
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWNET;
    if let Err(e) = unshare(flags) {
        eprintln!("unshare: {}", e.desc());
        return 1;
    }
    if let Err(e) = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    ) {
        eprintln!("making mounts private: {}", e.desc());
        return 1;
    }
    if let Err(e) = mount(
        Some("tmpfs"),
        mount_dir,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=64k"),
    ) {
        eprintln!("mounting a tmpfs on {mount_dir}: {}", e.desc());
        return 1;
    }
    0
}

/// Run `sandbox <args>` (a hidden probe entry) in a throw-away process, so what it tries
/// never touches this one; its stderr says why it failed.
fn probe_in_child(args: &[&std::ffi::OsStr]) -> Result<(), Refused> {
    let out = Command::new("/proc/self/exe")
        .args(args)
        .output()
        .map_err(|e| Refused::ProbeNotStarted(Arc::new(e)))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Refused::Probe(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

fn probe_namespaces(mount_dir: &Path) -> Result<(), Refused> {
    probe_in_child(&["__probe".as_ref(), mount_dir.as_os_str()])
}

/// chroot needs CAP_SYS_CHROOT.
fn probe_chroot() -> Result<(), Refused> {
    probe_in_child(&["__probe-chroot".as_ref()])
}

pub fn probe_chroot_main() -> i32 {
    match nix::unistd::chroot("/") {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("chroot: {}", e.desc());
            1
        }
    }
}

fn probe_seccomp() -> Result<(), Refused> {
    let actions = Path::new("/proc/sys/kernel/seccomp/actions_avail");
    match std::fs::read_to_string(actions) {
        Ok(text) if text.contains("errno") => Ok(()),
        Ok(text) => Err(Refused::NoErrnoAction(text.trim().into())),
        Err(_) => {
            // Older kernels lack the file; the Seccomp line of /proc/self/status still
            // tells whether filters exist.
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            if status.lines().any(|l| l.starts_with("Seccomp:")) {
                Ok(())
            } else {
                Err(Refused::NoSeccomp)
            }
        }
    }
}

/// What the probes found, before any decision: `doctor` shows it whole, even on a host
/// where `serve` could not start.
#[derive(Debug, Clone)]
pub struct Probe {
    pub report: HostReport,
    cgroup: Option<CgroupDriver>,
}

/// Try everything a run needs, in throw-away child processes. `mount_dir` is the
/// (empty) directory private roots are mounted on.
pub fn probe(mount_dir: &Path) -> Probe {
    let root = nix::unistd::geteuid().is_root();
    let not_root = || Err(Refused::NotRoot);
    // Without root the same probe runs inside a user namespace (the rootless level).
    // The two probes are processes of their own: started together.
    let (namespaces, chroot) = std::thread::scope(|scope| {
        let chroot = scope.spawn(|| if root { probe_chroot() } else { not_root() });
        let namespaces = probe_namespaces(mount_dir);
        let chroot = chroot
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (namespaces, chroot)
    });
    let seccomp = probe_seccomp();
    let self_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let cgroup = if root {
        CgroupDriver::detect(Path::new("/sys/fs/cgroup"), &self_cgroup)
            .map_err(|e| Refused::Cgroup(Arc::new(e)))
    } else {
        Err(Refused::NotRoot)
    };
    let report = HostReport {
        root,
        namespaces,
        chroot,
        seccomp,
        cgroup: cgroup.as_ref().map(|d| d.describe()).map_err(Clone::clone),
        mmap_min_addr: std::fs::read_to_string("/proc/sys/vm/mmap_min_addr")
            .ok()
            .and_then(|s| s.trim().parse().ok()),
    };
    Probe {
        report,
        cgroup: cgroup.ok(),
    }
}

/// Pick the isolation level from what the probes found; `force` picks a level for
/// testing or for operators who want chroot.
pub fn decide(probe: Probe, force: Option<IsolationLevel>) -> Result<Host, DetectError> {
    let Probe { report, cgroup } = probe;
    if let Err(e) = &report.seccomp {
        return Err(DetectError::NoSeccomp(e.clone()));
    }
    if !report.root {
        return match &report.namespaces {
            Ok(()) => Ok(Host {
                level: IsolationLevel::Rootless,
                cgroup: None,
                report,
            }),
            Err(e) => Err(DetectError::NotRoot(e.clone())),
        };
    }
    let level = match (force, &report.namespaces, &report.chroot) {
        (Some(IsolationLevel::Chroot), _, Ok(())) => IsolationLevel::Chroot,
        (_, Ok(()), _) => IsolationLevel::Namespaces,
        (_, Err(_), Ok(())) => IsolationLevel::Chroot,
        (_, Err(n), Err(c)) => {
            return Err(DetectError::NoIsolation {
                namespaces: n.clone(),
                chroot: c.clone(),
            });
        }
    };
    Ok(Host {
        level,
        cgroup,
        report,
    })
}

/// Detect once at start: `probe` then `decide`.
pub fn detect(mount_dir: &Path, force: Option<IsolationLevel>) -> Result<Host, DetectError> {
    decide(probe(mount_dir), force)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(root: bool, namespaces: Result<(), Refused>) -> Probe {
        Probe {
            report: HostReport {
                root,
                namespaces,
                chroot: Err(Refused::NotRoot),
                seccomp: Ok(()),
                cgroup: Err(Refused::NotRoot),
                mmap_min_addr: Some(65536),
            },
            cgroup: None,
        }
    }

    #[test]
    fn without_root_a_user_namespace_gives_the_rootless_level() {
        let host = decide(probe(false, Ok(())), None).unwrap();
        assert_eq!(host.level, IsolationLevel::Rootless);
        assert!(host.cgroup.is_none());
    }

    #[test]
    fn without_root_or_user_namespaces_the_error_says_what_to_do() {
        let e = decide(
            probe(
                false,
                Err(Refused::Probe("unshare: No space left on device".into())),
            ),
            None,
        )
        .unwrap_err()
        .to_string();
        for part in [
            "No space left on device",
            "sudo",
            "user.max_user_namespaces",
            "--server",
        ] {
            assert!(e.contains(part), "{part}: {e}");
        }
    }

    #[test]
    fn with_neither_namespaces_nor_chroot_both_refusals_are_named() {
        let mut p = probe(
            true,
            Err(Refused::Probe("unshare: Operation not permitted".into())),
        );
        p.report.chroot = Err(Refused::Probe("chroot: Operation not permitted".into()));
        let e = decide(p, None).unwrap_err();
        assert!(matches!(e, DetectError::NoIsolation { .. }), "{e}");
        let e = e.to_string();
        for part in ["namespaces: unshare", "chroot: chroot", "CAP_SYS_CHROOT"] {
            assert!(e.contains(part), "{part}: {e}");
        }
    }
}
