//! Builds the seccomp filter for a run from the policy tables and loads it.

use libseccomp::{
    ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall, error::SeccompError,
};

use super::policy;
use crate::isolation::spec::{IsolationLevel, NetworkSetup, Profile};
use crate::isolation::sys;

#[derive(Debug, thiserror::Error)]
pub enum SeccompApplyError {
    #[error("seccomp: could not create the filter context: {0}")]
    Context(#[source] SeccompError),
    #[error("seccomp: could not add the rule for {syscall}: {source}")]
    Rule {
        syscall: String,
        #[source]
        source: SeccompError,
    },
    #[error("seccomp: cannot export the filter: {0}")]
    Export(String),
}

/// Which sockets a run may create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketPolicy {
    /// IPv4 sockets (runs with network).
    pub inet: bool,
    /// IPv6 sockets too. A run's own namespace is IPv4 only: there `socket(AF_INET6)`
    /// fails with EAFNOSUPPORT, as on a kernel without IPv6, so software falls back to
    /// IPv4 and nothing of IPv6 (flow labels, multicast listener reports sent by kernel
    /// timers after the run) can be left in the namespace.
    pub ipv6: bool,
    /// `socket(AF_UNIX)`: only in a network namespace of the run's own, since abstract
    /// Unix socket names belong to the network namespace.
    pub unix: bool,
    /// `socketpair()` of stream sockets only: in the host's network namespace a datagram
    /// pair could `sendto` any abstract name of the host.
    pub stream_pairs_only: bool,
}

impl SocketPolicy {
    /// What a run at `level` with `network` may create. The chroot level has no network
    /// namespace: an offline run there is in the host's too, so it gets the host's rules
    /// for Unix sockets (the host's abstract names would otherwise be in reach).
    pub fn for_run(network: NetworkSetup, level: IsolationLevel) -> Self {
        let policy = Self::for_network(network);
        match level {
            IsolationLevel::Chroot => Self {
                unix: false,
                stream_pairs_only: true,
                ..policy
            },
            _ => policy,
        }
    }

    pub fn for_network(network: NetworkSetup) -> Self {
        match network {
            NetworkSetup::Offline => Self {
                inet: false,
                ipv6: false,
                unix: true,
                stream_pairs_only: false,
            },
            NetworkSetup::Own => Self {
                inet: true,
                ipv6: false,
                unix: true,
                stream_pairs_only: false,
            },
            NetworkSetup::Host => Self {
                inet: true,
                ipv6: true,
                unix: false,
                stream_pairs_only: true,
            },
        }
    }
}

/// What the filter must allow beyond the profile's table.
pub struct FilterOptions<'a> {
    pub profile: Profile,
    pub sockets: SocketPolicy,
    /// Non-empty: replaces the plain allow-lists (the operator's `allowed_syscalls`).
    pub allowed_syscalls: &'a [i64],
    /// Added to whichever plain allow-list applies (the operator's `extra_syscalls`).
    pub extra_syscalls: &'a [i64],
    /// The only pathname pointer `execveat` may receive (see `seccomp::programs::exec_page`); `None`
    /// for a process that has nothing left to exec (a fork server's run), where every
    /// exec is refused.
    pub exec_path: Option<u64>,
}

fn rule_err(name: &str) -> impl FnOnce(SeccompError) -> SeccompApplyError + '_ {
    move |source| SeccompApplyError::Rule {
        syscall: name.to_string(),
        source,
    }
}

/// Resolve a name on the native architecture; names this architecture lacks (such as
/// `open` on arm64) are skipped rather than failing the run.
fn resolve(name: &str) -> Option<ScmpSyscall> {
    ScmpSyscall::from_name(name).ok()
}

fn allow(ctx: &mut ScmpFilterContext, name: &str) -> Result<(), SeccompApplyError> {
    if let Some(sc) = resolve(name) {
        ctx.add_rule(ScmpAction::Allow, sc)
            .map_err(rule_err(name))?;
    }
    Ok(())
}

