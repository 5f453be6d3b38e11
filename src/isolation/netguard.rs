//! The network guard: an nftables table that rejects what networked runs may not reach
//! (by default the host's loopback services, link-local and cloud metadata addresses).
//! It matches the sandbox uid range only, so the server and the rest of the host are
//! untouched, and it lets DNS through to the resolvers of /etc/resolv.conf, which often
//! live on loopback (systemd-resolved, Docker's embedded DNS). One table per server
//! process, deleted when the server stops; a table left by a server that died is deleted
//! at the next start. Table names carry the pid namespace too, so a server never takes
//! the table of a live server whose pids it cannot see (a container sharing the host's
//! network).

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use ipnet::IpNet;

const TABLE_PREFIX: &str = "sandbox_guard_";

#[derive(Debug, thiserror::Error)]
pub enum NetGuardError {
    #[error(
        "the `nft` command cannot run ({0}): install nftables (apt-get install nftables), or set NETWORK_DENY=\"\" to run without the guard"
    )]
    NoNft(String),
    #[error(
        "nft refused the guard table: {0}. It needs root with CAP_NET_ADMIN (in Docker: --cap-add NET_ADMIN); or set NETWORK_DENY=\"\" to run without the guard"
    )]
    Refused(String),
}

/// The installed table; dropping it deletes the table.
#[derive(Debug)]
pub struct NetGuard {
    table: String,
}

impl NetGuard {
    /// Reject traffic from sockets owned by `uids` towards `deny`.
    pub fn install(deny: &[IpNet], uids: std::ops::Range<u32>) -> Result<Self, NetGuardError> {
        let table = format!("{}{}", own_prefix(), std::process::id());
        let uids = (uids.start, uids.end.saturating_sub(1));
        let script = ruleset(&table, uids, deny, &resolvers());
        nft(&["-f", "-"], Some(&script))?;
        Ok(Self { table })
    }

    pub fn table(&self) -> &str {
        &self.table
    }
}

impl Drop for NetGuard {
    fn drop(&mut self) {
        if let Err(e) = nft(&["delete", "table", "inet", &self.table], None) {
            tracing::warn!(table = %self.table, error = %e, "cannot delete the network guard table; delete it with `nft delete table inet {}`", self.table);
        }
    }
}

/// The nft script for one table. DNS to the host's resolvers is let through first:
/// denying loopback would otherwise break name resolution where the resolver listens
/// there. Priority -150 runs before NAT rewrites a destination (Docker's DNS).
fn ruleset(table: &str, (first, last): (u32, u32), deny: &[IpNet], resolvers: &[IpAddr]) -> String {
    let owner = format!("meta skuid {first}-{last}");
    let mut rules = Vec::new();
    let resolvers: Vec<IpNet> = resolvers.iter().map(|a| IpNet::from(*a)).collect();
    for (family, addrs) in by_family(&resolvers) {
        for proto in ["udp", "tcp"] {
            rules.push(format!(
                "{owner} {family} daddr {{ {addrs} }} {proto} dport 53 accept"
            ));
        }
    }
    // Overlapping blocks would make nft refuse the set: merge them first.
    for (family, nets) in by_family(&IpNet::aggregate(&deny.to_vec())) {
        rules.push(format!("{owner} {family} daddr {{ {nets} }} reject"));
    }
    let mut out = format!(
        "table inet {table} {{\n  chain output {{\n    type filter hook output priority -150; policy accept;\n"
    );
    for r in rules {
        out.push_str(&format!("    {r}\n"));
    }
    out.push_str("  }\n}\n");
    out
}

/// `nets` split by nft family (`ip`, `ip6`) as set elements; families without any left out.
fn by_family(nets: &[IpNet]) -> Vec<(&'static str, String)> {
    let join = |v4: bool| {
        nets.iter()
            .filter(|n| matches!(n, IpNet::V4(_)) == v4)
            // A single address prints without its /32 or /128.
            .map(|n| {
                if n.prefix_len() == n.max_prefix_len() {
                    n.addr().to_string()
                } else {
                    n.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    [("ip", join(true)), ("ip6", join(false))]
        .into_iter()
        .filter(|(_, set)| !set.is_empty())
        .collect()
}

/// The `nameserver` addresses of /etc/resolv.conf.
fn resolvers() -> Vec<IpAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    parse_resolvers(&text)
}

fn parse_resolvers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        // A scoped IPv6 address (fe80::1%eth0) keeps only its address.
        .filter_map(|a| a.split('%').next()?.parse().ok())
        .collect()
}

/// Delete guard tables whose server process is gone (killed before it could delete its
/// own): they would keep restricting every sandbox uid of the host.
pub fn remove_stale_tables() {
    let Ok(list) = nft(&["list", "tables", "inet"], None) else {
        return;
    };
    let prefix = own_prefix();
    for name in list.split_whitespace().filter(|w| w.starts_with(&prefix)) {
        let alive = name[prefix.len()..]
            .parse::<u32>()
            .is_ok_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = nft(&["delete", "table", "inet", name], None);
        }
    }
}

/// `sandbox_guard_<pid namespace inode>_`: the tables of servers whose pids we can see.
pub fn own_prefix() -> String {
    let ns = std::fs::metadata("/proc/self/ns/pid")
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or(0);
    format!("{TABLE_PREFIX}{ns}_")
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, NetGuardError> {
    let spawn = |program: &str| {
        Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    // Services often run with a PATH that lacks /usr/sbin.
    let mut child = spawn("nft")
        .or_else(|_| spawn("/usr/sbin/nft"))
        .map_err(|e| NetGuardError::NoNft(e.to_string()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| NetGuardError::NoNft(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NetGuardError::NoNft(e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetGuardError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_lets_dns_through_then_rejects_the_denied_blocks() {
        let deny: Vec<IpNet> = ["127.0.0.0/8", "127.1.0.0/16", "::1/128", "169.254.0.0/16"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let resolvers = parse_resolvers(
            "# comment\nnameserver 127.0.0.11\nnameserver fe80::1%eth0\noptions ndots:0\n",
        );
        let text = ruleset("sandbox_guard_7", (10000, 10999), &deny, &resolvers);
        let dns = text.find("udp dport 53 accept").unwrap();
        let reject = text.find("reject").unwrap();
        assert!(dns < reject, "{text}");
        assert!(
            text.contains("meta skuid 10000-10999 ip daddr { 127.0.0.11 } tcp dport 53 accept"),
            "{text}"
        );
        assert!(
            text.contains("ip6 daddr { fe80::1 } udp dport 53 accept"),
            "{text}"
        );
        // 127.1.0.0/16 lies inside 127.0.0.0/8: merged, or nft would refuse the set.
        assert!(
            text.contains("ip daddr { 127.0.0.0/8, 169.254.0.0/16 } reject"),
            "{text}"
        );
        assert!(text.contains("ip6 daddr { ::1 } reject"), "{text}");
        assert!(text.starts_with("table inet sandbox_guard_7 {"), "{text}");
    }
}
