//! What networked runs get on this server, decided once at start from the host's level
//! and the configuration, and the per-run work that follows from it: a namespace of the
//! run's own prepared with its worker, released with it.
//!
//! The decision fails closed: a networked run either gets its own network namespace
//! behind the server's rules, or the uid guard where namespaces cannot be made, or the
//! host's network because the operator asked for it; when none of that can be set up,
//! networked runs are refused with the reason and its fix.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use super::RunError;
use crate::config::{Config, NetworkIsolation, Proxy};
use crate::isolation::detect::Host;
use crate::isolation::net::addressing::{IFNAME_PREFIX, server_tag};
use crate::isolation::net::dns::DnsRelay;
use crate::isolation::net::forwarding::{self, Forwarding};
use crate::isolation::net::guard::{self, GuardRules, NetGuard};
use crate::isolation::net::netns::{Plumbing, RunNetns};
use crate::isolation::net::nft::{self, Table};
use crate::isolation::net::resolv;
use crate::isolation::net::ruleset::{self, ProxyRoute};
use crate::isolation::spec::{IsolationLevel, NetworkSetup};
use crate::isolation::uids::UidLease;
use crate::runtime::Language;

pub const ISOLATED_TABLE_PREFIX: &str = "sandbox_net_";

/// How networked runs reach the network on this server.
pub enum RunNetwork {
    /// `enable_network` is false: no run has network.
    Off,
    /// A network namespace of its own per run.
    Isolated(Box<Isolated>),
    /// The host's network namespace, with the uid guard when it could be installed.
    Host {
        guard: Option<NetGuard>,
        /// The operator asked for it (`network_isolation: shared`).
        requested: bool,
    },
    /// Networked runs are refused: why, and what to do.
    Unavailable(String),
}

/// Everything runs' own namespaces depend on, alive as long as the server.
pub struct Isolated {
    plumbing: Plumbing,
    relay: DnsRelay,
    /// The host's resolv.conf, for the search and options lines runs keep.
    host_resolv: String,
    /// Proxies on the host's loopback: runs reach them through their gateway.
    loopback_proxies: Vec<u16>,
    proxy: Proxy,
    forwarding: Forwarding,
    table: Table,
}

/// A networked run's network, prepared with its worker.
pub struct PreparedNetwork {
    pub setup: NetworkSetup,
    /// The run's own namespace, to hand to its helper.
    pub netns: Option<RunNetns>,
    pub resolv_conf: Option<String>,
    /// The proxies as the run reaches them.
    pub proxy: Proxy,
}

impl RunNetwork {
    /// Decide and set up. `held` tells whether a sandbox uid is leased by a live server
    /// (interfaces of uids nobody holds are leftovers of a server that died).
    pub async fn build(
        config: &Config,
        host: &Host,
        uids: Range<u32>,
        held: impl Fn(u32) -> bool,
    ) -> Self {
        if !config.enable_network {
            return Self::Off;
        }
        let root = host.level != IsolationLevel::Rootless;
        if root {
            guard::remove_stale_tables();
            for table in nft::remove_stale(ISOLATED_TABLE_PREFIX) {
                tracing::info!(table, "removed the network table of a server that is gone");
            }
            let prefix = nft::own_prefix(ISOLATED_TABLE_PREFIX);
            forwarding::remove_stale_exceptions(&prefix, |tag| {
                tag.rsplit('_')
                    .next()
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
            });
        }
        let proxies = proxy_addresses(&config.proxy).await;
        match (config.network.isolation, host.level) {
            (NetworkIsolation::Shared, _) => Self::host_guarded(config, uids, &proxies, root, true),
            (NetworkIsolation::Auto, IsolationLevel::Namespaces) => {
                match Isolated::build(config, uids, &proxies, held).await {
                    Ok(isolated) => Self::Isolated(Box::new(isolated)),
                    Err(reason) => Self::Unavailable(format!(
                        "networked runs cannot get a network of their own: {reason}"
                    )),
                }
            }
            (NetworkIsolation::Auto, IsolationLevel::Chroot) => {
                match Self::host_guarded(config, uids, &proxies, root, false) {
                    Self::Host { guard: None, .. } => Self::Unavailable(
                        "the chroot level shares the host's network and its guard (an nftables table) could not be installed (see the log): give the server CAP_NET_ADMIN (in Docker: --cap-add NET_ADMIN), or set network_isolation: shared (NETWORK_ISOLATION=shared) to let runs use the host's network unguarded".into(),
                    ),
                    other => other,
                }
            }
            (NetworkIsolation::Auto, IsolationLevel::Rootless) => Self::Unavailable(
                "without root, runs cannot get a network of their own here; run the server as root, or set network_isolation: shared (NETWORK_ISOLATION=shared) to let runs use this user's network, loopback included".into(),
            ),
        }
    }