pub fn build(opts: &FilterOptions<'_>) -> Result<ScmpFilterContext, SeccompApplyError> {
    if opts.profile == Profile::Installer {
        return build_installer(opts.sockets);
    }
    let eperm = ScmpAction::Errno(libc::EPERM);
    let mut ctx = ScmpFilterContext::new(eperm).map_err(SeccompApplyError::Context)?;
    // no_new_privs is set by the helper itself, before the filter.
    ctx.set_ctl_nnp(false).map_err(SeccompApplyError::Context)?;

    if opts.allowed_syscalls.is_empty() {
        let extra = match opts.profile {
            Profile::Python => policy::PYTHON,
            Profile::Nodejs | Profile::Installer => policy::NODEJS,
        };
        for (name, _why) in policy::COMMON.iter().chain(extra) {
            allow(&mut ctx, name)?;
        }
    }
    // The syscalls with fixed rules keep them whatever the operator's lists say.
    for &nr in opts.allowed_syscalls.iter().chain(opts.extra_syscalls) {
        if policy::is_fixed(nr) {
            continue;
        }
        let sc = ScmpSyscall::from(nr as i32);
        ctx.add_rule(ScmpAction::Allow, sc)
            .map_err(rule_err(&format!("syscall number {nr}")))?;
    }

    for (name, _why) in policy::SOCKETS {
        allow(&mut ctx, name)?;
    }
    let mut families = Vec::new();
    if opts.sockets.unix {
        families.push(libc::AF_UNIX);
    }
    if opts.sockets.inet {
        families.push(libc::AF_INET);
    }
    if opts.sockets.inet && opts.sockets.ipv6 {
        families.push(libc::AF_INET6);
    }
    if let Some(socket) = resolve("socket") {
        for family in families {
            ctx.add_rule_conditional(
                ScmpAction::Allow,
                socket,
                &[ScmpArgCompare::new(0, ScmpCompareOp::Equal, family as u64)],
            )
            .map_err(rule_err("socket"))?;
        }
        if opts.sockets.inet && !opts.sockets.ipv6 {
            ipv6_unsupported(&mut ctx, socket)?;
        }
    }
    // socketpair() makes AF_UNIX pairs only (asyncio's self-pipe, libuv's signal pipe).
    if let Some(socketpair) = resolve("socketpair") {
        let mut conditions = vec![ScmpArgCompare::new(
            0,
            ScmpCompareOp::Equal,
            libc::AF_UNIX as u64,
        )];
        if opts.sockets.stream_pairs_only {
            // The type's low bits; SOCK_CLOEXEC and SOCK_NONBLOCK ride above them.
            conditions.push(ScmpArgCompare::new(
                1,
                ScmpCompareOp::MaskedEqual(0xf),
                libc::SOCK_STREAM as u64,
            ));
        }
        ctx.add_rule_conditional(ScmpAction::Allow, socketpair, &conditions)
            .map_err(rule_err("socketpair"))?;
    }

    for (name, _why) in policy::ENOSYS {
        if let Some(sc) = resolve(name) {
            ctx.add_rule(ScmpAction::Errno(libc::ENOSYS), sc)
                .map_err(rule_err(name))?;
        }
    }

    // Threads yes, processes no: clone is allowed only with CLONE_THREAD.
    if let Some(clone) = resolve("clone") {
        let thread = libc::CLONE_THREAD as u64;
        ctx.add_rule_conditional(
            ScmpAction::Allow,
            clone,
            &[ScmpArgCompare::new(
                0,
                ScmpCompareOp::MaskedEqual(thread),
                thread,
            )],
        )
        .map_err(rule_err("clone"))?;
    }

    // The one exec the helper performs: execveat on the interpreter's descriptor with
    // the helper's own empty pathname. After that exec the descriptor is closed
    // (O_CLOEXEC) and cannot be recreated (RLIMIT_NOFILE is below it). The descriptor is
    // no lock on its own: a pathname that is absolute makes the kernel ignore it, so a
    // snippet that maps the page and writes a path there execs that path.
    if let (Some(execveat), Some(exec_path)) = (resolve("execveat"), opts.exec_path) {
        let admitted = [
            (0, sys::EXEC_FD as u64),
            (1, exec_path),
            (4, libc::AT_EMPTY_PATH as u64),
        ];
        ctx.add_rule_conditional(
            ScmpAction::Allow,
            execveat,
            &admitted.map(|(arg, value)| ScmpArgCompare::new(arg, ScmpCompareOp::Equal, value)),
        )
        .map_err(rule_err("execveat"))?;
        // Any other execveat ends the process. An errno would be an oracle: the admitted
        // pointer gets past the filter and fails with EFAULT, any other with EPERM, so
        // the random page (no CAP_SYS_RAWIO) would fall to a search at one system call
        // per guess, about an hour of CPU, and stay found for the server's life. Killed,
        // each guess costs a run.
        for (arg, value) in admitted {
            ctx.add_rule_conditional(
                ScmpAction::KillProcess,
                execveat,
                &[ScmpArgCompare::new(arg, ScmpCompareOp::NotEqual, value)],
            )
            .map_err(rule_err("execveat"))?;
        }
    }

    // prlimit64 may read limits (new_limit == NULL) but never raise them.
    if let Some(prlimit) = resolve("prlimit64") {
        ctx.add_rule_conditional(
            ScmpAction::Allow,
            prlimit,
            &[ScmpArgCompare::new(2, ScmpCompareOp::Equal, 0)],
        )
        .map_err(rule_err("prlimit64"))?;
    }
    Ok(ctx)
}

