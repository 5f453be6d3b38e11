//! The `__exec` helper: a short-lived, single-threaded copy of the `sandbox` binary that
//! the server starts for each run. It reads the snippet, forks the process that becomes
//! the interpreter, jails it step by step and reports how it ended.
//!
//! Why a separate process: after fork in a multi-threaded program (the tokio server)
//! only async-signal-safe calls are allowed, and the setup here allocates, formats and
//! calls libseccomp. Running it in a fresh single-threaded process makes that sound.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::prctl;
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{
    ForkResult, Gid, Uid, chdir, chroot, pipe2, setgroups, sethostname, setresgid, setresuid,
};
use serde::{Deserialize, Serialize};

use super::channel;
use super::forward::{forward_code, read_said};
use super::rootfs;
use super::seccomp::{self, FilterOptions, SocketPolicy};
use super::snippet;
use super::spec::{IsolationLevel, JOB_MOUNT, NetworkSetup, OUT_MOUNT, SandboxSpec};
use super::step::{Step, StepError, io_step, step};
use super::sys;
use super::userns;

/// The descriptor the snippet is readable on inside the sandbox.
pub const CODE_FD: i32 = 3;
/// Where the child keeps the setup-error pipe until exec closes it: a number no step
/// closes or reuses, so a step that fails after the descriptors are rearranged is
/// still reported.
const ERROR_FD: i32 = 1022;
/// Where the snippet's socket waits while the low descriptors are cleared.
const CODE_PARKING_FD: i32 = 1021;

/// How a run ended, as the helper tells the server (one JSON line on its stdin socket;
/// two when the run announced its end: `Announced` first, then how it really ended).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HelperReport {
    /// The run closed its output and said it exits with `code`; its processes may still
    /// be running. The server may answer on it, but the run is over only at the next report.
    Announced {
        code: i32,
    },
    Exited {
        code: i32,
    },
    Signaled {
        signal: i32,
    },
    SetupFailed {
        message: String,
    },
    /// The interpreter ended before the whole snippet reached it (a warm worker killed
    /// while it waited, or an interpreter that could not even start).
    EndedBeforeCode,
}

impl From<StepError> for HelperReport {
    fn from(e: StepError) -> Self {
        Self::SetupFailed {
            message: e.to_string(),
        }
    }
}

/// Entry point of `sandbox __exec`: the spec comes first on stdin (see `channel`).
/// Returns the helper's exit code.
pub fn main() -> i32 {
    let mut channel = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => UnixStream::from(fd),
        Err(e) => {
            eprintln!("sandbox helper: stdin is not usable: {e}");
            return 125;
        }
    };
    let report = match channel::recv_spec(&channel)
        .map_err(|e| e.to_string())
        .and_then(|(json, fds)| {
            serde_json::from_slice::<SandboxSpec>(&json)
                .map(|spec| (spec, fds))
                .map_err(|e| format!("invalid helper spec: {e}"))
        }) {
        Ok((spec, fds)) => run(&spec, fds, &mut channel),
        Err(message) => HelperReport::SetupFailed { message },
    };
    tell(&mut channel, &report);
    // Leave only once the server has closed its side: closing a Unix socket with
    // unread data resets it, and the server would lose this report.
    let mut sink = [0u8; 4096];
    while matches!(channel.read(&mut sink), Ok(n) if n > 0) {}
    0
}

/// Send `report` to the server, which may be gone (it killed us on timeout): nothing
/// else to tell then.
fn tell(channel: &mut UnixStream, report: &HelperReport) {
    let mut line = serde_json::to_string(report).unwrap_or_else(|_| "{}".to_string());
    line.push('\n');
    let _ = channel.write_all(line.as_bytes());
}

fn setup_failed(step: Step, what: &str, e: nix::errno::Errno) -> HelperReport {
    StepError::new(step, what, e.desc()).into()
}

