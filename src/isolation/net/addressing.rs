//! Where a networked run sits on the host: derived from its uid, so nothing has to be
//! allocated or remembered. A uid is leased host-wide, hence so are its /30 and its
//! conntrack mark. Its interface name also carries its server's tag, so each server's
//! rules apply to its own runs only (several servers may share a host).

use std::net::Ipv4Addr;
use std::ops::Range;

use ipnet::Ipv4Net;

/// Interface names of runs' host ends: `sbx<server tag><uid>`.
pub const IFNAME_PREFIX: &str = "sbx";
/// A server's tag: three hex digits, so a name stays within the kernel's 15 bytes.
pub const TAG_LEN: usize = 3;
/// Conntrack marks of runs' connections: this prefix, then the uid's index.
pub const CT_MARK_PREFIX: u32 = 0x5b00_0000;
const CT_MARK_INDEX: u32 = 0x0000_ffff;

/// One run's place in the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAddress {
    pub uid: u32,
    /// The host end of the run's veth pair.
    pub host_if: String,
    /// The host end's address: the run's default gateway and DNS server.
    pub gateway: Ipv4Addr,
    /// The run's own address (on its `eth0`).
    pub address: Ipv4Addr,
    /// The mark every connection of the run carries, to find them when it ends.
    pub ct_mark: u32,
}

/// The prefix of each run's block: a gateway and an address, with network and
/// broadcast addresses around them.
pub const RUN_PREFIX_LEN: u8 = 30;

impl RunAddress {
    /// The place of `uid` among `uids` in `subnet`, for the server tagged `tag`; `None`
    /// when `uid` is not in `uids` or the subnet is too small for it.
    pub fn of(uid: u32, uids: &Range<u32>, subnet: Ipv4Net, tag: &str) -> Option<Self> {
        if !uids.contains(&uid) {
            return None;
        }
        let index = uid - uids.start;
        let block = u32::from(subnet.network()).checked_add(index.checked_mul(4)?)?;
        if !subnet.contains(&Ipv4Addr::from(block + 3)) || index > CT_MARK_INDEX {
            return None;
        }
        Some(Self {
            uid,
            host_if: interface_name(tag, uid),
            gateway: Ipv4Addr::from(block + 1),
            address: Ipv4Addr::from(block + 2),
            ct_mark: CT_MARK_PREFIX | index,
        })
    }
}

pub fn interface_name(tag: &str, uid: u32) -> String {
    format!("{IFNAME_PREFIX}{tag}{uid}")
}

/// The uid a run interface (of any server) belongs to, from its name.
pub fn uid_of_interface(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(IFNAME_PREFIX)?;
    let (tag, uid) = rest.split_at_checked(TAG_LEN)?;
    if !tag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    uid.parse().ok()
}

/// The tag of the server with process id `pid`, unless `taken` already has it.
pub fn server_tag(pid: u32, taken: impl Fn(&str) -> bool) -> String {
    (0..4096u32)
        .map(|k| format!("{:03x}", (pid + k) % 4096))
        .find(|t| !taken(t))
        .unwrap_or_else(|| format!("{:03x}", pid % 4096))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UIDS: Range<u32> = 10000..11000;

    fn subnet() -> Ipv4Net {
        "10.213.0.0/20".parse().unwrap()
    }

    #[test]
    fn each_uid_gets_its_own_block_of_four() {
        let first = RunAddress::of(10000, &UIDS, subnet(), "a1f").unwrap();
        assert_eq!(first.gateway, Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(first.address, Ipv4Addr::new(10, 213, 0, 2));
        assert_eq!(first.host_if, "sbxa1f10000");
        assert_eq!(first.ct_mark, 0x5b00_0000);
        let last = RunAddress::of(10999, &UIDS, subnet(), "000").unwrap();
        assert_eq!(last.address, Ipv4Addr::new(10, 213, 15, 158));
        assert_eq!(last.ct_mark, 0x5b00_0000 + 999);
        assert_eq!(uid_of_interface(&last.host_if), Some(10999));
    }

    #[test]
    fn uids_outside_the_pool_or_the_subnet_have_no_place() {
        assert!(RunAddress::of(9999, &UIDS, subnet(), "000").is_none());
        assert!(RunAddress::of(11000, &UIDS, subnet(), "000").is_none());
        let small: Ipv4Net = "10.213.0.0/24".parse().unwrap();
        assert!(RunAddress::of(10063, &UIDS, small, "000").is_some());
        assert!(RunAddress::of(10064, &UIDS, small, "000").is_none());
        assert_eq!(uid_of_interface("eth0"), None);
        assert_eq!(uid_of_interface("sbxzzz10000"), None);
        assert_eq!(uid_of_interface("sbx0f010000"), Some(10000));
    }

    #[test]
    fn a_servers_tag_avoids_the_tags_in_use() {
        assert_eq!(server_tag(4097, |_| false), "001");
        assert_eq!(server_tag(4097, |t| t == "001"), "002");
        assert_eq!(server_tag(4095, |t| t == "fff"), "000");
    }
}