/// `socket(AF_INET6)` fails as on a kernel without IPv6 (see `SocketPolicy::ipv6`).
fn ipv6_unsupported(
    ctx: &mut ScmpFilterContext,
    socket: ScmpSyscall,
) -> Result<(), SeccompApplyError> {
    ctx.add_rule_conditional(
        ScmpAction::Errno(libc::EAFNOSUPPORT),
        socket,
        &[ScmpArgCompare::new(
            0,
            ScmpCompareOp::Equal,
            libc::AF_INET6 as u64,
        )],
    )
    .map_err(rule_err("socket"))?;
    Ok(())
}

/// An installer's filter: pip and npm exec compilers, git and shells, so unlike a run's
/// it allows by default; refused is what would reach past the jail's other walls (mounts,
/// namespaces, tracing, kernel modules, keyrings, BPF, io_uring) and sockets of kinds no
/// installer needs.
fn build_installer(sockets: SocketPolicy) -> Result<ScmpFilterContext, SeccompApplyError> {
    let eperm = ScmpAction::Errno(libc::EPERM);
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow).map_err(SeccompApplyError::Context)?;
    ctx.set_ctl_nnp(false).map_err(SeccompApplyError::Context)?;
    for (name, _why) in policy::INSTALLER_REFUSED {
        if let Some(sc) = resolve(name) {
            ctx.add_rule(eperm, sc).map_err(rule_err(name))?;
        }
    }
    // clone3's flags are in memory the filter cannot read: ENOSYS sends the C library
    // back to clone, whose flags it can.
    if let Some(sc) = resolve("clone3") {
        ctx.add_rule(ScmpAction::Errno(libc::ENOSYS), sc)
            .map_err(rule_err("clone3"))?;
    }
    if let Some(clone) = resolve("clone") {
        for flag in [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWCGROUP,
            libc::CLONE_NEWTIME,
        ] {
            let flag = flag as u64;
            ctx.add_rule_conditional(
                eperm,
                clone,
                &[ScmpArgCompare::new(
                    0,
                    ScmpCompareOp::MaskedEqual(flag),
                    flag,
                )],
            )
            .map_err(rule_err("clone"))?;
        }
    }
    if let Some(socket) = resolve("socket") {
        let mut refused = vec![
            libc::AF_PACKET,
            libc::AF_KEY,
            libc::AF_ALG,
            libc::AF_VSOCK,
            libc::AF_BLUETOOTH,
            libc::AF_XDP,
            libc::AF_CAN,
            libc::AF_TIPC,
            libc::AF_RDS,
        ];
        if !sockets.inet {
            refused.push(libc::AF_INET);
        }
        for family in refused {
            ctx.add_rule_conditional(
                eperm,
                socket,
                &[ScmpArgCompare::new(0, ScmpCompareOp::Equal, family as u64)],
            )
            .map_err(rule_err("socket"))?;
        }
        if !sockets.ipv6 {
            ipv6_unsupported(&mut ctx, socket)?;
        }
        // Netlink for routes only (what name lookups ask); audit, netfilter and the rest
        // are refused.
        ctx.add_rule_conditional(
            eperm,
            socket,
            &[
                ScmpArgCompare::new(0, ScmpCompareOp::Equal, libc::AF_NETLINK as u64),
                ScmpArgCompare::new(2, ScmpCompareOp::NotEqual, libc::NETLINK_ROUTE as u64),
            ],
        )
        .map_err(rule_err("socket"))?;
    }
    Ok(ctx)
}