/// The descriptors come in `channel`'s order: the run's stdin, then its network namespace.
/// A run's announced end is sent from here; the returned report is how it really ended.
fn run(spec: &SandboxSpec, fds: Vec<OwnedFd>, channel: &mut UnixStream) -> HelperReport {
    let mut fds = fds.into_iter();
    let (stdin, netns) = (fds.next(), fds.next());
    if !spec.level.private_root() && (spec.job_dir.is_some() || spec.out_dir.is_some()) {
        return StepError::new(Step::BindMount, "/job and /tmp/out", "need a private root").into();
    }
    let netns = match (spec.network, netns) {
        (NetworkSetup::Own, None) => {
            return StepError::new(Step::Network, "the run's namespace", "not received").into();
        }
        (NetworkSetup::Own, fd) => fd,
        _ => None,
    };
    if let Err(e) = join_cgroups(spec) {
        return e.into();
    }
    if spec.level == IsolationLevel::Rootless
        && let Err(e) = userns::enter(spec.uid, spec.gid)
    {
        return e.into();
    }
    if spec.level.private_root() {
        // A new pid namespace applies to children only: the forked process is its pid 1,
        // and when it exits the kernel kills everything left in the namespace.
        if let Err(e) = unshare(CloneFlags::CLONE_NEWPID) {
            return setup_failed(Step::Unshare, "CLONE_NEWPID", e);
        }
    }
    let (err_read, err_write) = match pipe2(OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return setup_failed(Step::Fork, "pipe2", e),
    };
    // The snippet reaches the interpreter through this socket (fd 3 there). The
    // interpreter may start long before the code arrives: a warm worker waits on it.
    // Once it has read the whole snippet, and before running any of it, the bootstrap
    // writes one byte back: without that byte no user code ran.
    let (mut code_ours, code_theirs) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => return StepError::new(Step::ReadCode, "socketpair", e).into(),
    };
    // SAFETY: the helper is single-threaded: `main` runs it before anything could
    // start a thread.
    #[allow(unsafe_code)]
    let forked = unsafe { sys::fork() };
    match forked {
        Err(e) => setup_failed(Step::Fork, "fork", e),
        Ok(ForkResult::Child) => {
            drop(err_read);
            drop(code_ours);
            let fds = ChildFds {
                netns,
                code: OwnedFd::from(code_theirs),
                stdin,
            };
            child(spec, fds, err_write)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(err_write);
            drop(code_theirs);
            // Only the interpreter may hold the stdin pipe: its writer then sees the
            // run's end as a broken pipe, not a reader that never reads.
            drop(stdin);
            let mut message = String::new();
            // Returns at EOF: the exec succeeded (O_CLOEXEC closed the pipe) or the
            // child wrote why it failed and exited.
            let _ = File::from(err_read).read_to_string(&mut message);
            let forwarded = message.is_empty() && forward_code(channel, &mut code_ours, child);
            // The run's output goes to the server, which sees its end when the
            // interpreter closes it, whether or not this process still runs.
            let _ = File::open("/dev/null").map(|null| {
                let _ = nix::unistd::dup2_stdout(&null);
                let _ = nix::unistd::dup2_stderr(&null);
            });
            let said = if forwarded {
                read_said(&mut code_ours)
            } else {
                Vec::new()
            };
            if let Some(code) = snippet::announced_end(&said) {
                // Its output is closed: the server may answer before the teardown.
                tell(channel, &HelperReport::Announced { code });
            }
            let status = loop {
                match waitpid(child, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => break other,
                }
            };
            let delivered = said.first() == Some(&snippet::ACK);
            if !message.is_empty() {
                return HelperReport::SetupFailed { message };
            }
            if !delivered {
                return HelperReport::EndedBeforeCode;
            }
            match status {
                Ok(WaitStatus::Exited(_, code)) => HelperReport::Exited { code },
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    HelperReport::Signaled { signal: sig as i32 }
                }
                Ok(other) => HelperReport::SetupFailed {
                    message: format!("unexpected wait status {other:?}"),
                },
                Err(e) => HelperReport::SetupFailed {
                    message: format!("waitpid failed: {}", e.desc()),
                },
            }
        }
    }
}

fn join_cgroups(spec: &SandboxSpec) -> Result<(), StepError> {
    let pid = std::process::id().to_string();
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, &pid).map_err(io_step(Step::JoinCgroup, procs))?;
    }
    Ok(())
}

fn cstrings(items: &[String], what: &str) -> Result<Vec<CString>, StepError> {
    items
        .iter()
        .map(|s| CString::new(s.as_bytes()).map_err(|e| StepError::new(Step::Exec, what, e)))
        .collect()
}

