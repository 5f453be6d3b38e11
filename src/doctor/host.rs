//! Privileges, the exec lock, libseccomp, the kernel's isolation features and the state
//! directory: what `serve` needs from the host to isolate runs.

use crate::config::Config;
use crate::isolation::detect;

use super::packages::{Need, PackageManager};
use super::{Check, Status, check, ok};

/// Effective capabilities, from /proc/self/status.
pub(super) fn privileges_check(
    root: bool,
    caps: u64,
    user_namespaces: &Result<(), detect::Refused>,
) -> Check {
    const NEEDED: &[(u32, &str)] = &[
        (6, "CAP_SETGID"),
        (7, "CAP_SETUID"),
        (5, "CAP_KILL"),
        (18, "CAP_SYS_CHROOT"),
        (21, "CAP_SYS_ADMIN"),
    ];
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(bit, _)| caps & (1u64 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if !root {
        return match user_namespaces {
            Ok(()) => check(
                "privileges",
                Status::Warning,
                format!(
                    "not root (uid {}): rootless mode in a user namespace, with rlimits instead of cgroups",
                    nix::unistd::geteuid()
                ),
                Some("run as root (sudo sandbox ...) for per-run cgroups and the exec lock".into()),
            ),
            Err(e) => check(
                "privileges",
                Status::Failed,
                format!(
                    "not root (uid {}) and no user namespace: {e}",
                    nix::unistd::geteuid()
                ),
                Some(
                    "run as root (sudo sandbox ...); `sandbox run --server URL` needs no root"
                        .into(),
                ),
            ),
        };
    }
    match missing.as_slice() {
        [] => ok(
            "privileges",
            "root with CAP_SETUID, CAP_SETGID, CAP_KILL, CAP_SYS_CHROOT, CAP_SYS_ADMIN",
        ),
        ["CAP_SYS_ADMIN"] => check(
            "privileges",
            Status::Warning,
            "root without CAP_SYS_ADMIN: no namespaces, runs fall back to chroot",
            Some("in Docker: --cap-add SYS_ADMIN --security-opt seccomp=unconfined --security-opt apparmor=unconfined, or --privileged".into()),
        ),
        _ => check(
            "privileges",
            Status::Failed,
            format!("root but missing {}", missing.join(", ")),
            Some("in Docker keep the default capabilities (no --cap-drop ALL) and add SYS_ADMIN, or run --privileged".into()),
        ),
    }
}

/// Where the interpreter's one exec pointer can live (see `isolation::seccomp::programs::exec_page`).
pub(super) fn exec_lock_check(root: bool, caps: u64, min: Option<u64>) -> Check {
    let rawio = caps & (1u64 << detect::CAP_SYS_RAWIO) != 0;
    match min {
        Some(m) if m >= 4096 && root && rawio => ok(
            "exec lock",
            format!(
                "the one exec the filter admits points below vm.mmap_min_addr ({m}), where no snippet can map"
            ),
        ),
        Some(m) if m >= 4096 => check(
            "exec lock",
            Status::Warning,
            "no CAP_SYS_RAWIO: the one exec the filter admits points to a random page (a snippet would have to guess it among 2^34)",
            Some("run as root; in Docker add --cap-add SYS_RAWIO".into()),
        ),
        _ => check(
            "exec lock",
            Status::Warning,
            format!(
                "vm.mmap_min_addr is {}: the one exec the filter admits points to a random page (a snippet would have to guess it among 2^34)",
                min.map_or_else(|| "unreadable".to_string(), |m| m.to_string())
            ),
            Some("sysctl -w vm.mmap_min_addr=65536 (and persist it in /etc/sysctl.d)".into()),
        ),
    }
}

pub(super) fn libseccomp_check(pm: PackageManager) -> Check {
    match libseccomp::ScmpVersion::current() {
        Ok(v) if (v.major, v.minor) >= (2, 5) => {
            ok("libseccomp", format!("{}.{}.{}", v.major, v.minor, v.micro))
        }
        Ok(v) => check(
            "libseccomp",
            Status::Failed,
            format!(
                "{}.{}.{} is too old: 2.5 or later is needed",
                v.major, v.minor, v.micro
            ),
            Some(pm.install(Need::Libseccomp)),
        ),
        Err(e) => check(
            "libseccomp",
            Status::Failed,
            format!("cannot tell its version: {e}"),
            Some(pm.install(Need::Libseccomp)),
        ),
    }
}

pub(super) fn isolation_checks(report: &detect::HostReport) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(match &report.seccomp {
        Ok(()) => ok("kernel seccomp", "seccomp filters with the errno action"),
        Err(e) => check(
            "kernel seccomp",
            Status::Failed,
            e.to_string(),
            Some("use a kernel built with CONFIG_SECCOMP=y and CONFIG_SECCOMP_FILTER=y".into()),
        ),
    });
    let ns_fix = "in Docker: --privileged, or --cap-add SYS_ADMIN --security-opt seccomp=unconfined --security-opt apparmor=unconfined";
    checks.push(match (&report.namespaces, &report.chroot) {
        (Ok(()), _) if report.root => ok(
            "namespaces",
            "mount, pid, ipc, uts, net and a private tmpfs",
        ),
        (Ok(()), _) => ok(
            "namespaces",
            "user namespace, then mount, pid, ipc, uts, net and a private tmpfs",
        ),
        (Err(n), Ok(())) => check(
            "namespaces",
            Status::Warning,
            format!("not permitted ({n}): runs fall back to chroot + setuid + seccomp"),
            Some(ns_fix.into()),
        ),
        (Err(n), Err(c)) => check(
            "namespaces",
            Status::Failed,
            format!("not permitted ({n}), and chroot neither ({c})"),
            Some(format!("{ns_fix}; at least keep CAP_SYS_CHROOT")),
        ),
    });
    checks.push(match &report.cgroup {
        Ok(d) => ok("cgroups", format!("{d}, writable")),
        Err(e) => check(
            "cgroups",
            Status::Warning,
            format!("{e}: memory and process limits fall back to rlimits"),
            Some(if report.root {
                "mount a writable cgroup v2 at /sys/fs/cgroup (in Docker: --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw)".into()
            } else {
                "run as root (sudo sandbox ...)".into()
            }),
        ),
    });
    checks
}

pub(super) fn state_dir_check(config: &Config) -> Check {
    let state_dir = &config.state_dir;
    let fix = Some("set state_dir / SANDBOX_STATE_DIR to a directory root can write".to_string());
    let mount_dir = crate::state::StateDir::new(&config.state_dir).mount_point();
    if let Err(e) = std::fs::create_dir_all(&mount_dir) {
        return check(
            "state directory",
            Status::Failed,
            format!("cannot create {}: {e}", mount_dir.display()),
            fix,
        );
    }
    let probe = state_dir.join(format!(".doctor-{}", std::process::id()));
    let written = std::fs::write(&probe, b"ok");
    let _ = std::fs::remove_file(&probe);
    match written {
        Ok(()) => ok(
            "state directory",
            format!("{} is writable", state_dir.display()),
        ),
        Err(e) => check(
            "state directory",
            Status::Failed,
            format!("cannot write in {}: {e}", state_dir.display()),
            fix,
        ),
    }
}
