//! The network settings of runs: how networked runs are isolated, the addresses they
//! get, and what they may and may not reach.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use super::ConfigError;
use super::values::{Env, list_setting, one_of};

/// How networked runs reach the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkIsolation {
    /// The strongest the host allows: a network namespace of its own per run, joined to
    /// the host by a veth pair and NAT; refused when that cannot be set up.
    Auto,
    /// The host's own network namespace, as the original service does (asked for
    /// explicitly; logged loudly).
    Shared,
}

/// An entry of `network_allow`: an exception to the denied blocks it lies inside, and a
/// destination of the allow-list the entries make (see `NetworkSettings::allow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowRule {
    pub net: IpNet,
    /// A port or an inclusive range; `None` for every port.
    pub ports: Option<(u16, u16)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSettings {
    pub isolation: NetworkIsolation,
    /// Where runs' own addresses come from: a /30 per sandbox uid.
    pub subnet: Ipv4Net,
    /// What networked runs may not reach, on top of what is always denied (the host's
    /// own addresses, loopback, link-local, multicast, runs' subnets) and of the private
    /// ranges (`PRIVATE_RANGES`, see `denied`).
    pub deny: Vec<IpNet>,
    /// Two roles, one rule (the most specific entry wins): an entry inside a denied block
    /// (a private range, `network_deny`) opens that address or block as an exception;
    /// and when the list is not empty, its entries are the only destinations networked
    /// runs may reach (proxies and DNS excepted). `0.0.0.0/0` keeps everything else not
    /// denied reachable beside the exceptions. What is always denied stays denied.
    pub allow: Vec<AllowRule>,
    /// The resolvers runs' DNS queries are relayed to; empty: those of /etc/resolv.conf.
    pub dns: Vec<IpAddr>,
}

/// What networked runs may not reach unless the operator says otherwise: the host's own
/// services (loopback; 0.0.0.0 reaches them too), link-local addresses, where the cloud
/// metadata services live (169.254.169.254, fd00:ec2::254).
pub const DEFAULT_NETWORK_DENY: &[&str] = &[
    "127.0.0.0/8",
    "0.0.0.0/8",
    "169.254.0.0/16",
    "::1/128",
    "fe80::/10",
    "fd00:ec2::254/128",
];

/// Private and shared address space: the operator's databases and internal services.
/// Denied to networked runs whatever `network_deny` says (an old copy of the
/// configuration file lists `network_deny` without them), as Dify's `ssrf_proxy` does;
/// `network_allow` opens an address or block inside them.
pub const PRIVATE_RANGES: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
];

impl NetworkSettings {
    /// Every block networked runs may not reach unless `network_allow` opens it: the
    /// configured `network_deny` and the private ranges.
    pub fn denied(&self) -> Vec<IpNet> {
        let mut all = self.deny.clone();
        all.extend(
            PRIVATE_RANGES
                .iter()
                .filter_map(|s| s.parse::<IpNet>().ok()),
        );
        all
    }

    /// Where runs of any server on this host may have their addresses, as far as this
    /// configuration knows: its own subnet and the default one.
    pub fn sandbox_subnets(&self) -> Vec<Ipv4Net> {
        let mut subnets = vec![self.subnet];
        if let Ok(default) = DEFAULT_NETWORK_SUBNET.parse::<Ipv4Net>()
            && default != self.subnet
        {
            subnets.push(default);
        }
        subnets
    }
}

/// Runs' addresses: rarely routed anywhere, and big enough for a /30 per sandbox uid.
pub const DEFAULT_NETWORK_SUBNET: &str = "10.213.0.0/20";

/// Addresses for 1000 uids, four each.
const SMALLEST_SUBNET_PREFIX: u8 = 20;

pub(super) struct RawNetwork {
    pub isolation: Option<String>,
    pub subnet: Option<String>,
    pub deny: Option<Vec<String>>,
    pub allow: Option<Vec<String>>,
    pub dns: Option<Vec<String>>,
}

pub(super) fn settings(raw: RawNetwork, e: &Env) -> Result<NetworkSettings, ConfigError> {
    let isolation = match one_of(
        e.string("NETWORK_ISOLATION").or(raw.isolation),
        "network_isolation",
        &["auto", "shared"],
    )?
    .as_str()
    {
        "shared" => NetworkIsolation::Shared,
        _ => NetworkIsolation::Auto,
    };
    let subnet_text = e
        .string("NETWORK_SUBNET")
        .or(raw.subnet)
        .unwrap_or_else(|| DEFAULT_NETWORK_SUBNET.to_string());
    let subnet = parse_subnet(&subnet_text).map_err(|reason| ConfigError::Value {
        key: "network_subnet".into(),
        value: subnet_text.clone(),
        reason: reason.to_string(),
    })?;
    Ok(NetworkSettings {
        isolation,
        subnet,
        deny: list_setting(
            ("NETWORK_DENY", "network_deny"),
            e.string("NETWORK_DENY"),
            raw.deny,
            DEFAULT_NETWORK_DENY,
            parse_net,
        )?,
        allow: list_setting(
            ("NETWORK_ALLOW", "network_allow"),
            e.string("NETWORK_ALLOW"),
            raw.allow,
            &[],
            parse_allow,
        )?,
        dns: list_setting(
            ("NETWORK_DNS", "network_dns"),
            e.string("NETWORK_DNS"),
            raw.dns,
            &[],
            |s| s.parse::<IpAddr>().map_err(|_| BadNet::Resolver),
        )?,
    })
}

