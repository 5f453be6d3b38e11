//! /etc/resolv.conf: the host's resolvers, and the file a networked run gets instead.

use std::net::{IpAddr, Ipv4Addr};

/// The `nameserver` addresses of a resolv.conf text.
pub fn nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        // A scoped IPv6 address (fe80::1%eth0) keeps only its address.
        .filter_map(|a| a.split('%').next()?.parse().ok())
        .collect()
}

/// The host's resolvers, from /etc/resolv.conf.
pub fn host_nameservers() -> Vec<IpAddr> {
    nameservers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
}

/// A run's resolv.conf: the host's `search` and `options` lines, and its gateway as the
/// only resolver (the server relays the queries).
pub fn for_run(host_text: &str, gateway: Ipv4Addr) -> String {
    let mut out = String::new();
    for line in host_text.lines() {
        let l = line.trim_start();
        if l.starts_with("search") || l.starts_with("domain") || l.starts_with("options") {
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    out.push_str(&format!("nameserver {gateway}\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "# Generated\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nsearch corp.example\noptions edns0 trust-ad\n";

    #[test]
    fn nameservers_are_read_with_their_scope_dropped() {
        assert_eq!(
            nameservers(HOST),
            vec![
                "127.0.0.53".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_run_keeps_search_and_options_and_resolves_through_its_gateway() {
        assert_eq!(
            for_run(HOST, Ipv4Addr::new(10, 213, 0, 1)),
            "search corp.example\noptions edns0 trust-ad\nnameserver 10.213.0.1\n"
        );
    }
}
