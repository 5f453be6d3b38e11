//! The run's init: a fork whose parent stays behind as pid 1 of the run's pid namespace
//! (what tini or `docker run --init` is), so the snippet is an ordinary process: a
//! signal it sends itself, or abort(), ends it as on the host (pid 1 ignores every
//! signal it has no handler for). The init forwards the signals it gets to the run,
//! reaps what ends, and reports how the run ended on its status descriptor. The fork
//! server's executor (`runtime/jail.py`) does the same in Python.

use std::os::fd::RawFd;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};

use super::sys;

/// fork(2); returns in the child. The parent closes every descriptor but `status` and is
/// the init until the child ends.
pub fn fork_init(status: RawFd) -> Result<(), Errno> {
    // SAFETY: only a jail's child calls this: the helper's forked child, which is
    // single-threaded (the helper starts no thread).
    #[allow(unsafe_code)]
    let forked = unsafe { sys::fork() }?;
    match forked {
        ForkResult::Child => Ok(()),
        ForkResult::Parent { child } => {
            if status > 0 {
                let _ = sys::raw::close_range(0, status - 1);
            }
            let _ = sys::raw::close_range(status + 1, RawFd::MAX);
            init(child, status)
        }
    }
}

/// How the run's process ended, as the init writes it: `exited N` or `signaled N`.
pub fn status_line(s: WaitStatus) -> Option<String> {
    match s {
        WaitStatus::Exited(_, code) => Some(format!("exited {code}")),
        WaitStatus::Signaled(_, sig, _) => Some(format!("signaled {}", sig as i32)),
        _ => None,
    }
}

fn init(child: Pid, status: RawFd) -> ! {
    // Every signal waits in the queue and is taken by `wait` below: none can run a
    // handler, none is lost.
    let all = SigSet::all();
    let _ = all.thread_block();
    loop {
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(s) if s.pid() == Some(child) => {
                    if let Some(line) = status_line(s) {
                        let _ = sys::raw::write(status, line.as_bytes());
                    }
                    sys::exit_now(0)
                }
                Ok(_) | Err(Errno::EINTR) => continue,
                // No child left, yet the run's was never seen: nothing to report.
                Err(_) => sys::exit_now(0),
            }
        }
        if let Ok(signal) = all.wait()
            && signal != Signal::SIGCHLD
        {
            let _ = kill(child, signal);
        }
    }
}

/// Read an init's report (see `status_line`).
pub fn parse_status(line: &str) -> Option<(bool, i32)> {
    let (kind, n) = line.trim().split_once(' ')?;
    let n = n.parse().ok()?;
    match kind {
        "exited" => Some((true, n)),
        "signaled" => Some((false, n)),
        _ => None,
    }
}
