//! The nftables rules the server owns, as text: pure functions of what is configured,
//! so each rule's presence and order is checked by unit tests, and the kernel checks the
//! syntax when the table is installed.
//!
//! Two rulesets:
//! - `isolated`: runs in network namespaces of their own, joined to the host by veth
//!   pairs named `sbx<uid>`. Their traffic is forwarded and masqueraded; anything aimed
//!   at the host itself, at other runs, or at denied blocks is refused.
//! - `guard`: runs sharing the host's network namespace (the chroot level, or
//!   `network_isolation: shared`): their sockets are recognised by uid.

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;

use ipnet::{IpNet, Ipv4Net};

use super::addressing::{CT_MARK_PREFIX, IFNAME_PREFIX, interface_name};
use crate::config::AllowRule;

/// The packet mark of traffic the prerouting chain found to be denied; the input and
/// forward chains refuse it. One bit, checked alone, so other users of marks are not
/// disturbed.
pub const DENY_MARK: u32 = 0x1000_0000;

/// Destinations no run ever reaches, whatever `network_deny` says: "this" network,
/// loopback, link-local (cloud metadata), multicast and reserved blocks.
const ALWAYS_DENIED_V4: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// Per run, DNS packets (UDP) and connections (TCP) to its gateway beyond these rates
/// are dropped before they reach the relay, whose socket and accept queue all runs
/// share: a flood fills neither for the others (the relay's quotas then bound what
/// each run holds).
pub const DNS_RATE: &str = "1000/second burst 500 packets";
pub const DNS_TCP_RATE: &str = "100/second burst 50 packets";

/// A proxy runs must reach (Dify's `ssrf_proxy`), wherever it listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyRoute {
    /// On the host's loopback: runs reach it on their gateway, translated to 127.0.0.1.
    Loopback(u16),
    /// Anywhere else, host-local and private addresses included.
    Direct(SocketAddr),
}

/// What the isolated ruleset depends on.
pub struct Isolated<'a> {
    pub table: &'a str,
    /// This server's tag: its runs' interfaces are `sbx<tag>...`.
    pub tag: &'a str,
    pub subnet: Ipv4Net,
    pub uids: Range<u32>,
    /// The DNS relay's port on 127.0.0.1 (UDP and TCP).
    pub relay_port: u16,
    pub proxies: &'a [ProxyRoute],
    pub deny: &'a [IpNet],
    pub allow: &'a [AllowRule],
    /// The server switched IPv4 forwarding on for runs: forwarding between the host's
    /// other interfaces stays off, as it was.
    pub confine_forwarding: bool,
}