/// What is wrong with an address, block or rule in the network settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadNet {
    #[error("expected an IPv4 block such as {DEFAULT_NETWORK_SUBNET}")]
    NotIpv4Block,
    #[error(
        "a /{0} is too small: runs need a /30 each for 1000 uids, a /{SMALLEST_SUBNET_PREFIX} or larger"
    )]
    TooSmall(u8),
    #[error("choose a private block that no route of this host uses")]
    Unroutable,
    #[error("expected an address or a CIDR block such as 169.254.0.0/16 or fe80::/10")]
    NotANet,
    #[error(
        "expected an address or block, optionally with :PORT or :FIRST-LAST, such as 203.0.113.0/24:443, 10.0.0.5:5432 or [fd00::5]:5432"
    )]
    NotAnAllowRule,
    #[error("expected a resolver's address such as 10.0.0.2")]
    Resolver,
}

fn parse_subnet(text: &str) -> Result<Ipv4Net, BadNet> {
    let net: Ipv4Net = text.trim().parse().map_err(|_| BadNet::NotIpv4Block)?;
    if net.prefix_len() > SMALLEST_SUBNET_PREFIX {
        return Err(BadNet::TooSmall(net.prefix_len()));
    }
    if net.network() == Ipv4Addr::UNSPECIFIED || net.addr().is_loopback() {
        return Err(BadNet::Unroutable);
    }
    Ok(net.trunc())
}

/// An address (just that address) or a CIDR block.
fn parse_net(item: &str) -> Result<IpNet, BadNet> {
    item.parse::<IpNet>()
        .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| BadNet::NotANet)
}

/// `NET`, `NET:PORT` or `NET:FIRST-LAST`; an IPv6 NET takes its ports in brackets,
/// `[NET]:PORT` (only runs in the host's network have IPv6).
fn parse_allow(item: &str) -> Result<AllowRule, BadNet> {
    let usage = BadNet::NotAnAllowRule;
    let item = item.trim();
    let (net, ports) = if let Some(rest) = item.strip_prefix('[') {
        let (net, after) = rest.split_once(']').ok_or(usage)?;
        match after {
            "" => (net, None),
            _ => (net, Some(after.strip_prefix(':').ok_or(usage)?)),
        }
    } else if item.matches(':').count() > 1 {
        // An IPv6 address or block without ports.
        (item, None)
    } else {
        match item.rsplit_once(':') {
            Some((net, ports)) => (net, Some(ports)),
            None => (item, None),
        }
    };
    let net = parse_net(net).map_err(|_| usage)?;
    let ports = match ports {
        None => None,
        Some(p) => {
            let (first, last) = p.split_once('-').unwrap_or((p, p));
            let parse = |s: &str| s.trim().parse::<u16>().map_err(|_| usage);
            let (first, last) = (parse(first)?, parse(last)?);
            if first == 0 || first > last {
                return Err(usage);
            }
            Some((first, last))
        }
    };
    // `10.0.0.5/8` means its block, as nft would read it.
    Ok(AllowRule {
        net: net.trunc(),
        ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_rules_take_addresses_blocks_and_ports() {
        assert_eq!(
            parse_allow("203.0.113.0/24").unwrap(),
            AllowRule {
                net: "203.0.113.0/24".parse().unwrap(),
                ports: None
            }
        );
        assert_eq!(
            parse_allow("10.1.2.3/8").unwrap().net,
            "10.0.0.0/8".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_allow("198.51.100.7:443").unwrap().ports,
            Some((443, 443))
        );
        assert_eq!(
            parse_allow("10.0.0.0/8:8000-8100").unwrap().ports,
            Some((8000, 8100))
        );
        assert_eq!(
            parse_allow("fd00:1::/64").unwrap(),
            AllowRule {
                net: "fd00:1::/64".parse().unwrap(),
                ports: None
            }
        );
        assert_eq!(
            parse_allow("[fd00::5]:5432").unwrap(),
            AllowRule {
                net: "fd00::5/128".parse().unwrap(),
                ports: Some((5432, 5432))
            }
        );
        for bad in [
            "example.com",
            "10.0.0.0/8:0",
            "10.0.0.1:9-8",
            "1.2.3.4:x",
            "[fd00::5]5432",
            "[fd00::5",
        ] {
            assert_eq!(parse_allow(bad), Err(BadNet::NotAnAllowRule), "{bad}");
        }
    }

    #[test]
    fn private_ranges_are_denied_whatever_network_deny_says() {
        let settings = |deny: Vec<IpNet>| NetworkSettings {
            isolation: NetworkIsolation::Auto,
            subnet: DEFAULT_NETWORK_SUBNET.parse().unwrap(),
            deny,
            allow: Vec::new(),
            dns: Vec::new(),
        };
        for deny in [Vec::new(), vec!["192.0.2.0/24".parse().unwrap()]] {
            let denied = settings(deny.clone()).denied();
            for private in [
                "10.1.2.3",
                "172.31.0.1",
                "192.168.1.1",
                "100.64.0.1",
                "fd12::1",
            ] {
                let ip: IpAddr = private.parse().unwrap();
                assert!(denied.iter().any(|n| n.contains(&ip)), "{private}");
            }
            assert!(deny.iter().all(|d| denied.contains(d)));
        }
    }

    #[test]
    fn the_subnet_must_hold_every_uid() {
        assert_eq!(
            parse_subnet("10.213.5.0/20").unwrap(),
            "10.213.0.0/20".parse::<Ipv4Net>().unwrap()
        );
        assert_eq!(parse_subnet("10.213.0.0/24"), Err(BadNet::TooSmall(24)));
        assert_eq!(parse_subnet("127.0.0.0/8"), Err(BadNet::Unroutable));
        assert_eq!(parse_subnet("fd00::/64"), Err(BadNet::NotIpv4Block));
    }
}
