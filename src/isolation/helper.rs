//! The `__exec` helper: a short-lived, single-threaded copy of the `sandbox` binary that
//! the server starts for each run. It reads the jail, carries out its owner's steps,
//! forks the process that becomes the interpreter (which carries out the run's steps,
//! the last of them the exec), and reports how it ended.
//!
//! Why a separate process: after fork in a multi-threaded program (the tokio server)
//! only async-signal-safe calls are allowed, and the setup here allocates and formats.
//! Running it in a fresh single-threaded process makes that sound.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::fcntl::OFlag;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, pipe2};
use serde::{Deserialize, Serialize};

use super::channel;
use super::forward::{forward_code, read_said};
use super::jail::{Descriptors, Fd, Jail, RealSys, execute};
use super::snippet;
use super::step::{Step, StepError};
use super::sys;

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

/// Entry point of `sandbox __exec`: the jail comes first on stdin (see `channel`).
/// Returns the helper's exit code.
pub fn main() -> i32 {
    sys::reset_signals();
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
            serde_json::from_slice::<Jail>(&json)
                .map(|jail| (jail, fds))
                .map_err(|e| format!("invalid helper jail: {e}"))
        }) {
        Ok((jail, fds)) => run(&jail, fds, &mut channel),
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
fn run(jail: &Jail, fds: Vec<OwnedFd>, channel: &mut UnixStream) -> HelperReport {
    let mut fds = fds.into_iter();
    let (stdin, netns) = (fds.next(), fds.next());
    if let Err(e) = execute(&jail.owner, &mut RealSys, &mut Descriptors::default()) {
        return e.into();
    }
    let (err_read, err_write) = match pipe2(OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return setup_failed(Step::Fork, "pipe2", e),
    };
    // The run's init says here how the run's own process ended.
    let (status_read, status_write) = match pipe2(OFlag::O_CLOEXEC) {
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
            drop(status_read);
            drop(code_ours);
            let mut fds = Descriptors::default();
            let raw = |fd: OwnedFd| fd.into_raw_fd();
            fds.0.insert(Fd::Status, raw(status_write));
            fds.0.insert(Fd::Code, raw(OwnedFd::from(code_theirs)));
            fds.0.insert(Fd::Error, raw(err_write));
            fds.0.insert(Fd::Stdout, 1);
            fds.0.insert(Fd::Stderr, 2);
            // The server always sends a stdin pipe; a helper driven by hand reads nothing.
            let stdin = stdin.or_else(|| File::open("/dev/null").ok().map(OwnedFd::from));
            if let Some(stdin) = stdin {
                fds.0.insert(Fd::Stdin, raw(stdin));
            }
            if let Some(netns) = netns {
                fds.0.insert(Fd::Netns, raw(netns));
            }
            child(jail, fds)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(err_write);
            drop(status_write);
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
            // The init's word on the run's process, when it had one to give (a run
            // killed with its whole namespace has none: then the init's own end).
            let mut said_by_init = String::new();
            let _ = File::from(status_read).read_to_string(&mut said_by_init);
            match super::init::parse_status(&said_by_init) {
                Some((true, code)) => return HelperReport::Exited { code },
                Some((false, signal)) => return HelperReport::Signaled { signal },
                None => {}
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

/// The forked child: carry out the run's steps, the last of which execs the interpreter.
/// A step that fails is written to the error pipe, wherever the steps have moved it.
fn child(jail: &Jail, mut fds: Descriptors) -> ! {
    let failed = match execute(&jail.run, &mut RealSys, &mut fds) {
        // A jail that does not end in an exec is not a helper's.
        Ok(()) => StepError::new(Step::Exec, "the jail", "has no exec step"),
        Err(e) => e,
    };
    if let Some(&pipe) = fds.0.get(&Fd::Error) {
        report_setup_error(pipe, &failed);
    }
    sys::exit_now(126)
}

fn report_setup_error(pipe: RawFd, e: &StepError) -> ! {
    let message = e.to_string();
    let mut written = 0;
    while written < message.len() {
        match sys::raw::write(pipe, &message.as_bytes()[written..]) {
            Ok(n) if n > 0 => written += n,
            _ => break,
        }
    }
    sys::exit_now(126)
}