    fn host_guarded(
        config: &Config,
        uids: Range<u32>,
        proxies: &[SocketAddr],
        root: bool,
        requested: bool,
    ) -> Self {
        let guard = if root {
            let resolvers = resolv::host_nameservers();
            NetGuard::install(&GuardRules {
                uids,
                resolvers: &resolvers,
                proxies,
                subnets: &config.network.sandbox_subnets(),
                deny: &config.network.denied(),
                allow: &config.network.allow,
            })
            .map_err(|e| tracing::error!(error = %e, "cannot install the network guard"))
            .ok()
        } else {
            None
        };
        Self::Host { guard, requested }
    }

    /// The level in words, for logs and `doctor`.
    pub fn describe(&self) -> String {
        match self {
            Self::Off => "none: enable_network is false".into(),
            Self::Isolated(i) => format!(
                "isolated: a network namespace per run (kept for the next run only when nothing was sent or left in it), NAT through the host, table {}, DNS relayed to {}",
                i.table.name(),
                i.relay
                    .upstreams()
                    .iter()
                    .map(|u| u.ip().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Self::Host {
                guard: Some(g),
                requested,
            } => format!(
                "shared{}: the host's network, sandbox uids filtered by table {}",
                if *requested { " by request" } else { " (chroot level)" },
                g.table()
            ),
            Self::Host { guard: None, .. } => {
                "shared by request, unguarded: runs reach whatever this host reaches, its loopback included".into()
            }
            Self::Unavailable(reason) => format!("none: {reason}"),
        }
    }

    /// Whether networked runs can be served at all.
    pub fn available(&self) -> bool {
        matches!(self, Self::Isolated(_) | Self::Host { .. })
    }

    /// A namespace a finished run left untouched, with its uid's lease: the next
    /// networked run takes it instead of a new one (see `isolation::net::traces`).
    pub fn reuse(&self) -> Option<(UidLease, RunNetns)> {
        match self {
            Self::Isolated(i) => i.plumbing.reuse(),
            _ => None,
        }
    }

    /// How many namespaces are kept for reuse.
    pub fn kept(&self) -> usize {
        match self {
            Self::Isolated(i) => i.plumbing.kept(),
            _ => 0,
        }
    }

    /// At shutdown: destroy the namespaces kept for reuse.
    pub async fn close(&self) {
        if let Self::Isolated(i) = self {
            i.plumbing.close().await;
        }
    }

    /// The network of the run of `uid`; `reused` is a namespace from `reuse` that came
    /// with that uid.
    pub async fn prepare(
        &self,
        uid: u32,
        networked: bool,
        proxy: &Proxy,
        reused: Option<RunNetns>,
    ) -> Result<PreparedNetwork, RunError> {
        if !networked {
            return Ok(PreparedNetwork {
                setup: NetworkSetup::Offline,
                netns: None,
                resolv_conf: None,
                proxy: proxy.clone(),
            });
        }
        match self {
            Self::Off => Err(RunError::NetworkDisabled),
            Self::Unavailable(reason) => Err(RunError::NetworkUnavailable(reason.clone())),
            Self::Host { .. } => Ok(PreparedNetwork {
                setup: NetworkSetup::Host,
                netns: None,
                resolv_conf: None,
                proxy: proxy.clone(),
            }),
            Self::Isolated(i) => {
                let netns = match reused {
                    Some(netns) => netns,
                    None => i
                        .plumbing
                        .create(uid)
                        .await
                        .map_err(|e| RunError::NetworkUnavailable(e.to_string()))?,
                };
                let gateway = netns.lease.address.gateway;
                Ok(PreparedNetwork {
                    setup: NetworkSetup::Own,
                    resolv_conf: Some(resolv::for_run(&i.host_resolv, gateway)),
                    proxy: i.proxy_for(gateway),
                    netns: Some(netns),
                })
            }
        }
    }
}

impl Isolated {
    async fn build(
        config: &Config,
        uids: Range<u32>,
        proxies: &[SocketAddr],
        held: impl Fn(u32) -> bool,
    ) -> Result<Self, String> {
        let n = &config.network;
        overlapping_route(n.subnet).map_or(Ok(()), |route| {
            Err(format!(
                "network_subnet {} overlaps this host's route to {route}: set network_subnet (NETWORK_SUBNET) to a private block no route uses",
                n.subnet
            ))
        })?;
        let upstreams = if n.dns.is_empty() {
            resolv::host_nameservers()
        } else {
            n.dns.clone()
        };
        let relay = DnsRelay::start(&upstreams, config.max_workers)
            .await
            .map_err(|e| e.to_string())?;
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let loopback_proxies: Vec<u16> = proxies
            .iter()
            .filter(|a| ruleset::loopback(a.ip()))
            .map(|a| a.port())
            .collect();
        let routes: Vec<ProxyRoute> = proxies
            .iter()
            .map(|a| {
                if ruleset::loopback(a.ip()) {
                    ProxyRoute::Loopback(a.port())
                } else {
                    ProxyRoute::Direct(*a)
                }
            })
            .collect();
        let name = Table::name_for(ISOLATED_TABLE_PREFIX);
        let tag = server_tag(std::process::id(), |t| {
            std::fs::read_dir("/sys/class/net").is_ok_and(|d| {
                d.flatten().any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{IFNAME_PREFIX}{t}"))
                })
            })
        });
        let forwarding = Forwarding::prepare(&name, || nft::others_alive(ISOLATED_TABLE_PREFIX))
            .map_err(|e| e.to_string())?;
        if forwarding.switched_on {
            tracing::warn!(
                "net.ipv4.ip_forward was 0: switched it on for runs; forwarding between the host's other interfaces stays blocked by table {name} while the server runs"
            );
        }
        let script = ruleset::isolated(&ruleset::Isolated {
            table: &name,
            tag: &tag,
            subnet: n.subnet,
            subnets: &n.sandbox_subnets(),
            uids: uids.clone(),
            relay_port: relay.port(),
            proxies: &routes,
            deny: &n.denied(),
            allow: &n.allow,
            confine_forwarding: forwarding.switched_on,
        });
        let table = Table::install(name, &script).map_err(|e| e.to_string())?;
        // Enough for every worker slot and warm worker to find a namespace kept for it.
        let keep = config.max_workers + config.warm_workers * Language::ALL.len();
        let plumbing =
            Plumbing::new(n.subnet, uids, tag, keep, relay.runs()).map_err(|e| e.to_string())?;
        let stale = plumbing.remove_stale(held).await;
        if stale > 0 {
            tracing::info!(
                interfaces = stale,
                "removed the networks of runs of a server that is gone"
            );
        }
        Ok(Self {
            plumbing,
            relay,
            host_resolv,
            loopback_proxies,
            proxy: config.proxy.clone(),
            forwarding,
            table,
        })
    }

