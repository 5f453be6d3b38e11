//! The nftables rules the server owns, as text: pure functions of what is configured,
//! so each rule's presence and order is checked by unit tests, and the kernel checks the
//! syntax when the table is installed.
//!
//! Two rulesets:
//! - `isolated`: runs in network namespaces of their own, joined to the host by veth
//!   pairs named `sbx<uid>`. Their traffic is forwarded and masqueraded; anything aimed
//!   at the host itself, at other runs, or at denied blocks is refused; nothing but
//!   replies to a run's own traffic enters it, not even from the host.
//! - `guard`: runs sharing the host's network namespace (the chroot level, or
//!   `network_isolation: shared`): their sockets are recognised by uid.
//!
//! Both end with the operator's policy (`policy`): the denied blocks and the allow
//! entries, the most specific first.

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

/// Destinations no run ever reaches, whatever `network_deny` and `network_allow` say:
/// "this" network, loopback, link-local (cloud metadata), multicast and reserved blocks.
/// Runs' subnets are added to them.
const ALWAYS_DENIED_V4: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// The same for runs in the host's network, which have IPv6: unspecified, loopback,
/// link-local, multicast, and the cloud metadata service's address.
const ALWAYS_DENIED_V6: &[&str] = &[
    "::/128",
    "::1/128",
    "fe80::/10",
    "ff00::/8",
    "fd00:ec2::254/128",
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
    /// This server's runs' addresses.
    pub subnet: Ipv4Net,
    /// Every server's runs' subnets (this one's and the default): never a destination.
    pub subnets: &'a [Ipv4Net],
    pub uids: Range<u32>,
    /// The DNS relay's port on 127.0.0.1 (UDP and TCP).
    pub relay_port: u16,
    pub proxies: &'a [ProxyRoute],
    /// Every denied block (`network_deny` and the private ranges).
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
    let mut always = always_denied(ALWAYS_DENIED_V4, r.subnets);
    always.push(IpNet::V4(r.subnet));
    for (fam, set) in sets(&always) {
        from_run.push(format!("{fam} daddr {{ {set} }} {deny}"));
    }
    // Runs have IPv4 only: IPv6 entries have nothing to match.
    from_run.extend(policy(r.deny, r.allow, Family::V4, &deny, "return"));
    if !r.allow.is_empty() {
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
    // Nothing of the host starts a connection into a run, or sends it a datagram that
    // is no reply (a run in the host's network, any local user): a run, a kept namespace
    // and a warm worker's namespace receive only what answers their own traffic, and the
    // host's resets and ICMP errors for it (conntrack counts those as related).
    chain(
        &mut t,
        "run_out",
        Some("filter hook output priority 0"),
        &[
            format!("oifname {runs} ct state established,related accept"),
            format!("oifname {runs} drop"),
        ],
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
    /// Runs' subnets (this configuration's and the default): other servers' runs.
    pub subnets: &'a [Ipv4Net],
    /// Every denied block (`network_deny` and the private ranges).
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
    rules.push("fib daddr type { local, broadcast, multicast, anycast } jump refuse".into());
    // Any server's runs in namespaces of their own, whatever their subnet: the host
    // reaches them through their veth pairs.
    rules.push(format!("oifname \"{IFNAME_PREFIX}*\" jump refuse"));
    let mut always = always_denied(ALWAYS_DENIED_V4, g.subnets);
    always.extend(always_denied(ALWAYS_DENIED_V6, &[]));
    // Through a NAT64 gateway (IPv6-only networks with DNS64), an IPv4 block is reached
    // at its embedding in the well-known prefix: what is denied by IPv4 is denied there
    // too, and the local-use prefix, whose embedding varies, as a whole.
    let v4_denied: Vec<Ipv4Net> = always
        .iter()
        .chain(g.deny)
        .filter_map(|n| match n {
            IpNet::V4(v4) => Some(*v4),
            IpNet::V6(_) => None,
        })
        .collect();
    // Aggregated: a set's intervals must not overlap.
    always.extend(
        Ipv4Net::aggregate(&v4_denied)
            .into_iter()
            .filter_map(nat64)
            .map(IpNet::V6),
    );
    always.extend("64:ff9b:1::/48".parse::<IpNet>().ok());
    for (fam, set) in sets(&always) {
        rules.push(format!("{fam} daddr {{ {set} }} jump refuse"));
    }
    rules.extend(policy(
        g.deny,
        g.allow,
        Family::Both,
        "jump refuse",
        "accept",
    ));
    if !g.allow.is_empty() {
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

/// `net` as a NAT64 gateway reaches it: embedded in the well-known prefix 64:ff9b::/96.
fn nat64(net: Ipv4Net) -> Option<ipnet::Ipv6Net> {
    let [a, b, c, d] = net.network().octets();
    let addr = std::net::Ipv6Addr::new(
        0x64,
        0xff9b,
        0,
        0,
        0,
        0,
        u16::from_be_bytes([a, b]),
        u16::from_be_bytes([c, d]),
    );
    ipnet::Ipv6Net::new(addr, 96 + net.prefix_len()).ok()
}

fn always_denied(blocks: &[&str], subnets: &[Ipv4Net]) -> Vec<IpNet> {
    blocks
        .iter()
        .filter_map(|s| s.parse().ok())
        .chain(subnets.iter().map(|n| IpNet::V4(*n)))
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    Both,
}

/// The operator's policy, after what is always denied: the denied blocks and the allow
/// entries, most specific first, so the most specific entry decides. An allow entry
/// inside a denied block (`10.0.0.5:5432` in `10.0.0.0/8`) opens it, for its ports; a
/// denied block inside an allow entry (`10.0.0.0/8` in `0.0.0.0/0`) stays denied; an
/// allow entry naming a denied block exactly opens it. Neighbouring denied blocks share
/// one set. Whether anything not named is refused (a non-empty allow-list) is the
/// caller's last rule.
fn policy(
    deny: &[IpNet],
    allow: &[AllowRule],
    families: Family,
    deny_verdict: &str,
    allow_verdict: &str,
) -> Vec<String> {
    /// A denied block (`None`) or an allow entry.
    struct Entry<'a> {
        net: IpNet,
        allow: Option<&'a AllowRule>,
    }
    impl Entry<'_> {
        /// IPv6 after IPv4, the longest prefix first, an allow entry before a denied
        /// block of the same length.
        fn order(&self) -> (bool, std::cmp::Reverse<u8>, bool) {
            (
                self.net.addr().is_ipv6(),
                std::cmp::Reverse(self.net.prefix_len()),
                self.allow.is_none(),
            )
        }
    }
    let keep = |n: &IpNet| families == Family::Both || matches!(n, IpNet::V4(_));
    let mut entries: Vec<Entry<'_>> = deny
        .iter()
        .filter(|n| keep(n))
        .map(|n| Entry {
            net: n.trunc(),
            allow: None,
        })
        .chain(allow.iter().filter(|a| keep(&a.net)).map(|a| Entry {
            net: a.net,
            allow: Some(a),
        }))
        .collect();
    entries.sort_by_key(Entry::order);
    let mut rules = Vec::new();
    let mut denied: Vec<IpNet> = Vec::new();
    let flush = |denied: &mut Vec<IpNet>, rules: &mut Vec<String>| {
        for (fam, set) in sets(denied) {
            rules.push(format!("{fam} daddr {{ {set} }} {deny_verdict}"));
        }
        denied.clear();
    };
    for entry in entries {
        match entry.allow {
            None => denied.push(entry.net),
            Some(a) => {
                flush(&mut denied, &mut rules);
                rules.push(allow_rule(a, allow_verdict));
            }
        }
    }
    flush(&mut denied, &mut rules);
    rules
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

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn rule(net: &str, ports: Option<(u16, u16)>) -> AllowRule {
        AllowRule {
            net: net.parse().unwrap(),
            ports,
        }
    }

    /// `network_deny` as in the tests, with the private ranges.
    fn denied() -> Vec<IpNet> {
        nets(&[
            "169.254.0.0/16",
            "10.9.0.0/16",
            "::1/128",
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "fc00::/7",
        ])
    }

    fn subnets() -> Vec<Ipv4Net> {
        vec![
            "10.214.0.0/20".parse().unwrap(),
            "10.213.0.0/20".parse().unwrap(),
        ]
    }

    fn isolated_text(allow: &[AllowRule], confine: bool) -> String {
        isolated(&Isolated {
            table: "sandbox_net_1_2",
            tag: "0a1",
            subnet: "10.214.0.0/20".parse().unwrap(),
            subnets: &subnets(),
            uids: 10000..10003,
            relay_port: 40053,
            proxies: &[
                ProxyRoute::Loopback(3128),
                ProxyRoute::Direct("172.17.0.1:8080".parse().unwrap()),
            ],
            deny: &denied(),
            allow,
            confine_forwarding: confine,
        })
    }

    const DENY: &str = "meta mark set meta mark | 0x10000000 return";

    #[test]
    fn runs_cannot_spoof_and_their_connections_carry_their_mark() {
        let t = isolated_text(&[], false);
        assert!(t.contains(
            "elements = { \"sbx0a110000\" : 0x5b000000, \"sbx0a110001\" : 0x5b000001, \"sbx0a110002\" : 0x5b000002 }"
        ));
        let spoof = position(&t, "fib saddr . iif oif missing drop");
        assert!(position(&t, "ip saddr != 10.214.0.0/20 drop") < spoof);
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
            // A proxy on a private address: before the private ranges are denied.
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
    fn loopback_metadata_every_runs_subnet_and_private_ranges_are_refused() {
        let t = isolated_text(&[], false);
        let always = position(
            &t,
            &format!(
                "ip daddr {{ 0.0.0.0/8, 10.213.0.0/20, 10.214.0.0/20, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/3 }} {DENY}"
            ),
        );
        let private = position(
            &t,
            &format!(
                "ip daddr {{ 10.0.0.0/8, 100.64.0.0/10, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16 }} {DENY}"
            ),
        );
        assert!(always < private, "{t}");
        assert!(
            !t.contains("::1") && !t.contains("fc00"),
            "runs have no IPv6: {t}"
        );
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
        assert!(!t.contains(&format!("from_run {{\n    {DENY}")));
        assert!(!t.contains(&format!("    {DENY}\n  }}")), "{t}");
        assert!(!t.contains("iifname != \"sbx*\" oifname != \"sbx*\" drop"));
    }

    #[test]
    fn the_host_sends_a_run_nothing_but_replies() {
        let t = isolated_text(&[], false);
        let out = &t[position(&t, "chain run_out {")..];
        assert!(
            out.starts_with(
                "chain run_out {\n    type filter hook output priority 0; policy accept;\n    oifname \"sbx0a1*\" ct state established,related accept\n    oifname \"sbx0a1*\" drop\n  }"
            ),
            "{t}"
        );
    }

    #[test]
    fn an_allow_entry_inside_a_denied_block_opens_it_and_an_allow_list_ends_with_a_denial() {
        let allow = [
            rule("203.0.113.0/24", Some((443, 443))),
            rule("198.51.100.7/32", None),
            rule("10.0.0.5/32", Some((5432, 5432))),
            rule("fd00::5/128", None),
        ];
        let t = isolated_text(&allow, true);
        let db = position(
            &t,
            "ip daddr 10.0.0.5 meta l4proto { tcp, udp } th dport 5432 return",
        );
        let one = position(&t, "ip daddr 198.51.100.7 return");
        let block = position(
            &t,
            "ip daddr 203.0.113.0/24 meta l4proto { tcp, udp } th dport 443 return",
        );
        let private = position(&t, "ip daddr { 10.0.0.0/8, ");
        let last = position(&t, &format!("    {DENY}\n  }}"));
        assert!(db < private && private < last, "{t}");
        assert!(one < block && block < last, "{t}");
        assert!(!t.contains("fd00::5"), "runs have no IPv6: {t}");
        assert!(
            t.contains("iifname != \"sbx*\" oifname != \"sbx*\" drop"),
            "forwarding stays confined"
        );
    }

    #[test]
    fn the_most_specific_entry_decides() {
        let d = " D";
        let policy =
            |deny: &[&str], allow: &[AllowRule]| policy(&nets(deny), allow, Family::Both, "D", "A");
        // Everything else stays open, but 10.1.2.0/24 inside the opened 10.1.0.0/16
        // stays denied, and so does the rest of 10.0.0.0/8.
        assert_eq!(
            policy(
                &["10.0.0.0/8", "10.1.2.0/24", "fc00::/7"],
                &[rule("0.0.0.0/0", None), rule("10.1.0.0/16", None)]
            ),
            vec![
                format!("ip daddr {{ 10.1.2.0/24 }}{d}"),
                "ip daddr 10.1.0.0/16 A".to_string(),
                format!("ip daddr {{ 10.0.0.0/8 }}{d}"),
                "ip daddr 0.0.0.0/0 A".to_string(),
                format!("ip6 daddr {{ fc00::/7 }}{d}"),
            ]
        );
        // Naming a denied block exactly opens it; neighbouring denials share a set.
        assert_eq!(
            policy(
                &["192.168.0.0/16", "172.16.0.0/12", "127.0.0.0/8"],
                &[rule("192.168.0.0/16", Some((80, 90)))]
            ),
            vec![
                "ip daddr 192.168.0.0/16 meta l4proto { tcp, udp } th dport 80-90 A".to_string(),
                format!("ip daddr {{ 127.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 }}{d}"),
            ]
        );
        // A block named wider than a denied one does not open it.
        assert_eq!(
            policy(&["10.0.0.0/8"], &[rule("10.0.0.0/7", None)]),
            vec![
                format!("ip daddr {{ 10.0.0.0/8 }}{d}"),
                "ip daddr 10.0.0.0/7 A".to_string(),
            ]
        );
    }

    #[test]
    fn the_guard_matches_sandbox_uids_and_refuses_the_host_and_every_run() {
        let resolvers: Vec<IpAddr> =
            vec!["127.0.0.11".parse().unwrap(), "fe80::1".parse().unwrap()];
        let mut deny = denied();
        // 127.1.0.0/16 lies inside 127.0.0.0/8: merged, or nft would refuse the set.
        deny.extend(nets(&["127.0.0.0/8", "127.1.0.0/16"]));
        let allow = [rule("fd00::5/128", Some((5432, 5432)))];
        let t = guard(&Guard {
            table: "sandbox_guard_7",
            uids: 10000..11000,
            resolvers: &resolvers,
            proxies: &[
                "127.0.0.1:3128".parse().unwrap(),
                "10.1.1.1:3128".parse().unwrap(),
            ],
            subnets: &subnets(),
            deny: &deny,
            allow: &allow,
        });
        assert!(t.starts_with("table inet sandbox_guard_7 {"), "{t}");
        assert!(t.contains("meta skuid 10000-10999 jump from_sandbox"));
        let dns = position(
            &t,
            "ip daddr { 127.0.0.11 } meta l4proto { tcp, udp } th dport 53 accept",
        );
        assert!(t.contains("ip6 daddr { fe80::1 } meta l4proto"), "{t}");
        let proxy = position(&t, "ip daddr 127.0.0.1 tcp dport 3128 accept");
        let private_proxy = position(&t, "ip daddr 10.1.1.1 tcp dport 3128 accept");
        let local = position(
            &t,
            "fib daddr type { local, broadcast, multicast, anycast } jump refuse",
        );
        assert!(dns < local && proxy < local && private_proxy < local, "{t}");
        let runs = position(&t, "oifname \"sbx*\" jump refuse");
        let always = position(
            &t,
            "ip daddr { 0.0.0.0/8, 10.213.0.0/20, 10.214.0.0/20, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/3 } jump refuse",
        );
        let always6 = position(
            &t,
            // With what a NAT64 gateway would reach of the denied IPv4 blocks
            // (0/8, 10/8, 100.64/10, 127/8, 169.254/16, 172.16/12, 192.168/16,
            // multicast and reserved), and the local-use NAT64 prefix.
            "ip6 daddr { ::/127, 64:ff9b::/104, 64:ff9b::a00:0/104, 64:ff9b::6440:0/106, \
             64:ff9b::7f00:0/104, 64:ff9b::a9fe:0/112, 64:ff9b::ac10:0/108, \
             64:ff9b::c0a8:0/112, 64:ff9b::e000:0/99, 64:ff9b:1::/48, fd00:ec2::254, \
             fe80::/10, ff00::/8 } jump refuse",
        );
        let private = position(
            &t,
            "ip daddr { 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16 } jump refuse",
        );
        let opened = position(
            &t,
            "ip6 daddr fd00::5 meta l4proto { tcp, udp } th dport 5432 accept",
        );
        let private6 = position(&t, "ip6 daddr { ::1, fc00::/7 } jump refuse");
        assert!(local < runs && runs < always && always < always6, "{t}");
        assert!(
            always6 < private && private < opened && opened < private6,
            "{t}"
        );
        assert!(t.ends_with("    jump refuse\n  }\n  chain refuse {\n    meta l4proto tcp reject with tcp reset\n    reject with icmpx admin-prohibited\n  }\n}\n"), "{t}");
    }
}