/// The table for runs in network namespaces of their own.
pub fn isolated(r: &Isolated<'_>) -> String {
    // This server's runs, and every server's.
    let runs = format!("\"{IFNAME_PREFIX}{}*\"", r.tag);
    let all = format!("\"{IFNAME_PREFIX}*\"");
    let deny = format!("meta mark set meta mark | {DENY_MARK:#x} return");
    let marks: Vec<String> = r
        .uids
        .clone()
        .enumerate()
        .map(|(i, uid)| {
            format!(
                "\"{}\" : {:#x}",
                interface_name(r.tag, uid),
                CT_MARK_PREFIX | i as u32
            )
        })
        .collect();

    let mut from_run = vec![
        // Runs have IPv4 only; their source is their own address, never the host's, a
        // loopback or another run's (the reverse-path lookup finds their interface).
        "meta nfproto ipv6 drop".to_string(),
        format!("ip saddr != {} drop", r.subnet),
        "fib saddr . iif oif missing drop".to_string(),
        "ct state new ct mark set iifname map @run_marks".to_string(),
        format!(
            "fib daddr . iif type local udp dport 53 update @dns_rate {{ ip saddr limit rate over {DNS_RATE} }} drop"
        ),
        format!(
            "fib daddr . iif type local tcp dport 53 ct state new update @dns_tcp_rate {{ ip saddr limit rate over {DNS_TCP_RATE} }} drop"
        ),
        // DNS on the gateway goes to the relay (see run_dnat).
        "fib daddr . iif type local meta l4proto { tcp, udp } th dport 53 return".to_string(),
    ];
    for p in r.proxies {
        from_run.push(match p {
            ProxyRoute::Loopback(port) => {
                format!("fib daddr . iif type local tcp dport {port} return")
            }
            ProxyRoute::Direct(a) => format!(
                "{} daddr {} tcp dport {} return",
                family(a.ip()),
                a.ip(),
                a.port()
            ),
        });
    }
    from_run.push(format!(
        "fib daddr type {{ local, broadcast, multicast, anycast }} {deny}"
    ));
    let mut always: Vec<IpNet> = ALWAYS_DENIED_V4
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    always.push(IpNet::V4(r.subnet));
    always.extend(r.deny.iter().filter(|n| matches!(n, IpNet::V4(_))));
    for (fam, set) in sets(&always) {
        from_run.push(format!("{fam} daddr {{ {set} }} {deny}"));
    }
    if !r.allow.is_empty() {
        for a in r.allow {
            from_run.push(allow_rule(a, "return"));
        }
        from_run.push(deny.clone());
    }

    let mut dnat = vec![format!(
        "iifname {runs} fib daddr . iif type local meta l4proto {{ tcp, udp }} th dport 53 dnat ip to 127.0.0.1:{}",
        r.relay_port
    )];
    let mut to_host = vec![
        format!("meta mark & {DENY_MARK:#x} == {DENY_MARK:#x} jump refuse"),
        format!(
            "ip daddr 127.0.0.1 meta l4proto {{ tcp, udp }} th dport {} accept",
            r.relay_port
        ),
    ];
    for p in r.proxies {
        match p {
            ProxyRoute::Loopback(port) => {
                dnat.push(format!(
                    "iifname {runs} fib daddr . iif type local tcp dport {port} dnat ip to 127.0.0.1:{port}"
                ));
                to_host.push(format!("ip daddr 127.0.0.1 tcp dport {port} accept"));
            }
            ProxyRoute::Direct(a) => to_host.push(format!(
                "{} daddr {} tcp dport {} accept",
                family(a.ip()),
                a.ip(),
                a.port()
            )),
        }
    }
    to_host.push("jump refuse".into());

    let mut forward = vec![
        format!("iifname {runs} oifname {all} jump refuse"),
        format!("iifname {runs} meta mark & {DENY_MARK:#x} == {DENY_MARK:#x} jump refuse"),
        format!("oifname {runs} ct state established,related accept"),
        format!("oifname {runs} drop"),
    ];
    if r.confine_forwarding {
        forward.push(format!("iifname != {all} oifname != {all} drop"));
    }

    let mut t = String::new();
    let _ = writeln!(t, "table inet {} {{", r.table);
    let _ = writeln!(
        t,
        "  map run_marks {{\n    type ifname : mark\n    elements = {{ {} }}\n  }}",
        marks.join(", ")
    );
    for set in ["dns_rate", "dns_tcp_rate"] {
        let _ = writeln!(
            t,
            "  set {set} {{\n    type ipv4_addr\n    flags dynamic,timeout\n    timeout 10s\n  }}"
        );
    }
    chain(
        &mut t,
        "run_pre",
        Some("filter hook prerouting priority -150"),
        &[format!("iifname {runs} jump from_run")],
    );
    chain(&mut t, "from_run", None, &from_run);
    chain(
        &mut t,
        "run_dnat",
        Some("nat hook prerouting priority -100"),
        &dnat,
    );
    chain(
        &mut t,
        "run_in",
        Some("filter hook input priority 0"),
        &[format!("iifname {runs} jump to_host")],
    );
    chain(&mut t, "to_host", None, &to_host);
    chain(
        &mut t,
        "run_fwd",
        Some("filter hook forward priority 0"),
        &forward,
    );
    chain(
        &mut t,
        "run_post",
        Some("nat hook postrouting priority 100"),
        &[format!("iifname {runs} oifname != {all} masquerade")],
    );
    chain(&mut t, "refuse", None, &refuse());
    t.push_str("}\n");
    t
}