    /// The proxy settings as a run behind `gateway` reaches them: a proxy on the host's
    /// loopback is reached on the run's gateway, translated back by the ruleset.
    fn proxy_for(&self, gateway: std::net::Ipv4Addr) -> Proxy {
        let rewrite = |url: &str| -> String {
            let Ok(mut parsed) = reqwest::Url::parse(url) else {
                return url.to_string();
            };
            let loopback = parsed
                .host_str()
                .and_then(|h| h.trim_matches(['[', ']']).parse::<IpAddr>().ok())
                .is_some_and(ruleset::loopback)
                || parsed.host_str() == Some("localhost");
            let port = parsed.port_or_known_default();
            if loopback && port.is_some_and(|p| self.loopback_proxies.contains(&p)) {
                let _ = parsed.set_host(Some(&gateway.to_string()));
                return parsed.to_string().trim_end_matches('/').to_string();
            }
            url.to_string()
        };
        Proxy {
            socks5: rewrite(&self.proxy.socks5),
            http: rewrite(&self.proxy.http),
            https: rewrite(&self.proxy.https),
        }
    }

    pub fn iptables_exceptions(&self) -> bool {
        self.forwarding.iptables_exceptions()
    }
}

/// The addresses the configured proxies listen on (names resolved now, once).
async fn proxy_addresses(proxy: &Proxy) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for url in [&proxy.http, &proxy.https, &proxy.socks5] {
        let Ok(parsed) = reqwest::Url::parse(url) else {
            continue;
        };
        let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default()) else {
            continue;
        };
        let host = host.trim_matches(['[', ']']);
        match tokio::net::lookup_host((host, port)).await {
            Ok(addrs) => out.extend(addrs),
            Err(e) => {
                tracing::warn!(proxy = %url, error = %e, "cannot resolve a proxy's address; runs may not reach it")
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A route of this host (other than runs' own) that overlaps `subnet`, as `dest via dev`.
fn overlapping_route(subnet: ipnet::Ipv4Net) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(dev), Some(dest), Some(mask)) = (f.first(), f.get(1), f.get(7)) else {
            continue;
        };
        if crate::isolation::net::netns::is_run_interface(dev) {
            continue;
        }
        let parse = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::from_be);
        let (Some(dest), Some(mask)) = (parse(dest), parse(mask)) else {
            continue;
        };
        // The default route overlaps everything and is not a conflict.
        if mask == 0 {
            continue;
        }
        let prefix = mask.count_ones() as u8;
        let Ok(route) = ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(dest), prefix) else {
            continue;
        };
        if route.contains(&subnet.network()) || subnet.contains(&route.network()) {
            return Some(format!("{route} via {dev}"));
        }
    }
    None
}