/// The filter as a classic BPF program (`struct sock_filter` entries), for a process
/// that loads it itself with prctl(PR_SET_SECCOMP) (a fork server's run).
pub fn export(opts: &FilterOptions<'_>) -> Result<Vec<u8>, SeccompApplyError> {
    use std::io::Read;
    let ctx = build(opts)?;
    // A filter is a few kilobytes, far below a pipe's buffer: written whole, then read.
    let (read, write) = nix::unistd::pipe()
        .map_err(|e| SeccompApplyError::Export(std::io::Error::from(e).to_string()))?;
    ctx.export_bpf(&write)
        .map_err(|e| SeccompApplyError::Export(e.to_string()))?;
    drop(write);
    let mut bpf = Vec::new();
    std::fs::File::from(read)
        .read_to_end(&mut bpf)
        .map_err(|e| SeccompApplyError::Export(e.to_string()))?;
    Ok(bpf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_resolve_on_this_architecture() {
        // Every name of the tables must be known to libseccomp, or be one of the few
        // that some architectures lack.
        let optional = [
            "open",
            "stat",
            "lstat",
            "access",
            "readlink",
            "rename",
            "mkdir",
            "rmdir",
            "unlink",
            "symlink",
            "chmod",
            "pipe",
            "dup2",
            "select",
            "poll",
            "time",
            "epoll_create",
            "epoll_wait",
            "eventfd",
            "fadvise64",
            "pkey_alloc",
            "pkey_free",
            "pkey_mprotect",
            "arch_prctl",
            "getpgrp",
        ];
        for (name, why) in policy::COMMON
            .iter()
            .chain(policy::NODEJS)
            .chain(policy::PYTHON)
            .chain(policy::SOCKETS)
            .chain(policy::ENOSYS)
            .chain(policy::INSTALLER_REFUSED)
        {
            assert!(!why.is_empty(), "{name} has no reason");
            if !optional.contains(name) {
                assert!(resolve(name).is_some(), "libseccomp does not know {name}");
            }
        }
    }

    #[test]
    fn dangerous_syscalls_are_not_in_any_table() {
        let forbidden = [
            "execve",
            "fork",
            "vfork",
            "ptrace",
            "mount",
            "umount2",
            "unshare",
            "setns",
            "bpf",
            "keyctl",
            "add_key",
            "reboot",
            "setuid",
            "setgid",
            "setresuid",
            "chroot",
            "pivot_root",
            "init_module",
            "perf_event_open",
            "io_uring_enter",
            "userfaultfd",
            "process_vm_readv",
            "process_vm_writev",
            "kexec_load",
            "clone",
        ];
        for (name, _) in policy::COMMON
            .iter()
            .chain(policy::NODEJS)
            .chain(policy::PYTHON)
            .chain(policy::SOCKETS)
        {
            assert!(
                !forbidden.contains(name),
                "{name} must not be allowed unconditionally"
            );
        }
    }

    #[test]
    fn filters_build_for_every_profile() {
        for profile in [Profile::Python, Profile::Nodejs] {
            for network in [NetworkSetup::Offline, NetworkSetup::Own, NetworkSetup::Host] {
                let opts = FilterOptions {
                    profile,
                    sockets: SocketPolicy::for_network(network),
                    allowed_syscalls: &[],
                    extra_syscalls: &[],
                    exec_path: Some(0x1000),
                };
                build(&opts).expect("filter builds");
            }
        }
        let custom = [0i64, 1, 60, 231];
        build(&FilterOptions {
            profile: Profile::Python,
            sockets: SocketPolicy::for_network(NetworkSetup::Offline),
            allowed_syscalls: &custom,
            extra_syscalls: &[239],
            exec_path: Some(0x1000),
        })
        .expect("custom list builds");
    }

    #[test]
    fn no_run_in_the_hosts_network_namespace_makes_unix_sockets() {
        for network in [NetworkSetup::Offline, NetworkSetup::Host] {
            let chroot = SocketPolicy::for_run(network, IsolationLevel::Chroot);
            assert!(!chroot.unix && chroot.stream_pairs_only, "{network:?}");
        }
        let offline = SocketPolicy::for_run(NetworkSetup::Offline, IsolationLevel::Namespaces);
        assert!(offline.unix && !offline.inet);
    }

    #[test]
    fn a_runs_own_namespace_is_ipv4_only() {
        let own = SocketPolicy::for_network(NetworkSetup::Own);
        assert!(own.inet && !own.ipv6);
        let host = SocketPolicy::for_network(NetworkSetup::Host);
        assert!(host.inet && host.ipv6);
    }

    #[test]
    fn an_exported_filter_is_whole_instructions() {
        let opts = FilterOptions {
            profile: Profile::Python,
            sockets: SocketPolicy::for_network(NetworkSetup::Own),
            allowed_syscalls: &[],
            extra_syscalls: &[],
            exec_path: None,
        };
        let bpf = export(&opts).expect("exports");
        // struct sock_filter is 8 bytes; a real filter has dozens of instructions.
        assert!(
            bpf.len() > 8 * 20 && bpf.len().is_multiple_of(8),
            "{}",
            bpf.len()
        );
    }
}