/// What the uid guard depends on.
pub struct Guard<'a> {
    pub table: &'a str,
    pub uids: Range<u32>,
    pub resolvers: &'a [IpAddr],
    pub proxies: &'a [SocketAddr],
    pub deny: &'a [IpNet],
    pub allow: &'a [AllowRule],
}

/// The table for runs that share the host's network namespace: their sockets are
/// theirs by uid, so the output hook can tell them from everything else on the host.
pub fn guard(g: &Guard<'_>) -> String {
    let mut rules = Vec::new();
    // DNS to the host's resolvers, which often listen on loopback (systemd-resolved,
    // Docker's embedded DNS), and the configured proxies stay reachable.
    let resolvers: Vec<IpNet> = g.resolvers.iter().map(|a| IpNet::from(*a)).collect();
    for (fam, set) in sets(&resolvers) {
        rules.push(format!(
            "{fam} daddr {{ {set} }} meta l4proto {{ tcp, udp }} th dport 53 accept"
        ));
    }
    for p in g.proxies {
        rules.push(format!(
            "{} daddr {} tcp dport {} accept",
            family(p.ip()),
            p.ip(),
            p.port()
        ));
    }
    rules.push("fib daddr type local jump refuse".into());
    for (fam, set) in sets(g.deny) {
        rules.push(format!("{fam} daddr {{ {set} }} jump refuse"));
    }
    if !g.allow.is_empty() {
        for a in g.allow {
            rules.push(allow_rule(a, "accept"));
        }
        rules.push("jump refuse".into());
    }
    let mut t = String::new();
    let _ = writeln!(t, "table inet {} {{", g.table);
    chain(
        &mut t,
        "sandbox_out",
        // Before NAT rewrites a destination (Docker's DNS).
        Some("filter hook output priority -150"),
        &[format!(
            "meta skuid {}-{} jump from_sandbox",
            g.uids.start,
            g.uids.end.saturating_sub(1)
        )],
    );
    chain(&mut t, "from_sandbox", None, &rules);
    chain(&mut t, "refuse", None, &refuse());
    t.push_str("}\n");
    t
}

/// A refusal the snippet sees at once: a reset for TCP, "administratively prohibited"
/// for the rest, instead of a silent drop it would wait on.
fn refuse() -> Vec<String> {
    vec![
        "meta l4proto tcp reject with tcp reset".into(),
        "reject with icmpx admin-prohibited".into(),
    ]
}

fn chain(t: &mut String, name: &str, hook: Option<&str>, rules: &[String]) {
    let _ = writeln!(t, "  chain {name} {{");
    if let Some(hook) = hook {
        let _ = writeln!(t, "    type {hook}; policy accept;");
    }
    for r in rules {
        let _ = writeln!(t, "    {r}");
    }
    t.push_str("  }\n");
}

fn allow_rule(a: &AllowRule, verdict: &str) -> String {
    let ports = match a.ports {
        None => String::new(),
        Some((first, last)) if first == last => {
            format!(" meta l4proto {{ tcp, udp }} th dport {first}")
        }
        Some((first, last)) => format!(" meta l4proto {{ tcp, udp }} th dport {first}-{last}"),
    };
    format!(
        "{} daddr {}{ports} {verdict}",
        family(a.net.addr()),
        element(&a.net)
    )
}

fn family(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "ip",
        IpAddr::V6(_) => "ip6",
    }
}

