//! The helper's side of the snippet's socket (fd 3 of the interpreter): the snippet
//! copied in, then what the interpreter says back (see `isolation::snippet`).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};

use super::snippet;
use super::sys;

/// Whether `child` has exited, without reaping it.
fn exited(child: nix::unistd::Pid) -> bool {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    !matches!(waitid(Id::Pid(child), flags), Ok(WaitStatus::StillAlive))
}

/// Copy the snippet from the server to the interpreter's fd 3 until the server closes
/// its side, or stop early when the interpreter exits (a warm worker killed while it
/// waited). The socket is written without blocking, so a full buffer whose reader died
/// cannot hang the helper. Returns whether the whole snippet was sent.
pub fn forward_code(
    channel: &mut UnixStream,
    code: &mut UnixStream,
    child: nix::unistd::Pid,
) -> bool {
    let pidfd = sys::pidfd_open(child).ok();
    if code.set_nonblocking(true).is_err() {
        return false;
    }
    let mut buf = vec![0u8; 64 * 1024];
    // `buf[written..filled]` came from the server and is not sent on yet.
    let (mut written, mut filled) = (0, 0);
    loop {
        let pending = written < filled;
        let (child_done, ready) = {
            let mut fds = vec![if pending {
                PollFd::new(code.as_fd(), PollFlags::POLLOUT)
            } else {
                PollFd::new(channel.as_fd(), PollFlags::POLLIN)
            }];
            if let Some(p) = &pidfd {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            // Without pidfd (old kernels) wake up now and then to check on the child.
            let timeout = if pidfd.is_some() {
                PollTimeout::NONE
            } else {
                PollTimeout::from(200u16)
            };
            match poll(&mut fds, timeout) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return false,
                Ok(_) => {}
            }
            let child_done = fds
                .get(1)
                .and_then(|f| f.revents())
                .is_some_and(|r| !r.is_empty());
            (child_done, fds[0].revents().is_some_and(|r| !r.is_empty()))
        };
        if child_done || (pidfd.is_none() && !ready && exited(child)) {
            return false;
        }
        if !ready {
            continue;
        }
        if pending {
            match code.write(&buf[written..filled]) {
                Ok(n) => written += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return false,
            }
            continue;
        }
        match channel.read(&mut buf) {
            Ok(0) => return code.shutdown(std::net::Shutdown::Write).is_ok(),
            Ok(n) => (written, filled) = (0, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// What the interpreter writes on fd 3 once it has the snippet: the acknowledgement, and
/// then, from a bootstrap that announces its end, the run's exit status; read until the
/// interpreter closes fd 3 (or exits), at most `snippet::CHANNEL_CAP` bytes.
pub fn read_said(code: &mut UnixStream) -> Vec<u8> {
    let mut said = Vec::new();
    if code.set_nonblocking(false).is_ok() {
        let _ = code.take(snippet::CHANNEL_CAP).read_to_end(&mut said);
    }
    said
}
