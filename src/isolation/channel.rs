//! The start of the worker channel (the helper's stdin socket): the spec, framed as a
//! little-endian `u32` length and that many bytes of JSON, with descriptors passed
//! alongside (SCM_RIGHTS): first the read end of the run's stdin pipe, then the run's
//! network namespace when it has one (a helper given none reads /dev/null). The snippet
//! follows later on the same socket (see `snippet`), and the helper's report goes back
//! on it.

use std::io::{IoSlice, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

use super::sys;

/// A spec larger than this is refused: nothing legitimate comes close.
const MAX_SPEC_BYTES: usize = 16 << 20;

/// Why a message could not be received: the sender is gone or broke the framing, so
/// the process that waited for it cannot go on (its report says which).
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("reading the message's length: {}", .0.desc())]
    Length(nix::errno::Errno),
    #[error("the other side closed the channel before sending its message")]
    Closed,
    #[error("a message of {0} bytes is refused (at most {MAX_SPEC_BYTES})")]
    TooLarge(usize),
    #[error("reading the message: {0}")]
    Body(#[source] std::io::Error),
}

/// Send one message (a spec, a fork server's request) on a blocking socket, framed as
/// above, with `fds` alongside.
pub fn send_message(
    socket: &UnixStream,
    message: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    let len = u32::try_from(message.len())
        .map_err(|_| std::io::Error::other("the message is too large"))?
        .to_le_bytes();
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    // The descriptors ride on the length; the rest is an ordinary stream.
    let sent = sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(&len)],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )
    .map_err(std::io::Error::from)?;
    if sent != len.len() {
        return Err(std::io::Error::other("the message's length was cut short"));
    }
    std::io::Write::write_all(&mut &*socket, message)
}

/// Receive one framed message, dropping any descriptor (a fork server's answer).
pub fn recv_message(socket: &UnixStream) -> Result<Vec<u8>, ChannelError> {
    recv_spec(socket).map(|(m, _)| m)
}

/// Receive what `send_message` sent: the message's bytes and the descriptors, in the
/// order they were sent.
pub fn recv_spec(socket: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), ChannelError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < len.len() {
        let (n, passed) =
            sys::recv_with_fds(socket.as_fd(), &mut len[got..]).map_err(ChannelError::Length)?;
        if n == 0 {
            return Err(ChannelError::Closed);
        }
        fds.extend(passed);
        got += n;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_SPEC_BYTES {
        return Err(ChannelError::TooLarge(len));
    }
    let mut spec = vec![0u8; len];
    (&*socket)
        .read_exact(&mut spec)
        .map_err(ChannelError::Body)?;
    Ok((spec, fds))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn the_spec_and_its_descriptors_arrive_together_in_order_and_the_stream_goes_on() {
        let (a, b) = UnixStream::pair().expect("pair");
        let first = std::fs::File::open("/proc/self/exe").expect("a file to pass");
        let second = tempfile::tempfile().expect("another file");
        send_message(&a, b"{\"x\":1}", &[first.as_fd(), second.as_fd()]).expect("send");
        (&a).write_all(b"snippet").expect("more");
        let (spec, fds) = recv_spec(&b).expect("receive");
        assert_eq!(spec, b"{\"x\":1}");
        let same = |f: &std::fs::File| std::os::unix::fs::MetadataExt::ino(&f.metadata().unwrap());
        let got: Vec<u64> = fds
            .into_iter()
            .map(|fd| same(&std::fs::File::from(fd)))
            .collect();
        assert_eq!(got, vec![same(&first), same(&second)]);
        let mut rest = [0u8; 7];
        (&b).read_exact(&mut rest).expect("the rest");
        assert_eq!(&rest, b"snippet");
        send_message(&a, b"{}", &[]).expect("send without a descriptor");
        assert!(recv_spec(&b).expect("receive").1.is_empty());
    }

    #[test]
    fn a_closed_channel_a_cut_message_and_an_oversized_one_are_told_apart() {
        let (a, b) = UnixStream::pair().expect("pair");
        drop(a);
        assert!(matches!(recv_spec(&b), Err(ChannelError::Closed)));
        let (a, b) = UnixStream::pair().expect("pair");
        (&a).write_all(&(MAX_SPEC_BYTES as u32 + 1).to_le_bytes())
            .expect("a length");
        assert!(
            matches!(recv_message(&b), Err(ChannelError::TooLarge(n)) if n == MAX_SPEC_BYTES + 1)
        );
        let (a, b) = UnixStream::pair().expect("pair");
        (&a).write_all(&10u32.to_le_bytes()).expect("a length");
        (&a).write_all(b"short").expect("part of it");
        drop(a);
        let e = recv_message(&b).expect_err("cut short");
        assert!(matches!(e, ChannelError::Body(_)), "{e}");
    }
}