/// A single address prints without its /32 or /128.
fn element(n: &IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

/// `nets` merged (overlapping blocks would make nft refuse the set) and split by family
/// (`ip`, `ip6`) as set elements; families without any left out.
fn sets(nets: &[IpNet]) -> Vec<(&'static str, String)> {
    let merged = IpNet::aggregate(&nets.to_vec());
    let join = |v4: bool| {
        merged
            .iter()
            .filter(|n| matches!(n, IpNet::V4(_)) == v4)
            .map(element)
            .collect::<Vec<_>>()
            .join(", ")
    };
    [("ip", join(true)), ("ip6", join(false))]
        .into_iter()
        .filter(|(_, set)| !set.is_empty())
        .collect()
}

/// The address a run reaches a loopback proxy at: its own gateway.
pub fn loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4 == Ipv4Addr::UNSPECIFIED,
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(text: &str, needle: &str) -> usize {
        text.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} missing from\n{text}"))
    }

    fn isolated_text(allow: &[AllowRule], confine: bool) -> String {
        let deny: Vec<IpNet> = ["169.254.0.0/16", "10.9.0.0/16", "::1/128"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        isolated(&Isolated {
            table: "sandbox_net_1_2",
            tag: "0a1",
            subnet: "10.213.0.0/20".parse().unwrap(),
            uids: 10000..10003,
            relay_port: 40053,
            proxies: &[
                ProxyRoute::Loopback(3128),
                ProxyRoute::Direct("172.17.0.1:8080".parse().unwrap()),
            ],
            deny: &deny,
            allow,
            confine_forwarding: confine,
        })
    }

    #[test]
    fn runs_cannot_spoof_and_their_connections_carry_their_mark() {
        let t = isolated_text(&[], false);
        assert!(t.contains(
            "elements = { \"sbx0a110000\" : 0x5b000000, \"sbx0a110001\" : 0x5b000001, \"sbx0a110002\" : 0x5b000002 }"
        ));
        let spoof = position(&t, "fib saddr . iif oif missing drop");
        assert!(position(&t, "ip saddr != 10.213.0.0/20 drop") < spoof);
        assert!(spoof < position(&t, "ct state new ct mark set iifname map @run_marks"));
        assert!(t.contains("meta nfproto ipv6 drop"));
    }

    #[test]
    fn a_runs_dns_beyond_its_rate_is_dropped_before_the_relay() {
        let t = isolated_text(&[], false);
        assert!(t.contains("set dns_rate {\n    type ipv4_addr\n    flags dynamic,timeout"));
        assert!(t.contains("set dns_tcp_rate {"));
        let udp = position(
            &t,
            "fib daddr . iif type local udp dport 53 update @dns_rate { ip saddr limit rate over 1000/second burst 500 packets } drop",
        );
        let tcp = position(
            &t,
            "fib daddr . iif type local tcp dport 53 ct state new update @dns_tcp_rate { ip saddr limit rate over 100/second burst 50 packets } drop",
        );
        // Counted by the run's own address: after the checks that it is its own.
        let spoof = position(&t, "fib saddr . iif oif missing drop");
        let relay = position(
            &t,
            "fib daddr . iif type local meta l4proto { tcp, udp } th dport 53 return",
        );
        assert!(
            spoof < udp && udp < relay && spoof < tcp && tcp < relay,
            "{t}"
        );
    }

    #[test]
    fn dns_and_proxies_are_let_through_before_the_host_is_denied() {
        let t = isolated_text(&[], false);
        let host = position(
            &t,
            "fib daddr type { local, broadcast, multicast, anycast }",
        );
        for exception in [
            "fib daddr . iif type local meta l4proto { tcp, udp } th dport 53 return",
            "fib daddr . iif type local tcp dport 3128 return",
            "ip daddr 172.17.0.1 tcp dport 8080 return",
        ] {
            assert!(position(&t, exception) < host, "{exception}");
        }
        assert!(t.contains("th dport 53 dnat ip to 127.0.0.1:40053"));
        assert!(t.contains("tcp dport 3128 dnat ip to 127.0.0.1:3128"));
        assert!(t.contains("ip daddr 127.0.0.1 meta l4proto { tcp, udp } th dport 40053 accept"));
        assert!(t.contains("ip daddr 172.17.0.1 tcp dport 8080 accept"));
    }

    #[test]
    fn loopback_metadata_other_runs_and_denied_blocks_are_refused() {
        let t = isolated_text(&[], false);
        assert!(t.contains(
            "ip daddr { 0.0.0.0/8, 10.9.0.0/16, 10.213.0.0/20, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/3 } meta mark set meta mark | 0x10000000 return"
        ), "{t}");
        assert!(!t.contains("::1"), "runs have no IPv6: {t}");
        assert!(
            t.contains("iifname \"sbx0a1*\" oifname \"sbx*\" jump refuse"),
            "to any run"
        );
        assert!(t.contains("oifname \"sbx0a1*\" ct state established,related accept"));
        assert!(t.contains("iifname \"sbx0a1*\" oifname != \"sbx*\" masquerade"));
        assert!(
            t.contains("iifname \"sbx0a1*\" jump from_run"),
            "this server's runs only"
        );
        // Without an allow-list, whatever is not denied is reachable.
        assert!(!t.contains("from_run {\n    meta mark set"));
        assert!(!t.contains("iifname != \"sbx*\" oifname != \"sbx*\" drop"));
    }

    #[test]
    fn an_allow_list_ends_with_a_denial() {
        let allow = [
            AllowRule {
                net: "203.0.113.0/24".parse().unwrap(),
                ports: Some((443, 443)),
            },
            AllowRule {
                net: "198.51.100.7/32".parse().unwrap(),
                ports: None,
            },
        ];
        let t = isolated_text(&allow, true);
        let first = position(
            &t,
            "ip daddr 203.0.113.0/24 meta l4proto { tcp, udp } th dport 443 return",
        );
        let second = position(&t, "ip daddr 198.51.100.7 return");
        let last = position(&t, "    meta mark set meta mark | 0x10000000 return\n  }");
        assert!(first < second && second < last, "{t}");
        assert!(
            t.contains("iifname != \"sbx*\" oifname != \"sbx*\" drop"),
            "forwarding stays confined"
        );
    }

    #[test]
    fn the_guard_matches_sandbox_uids_and_refuses_the_host() {
        let deny: Vec<IpNet> = ["127.0.0.0/8", "127.1.0.0/16", "::1/128", "169.254.0.0/16"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let resolvers: Vec<IpAddr> =
            vec!["127.0.0.11".parse().unwrap(), "fe80::1".parse().unwrap()];
        let t = guard(&Guard {
            table: "sandbox_guard_7",
            uids: 10000..11000,
            resolvers: &resolvers,
            proxies: &["127.0.0.1:3128".parse().unwrap()],
            deny: &deny,
            allow: &[],
        });
        assert!(t.starts_with("table inet sandbox_guard_7 {"), "{t}");
        assert!(t.contains("meta skuid 10000-10999 jump from_sandbox"));
        let dns = position(
            &t,
            "ip daddr { 127.0.0.11 } meta l4proto { tcp, udp } th dport 53 accept",
        );
        let proxy = position(&t, "ip daddr 127.0.0.1 tcp dport 3128 accept");
        let local = position(&t, "fib daddr type local jump refuse");
        assert!(dns < local && proxy < local, "{t}");
        // 127.1.0.0/16 lies inside 127.0.0.0/8: merged, or nft would refuse the set.
        assert!(
            t.contains("ip daddr { 127.0.0.0/8, 169.254.0.0/16 } jump refuse"),
            "{t}"
        );
        assert!(t.contains("ip6 daddr { ::1 } jump refuse"), "{t}");
        assert!(t.contains("ip6 daddr { fe80::1 } meta l4proto"), "{t}");
    }
}