fn limit(resource: Resource, value: u64, name: &str) -> Result<(), StepError> {
    setrlimit(resource, value, value).map_err(|e| StepError::new(Step::Rlimits, name, e.desc()))
}

/// What the forked child is handed: the run's network namespace, the snippet's socket
/// (its fd 3 to be) and its stdin (/dev/null when none came).
struct ChildFds {
    netns: Option<OwnedFd>,
    code: OwnedFd,
    stdin: Option<OwnedFd>,
}

/// The forked child: jail itself step by step and exec the interpreter. A step that
/// fails is written to the error pipe, which is moved first to where no later step
/// closes it.
fn child(spec: &SandboxSpec, fds: ChildFds, err: OwnedFd) -> ! {
    let err = match sys::move_fd(err, ERROR_FD, true) {
        Ok(moved) => moved,
        Err((original, errno)) => {
            let e = StepError::new(Step::Descriptors, "error pipe", errno.desc());
            report_setup_error(original, &e)
        }
    };
    match child_setup(spec, fds) {
        Ok(never) => match never {},
        Err(e) => report_setup_error(err, &e),
    }
}

fn report_setup_error(pipe: OwnedFd, e: &StepError) -> ! {
    let _ = File::from(pipe).write_all(e.to_string().as_bytes());
    sys::exit_now(126)
}

enum Never {}

