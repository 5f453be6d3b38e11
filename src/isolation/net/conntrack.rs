//! Forgetting a run's connections when it ends: every connection a run opens carries its
//! conntrack mark (set by the isolated ruleset), and the kernel deletes all entries with
//! that mark in one request. Without this, entries of a dead run (established TCP ones
//! live for days) would keep its NAT mappings, and packets sent to them would reach the
//! next run that gets the same address.

use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::conntrack::{ConntrackAttribute, ConntrackMessage};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// CTA_MARK_MASK: with CTA_MARK and no tuple, a delete request flushes the entries
/// whose mark matches under this mask.
const CTA_MARK_MASK: u16 = 21;

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("conntrack: netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("conntrack: the kernel refused to flush mark {mark:#x}: {reason}")]
    Refused { mark: u32, reason: String },
}

/// Delete every conntrack entry whose mark is exactly `mark`.
pub fn flush_mark(mark: u32) -> Result<(), ConntrackError> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(ConntrackError::Socket)?;
    socket.bind_auto().map_err(ConntrackError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(ConntrackError::Socket)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            // Version 0 with any family: entries of every family are considered.
            NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
            ConntrackMessage::Delete(vec![
                ConntrackAttribute::CtaMark(mark),
                ConntrackAttribute::Other(DefaultNla::new(
                    CTA_MARK_MASK,
                    u32::MAX.to_be_bytes().to_vec(),
                )),
            ]),
        )),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).map_err(ConntrackError::Socket)?;
    let mut answer = vec![0; 4096];
    let n = socket
        .recv(&mut &mut answer[..], 0)
        .map_err(ConntrackError::Socket)?;
    let reply = NetlinkMessage::<NetfilterMessage>::deserialize(&answer[..n]).map_err(|e| {
        ConntrackError::Refused {
            mark,
            reason: format!("unreadable answer: {e}"),
        }
    })?;
    match reply.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            // Nothing carried the mark.
            Some(code) if code.get() == -libc::ENOENT => Ok(()),
            Some(code) => Err(ConntrackError::Refused {
                mark,
                reason: std::io::Error::from_raw_os_error(-code.get()).to_string(),
            }),
        },
        other => Err(ConntrackError::Refused {
            mark,
            reason: format!("unexpected answer {other:?}"),
        }),
    }
}