fn child_setup(spec: &SandboxSpec, fds: ChildFds) -> Result<Never, StepError> {
    let ChildFds { netns, code, stdin } = fds;
    prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(step(Step::Descriptors, Path::new("pdeathsig")))?;
    // The root is built for another uid: its directories and files must not inherit a
    // caller's restrictive umask (077 would lock the run out of its own interpreter).
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
    // A session of its own: no controlling terminal, no process group shared with the
    // server, so group-wide signals and terminal tricks reach nobody else.
    nix::unistd::setsid().map_err(step(Step::Descriptors, Path::new("setsid")))?;
    let argv = cstrings(&spec.argv, "argv")?;
    let env = cstrings(&spec.env, "environment")?;
    match spec.level {
        IsolationLevel::Namespaces | IsolationLevel::Rootless => {
            let mut flags =
                CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
            if spec.network == NetworkSetup::Offline {
                flags |= CloneFlags::CLONE_NEWNET;
            }
            unshare(flags)
                .map_err(|e| StepError::new(Step::Unshare, format!("{flags:?}"), e.desc()))?;
            if let Some(ns) = &netns {
                setns(ns, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| StepError::new(Step::Network, "setns", e.desc()))?;
            }
            drop(netns);
            sethostname("sandbox").map_err(step(Step::Hostname, Path::new("sandbox")))?;
            let job: Vec<_> = (spec.job_dir.iter())
                .map(|d| (d.clone(), PathBuf::from(JOB_MOUNT)))
                .collect();
            let out: Vec<_> = (spec.out_dir.iter())
                .map(|d| (d.clone(), PathBuf::from(OUT_MOUNT)))
                .collect();
            rootfs::enter_private_root(
                &spec.root_dir,
                &spec.root,
                spec.limits.tmp_bytes,
                &spec.root_files,
                &rootfs::Extras {
                    dirs: &[],
                    writable: &out,
                    readonly: &job,
                },
            )?;
        }
        IsolationLevel::Chroot => {
            chroot(&spec.root_dir).map_err(step(Step::Chroot, &spec.root_dir))?;
            chdir("/").map_err(step(Step::Chroot, Path::new("/")))?;
            // No private tmpfs without mounts: a directory only this run's uid can enter.
            let dir = &spec.workdir;
            let _ = std::fs::remove_dir_all(dir);
            std::fs::create_dir(dir).map_err(io_step(Step::MountTmp, dir))?;
            nix::unistd::chown(
                dir,
                Some(Uid::from_raw(spec.uid)),
                Some(Gid::from_raw(spec.gid)),
            )
            .map_err(step(Step::MountTmp, dir))?;
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(io_step(Step::MountTmp, dir))?;
            // What the run creates is its own alone, even if a path leaked out.
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        }
    }

    // fd 0: the run's stdin (or /dev/null), fd 3: the snippet, fd 1/2 stay the server's
    // pipes, 1022 the error pipe, 1023 the interpreter; nothing else survives.
    let fd_step = |what: &'static str| {
        move |(_, e): (OwnedFd, nix::errno::Errno)| {
            StepError::new(Step::Descriptors, what, e.desc())
        }
    };
    let program = open(
        &spec.program,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(step(Step::OpenInterpreter, &spec.program))?;
    let program = sys::move_fd(program, sys::EXEC_FD, true).map_err(fd_step("exec fd"))?;
    let code = sys::move_fd(code, CODE_PARKING_FD, false).map_err(fd_step("snippet socket"))?;
    // Before the range is closed: the pipe was received at some low number.
    let stdin = match stdin {
        Some(pipe) => pipe,
        None => open(
            "/dev/null",
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(step(Step::Descriptors, Path::new("/dev/null")))?,
    };
    sys::redirect_stdin(stdin).map_err(step(Step::Descriptors, Path::new("stdin")))?;
    // SAFETY: what this child keeps lives at CODE_PARKING_FD, ERROR_FD and EXEC_FD, above
    // the ranges closed; every other descriptor is owned by frames this child never
    // returns to (it execs or exits), so nothing closed here is used or dropped again.
    #[allow(unsafe_code)]
    let closed = unsafe {
        sys::close_range(CODE_FD as u32, CODE_PARKING_FD as u32 - 1)
            .and_then(|()| sys::close_range(sys::EXEC_FD as u32 + 1, u32::MAX))
    };
    closed.map_err(step(Step::Descriptors, Path::new("close_range")))?;
    let _code = sys::move_fd(code, CODE_FD, false).map_err(fd_step("fd 3"))?;
    sys::reset_sigpipe().map_err(step(Step::Descriptors, Path::new("SIGPIPE")))?;

    let l = &spec.limits;
    limit(
        Resource::RLIMIT_NOFILE,
        l.open_files.min(sys::EXEC_FD as u64 - 1),
        "RLIMIT_NOFILE",
    )?;
    limit(Resource::RLIMIT_NPROC, l.max_processes, "RLIMIT_NPROC")?;
    limit(Resource::RLIMIT_FSIZE, l.tmp_bytes, "RLIMIT_FSIZE")?;
    limit(Resource::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    limit(Resource::RLIMIT_CPU, l.cpu_seconds, "RLIMIT_CPU")?;
    if let Some(bytes) = l.address_space_bytes {
        limit(Resource::RLIMIT_AS, bytes, "RLIMIT_AS")?;
    }

    // Mapped while still root: the preferred page needs CAP_SYS_RAWIO (see sys::empty_path).
    let exec_path = sys::empty_path(spec.mmap_min_addr)
        .map_err(|e| StepError::new(Step::Seccomp, "exec path page", e.desc()))?;
    let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.gid));
    // Rootless: the user namespace has setgroups disabled and no supplementary group
    // mapped, so there is nothing to drop.
    if spec.level != IsolationLevel::Rootless {
        setgroups(&[]).map_err(|e| StepError::new(Step::DropPrivileges, "setgroups", e.desc()))?;
    }
    setresgid(gid, gid, gid)
        .map_err(|e| StepError::new(Step::DropPrivileges, format!("gid {gid}"), e.desc()))?;
    setresuid(uid, uid, uid)
        .map_err(|e| StepError::new(Step::DropPrivileges, format!("uid {uid}"), e.desc()))?;
    // Changing credentials clears the parent-death signal: set it again.
    prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(step(Step::DropPrivileges, Path::new("pdeathsig")))?;
    chdir(spec.cwd()).map_err(step(Step::Descriptors, spec.cwd()))?;

    prctl::set_no_new_privs().map_err(|e| StepError::new(Step::NoNewPrivs, "prctl", e.desc()))?;
    seccomp::apply(&FilterOptions {
        profile: spec.profile,
        sockets: SocketPolicy::for_run(spec.network, spec.level),
        allowed_syscalls: &spec.allowed_syscalls,
        extra_syscalls: &spec.extra_syscalls,
        exec_path: Some(exec_path),
    })
    .map_err(|e| StepError::new(Step::Seccomp, "filter", e))?;

    let errno = sys::execveat_exec_fd(&program, exec_path, &argv, &env);
    Err(StepError::new(
        Step::Exec,
        spec.program.display(),
        errno.desc(),
    ))
}
