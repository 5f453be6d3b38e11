//! What the server installs for runs' networks, server-wide and alive as long as it:
//! for runs' own namespaces an nftables table, forwarding and the DNS relay, and the
//! namespaces kept for reuse; for runs in the host's network, the uid guard. What is
//! installed follows the `NetworkPolicy`; what cannot be installed narrows it. Each
//! networked run's namespace is made here (`create`), as part of its resources.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use super::NetworkPolicy;
use crate::config::{Config, Proxy};
use crate::isolation::detect::Host;
use crate::isolation::net::addressing::{IFNAME_PREFIX, server_tag};
use crate::isolation::net::dns::{DnsRelay, Runs};
use crate::isolation::net::forwarding::{self, Forwarding};
use crate::isolation::net::guard::{self, GuardRules, NetGuard};
use crate::isolation::net::netns::{NetnsError, Plumbing, RunNetns};
use crate::isolation::net::nft::{self, Table};
use crate::isolation::net::resolv;
use crate::isolation::net::ruleset::{self, ProxyRoute};
use crate::isolation::spec::IsolationLevel;
use crate::isolation::uids::UidLease;
use crate::runtime::Language;

pub const ISOLATED_TABLE_PREFIX: &str = "sandbox_net_";

/// Runs' networks on this server: the policy in force, and what was installed for it.
pub struct ServerNetwork {
    policy: NetworkPolicy,
    installed: Installed,
}

enum Installed {
    Nothing,
    /// For runs' own namespaces.
    Isolated(Box<Isolated>),
    /// For runs in the host's network.
    Guard(NetGuard),
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
    /// Put back as it was when the server stops.
    _forwarding: Forwarding,
    table: Table,
}

impl ServerNetwork {
    /// Decide, then install what the decision needs. `held` tells whether a sandbox uid
    /// is leased by a live server (interfaces of uids nobody holds are leftovers of a
    /// server that died).
    pub async fn build(
        config: &Config,
        host: &Host,
        uids: Range<u32>,
        held: impl Fn(u32) -> bool,
    ) -> Self {
        let policy =
            NetworkPolicy::decide(config.enable_network, config.network.isolation, host.level);
        if policy == NetworkPolicy::Off {
            return Self {
                policy,
                installed: Installed::Nothing,
            };
        }
        if host.level != IsolationLevel::Rootless {
            remove_stale();
        }
        let proxies = proxy_addresses(config).await;
        match policy {
            NetworkPolicy::Isolated => match Isolated::build(config, uids, &proxies, held).await {
                Ok(isolated) => Self {
                    policy,
                    installed: Installed::Isolated(Box::new(isolated)),
                },
                Err(reason) => Self {
                    policy: policy.isolation_failed(&reason.to_string()),
                    installed: Installed::Nothing,
                },
            },
            NetworkPolicy::Shared { guarded: true, .. } => {
                match with_guard_rules(config, uids, &proxies, NetGuard::install) {
                    Ok(guard) => Self {
                        policy,
                        installed: Installed::Guard(guard),
                    },
                    Err(e) => {
                        tracing::error!(error = %e, "cannot install the network guard");
                        Self {
                            policy: policy.guard_failed(),
                            installed: Installed::Nothing,
                        }
                    }
                }
            }
            policy => Self {
                policy,
                installed: Installed::Nothing,
            },
        }
    }

    /// The policy in force: what every run's network is decided by.
    pub fn policy(&self) -> &NetworkPolicy {
        &self.policy
    }

    /// The level in words, with the names of what was installed, for logs.
    pub fn describe(&self) -> String {
        let level = self.policy.describe();
        match &self.installed {
            Installed::Nothing => level,
            Installed::Isolated(i) => format!(
                "{level}, table {}, DNS relayed to {}",
                i.table.name(),
                i.relay
                    .upstreams()
                    .iter()
                    .map(|u| u.ip().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Installed::Guard(g) => {
                format!("{level}, sandbox uids filtered by table {}", g.table())
            }
        }
    }

    /// A namespace a finished run left untouched, with its uid's lease: the next
    /// networked run takes it instead of a new one (see `isolation::net::traces`).
    pub fn reuse(&self) -> Option<(UidLease, RunNetns)> {
        match &self.installed {
            Installed::Isolated(i) => i.plumbing.reuse(),
            _ => None,
        }
    }

    /// A new namespace for the run of `uid`.
    pub async fn create(&self, uid: u32) -> Result<RunNetns, NetnsError> {
        match &self.installed {
            Installed::Isolated(i) => i.plumbing.create(uid).await,
            _ => Err(NetnsError::Namespace(
                "this server gives runs no network of their own".into(),
            )),
        }
    }

    /// A run's /etc/resolv.conf and proxies, as the run behind `gateway` (its own
    /// namespace's, if any) reaches them.
    pub fn for_run(
        &self,
        gateway: Option<std::net::Ipv4Addr>,
        proxy: &Proxy,
    ) -> (Option<String>, Proxy) {
        match (&self.installed, gateway) {
            (Installed::Isolated(i), Some(gateway)) => (
                Some(resolv::for_run(&i.host_resolv, gateway)),
                i.proxy_for(gateway),
            ),
            _ => (None, proxy.clone()),
        }
    }

    /// How many namespaces are kept for reuse.
    pub fn kept(&self) -> usize {
        match &self.installed {
            Installed::Isolated(i) => i.plumbing.kept(),
            _ => 0,
        }
    }

    /// At shutdown: destroy the namespaces kept for reuse.
    pub async fn close(&self) {
        if let Installed::Isolated(i) = &self.installed {
            i.plumbing.close().await;
        }
    }
}

/// Remove what servers that are gone left installed: their tables and iptables
/// exceptions.
fn remove_stale() {
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

/// The guard's rules for this configuration, given to `f`.
fn with_guard_rules<T>(
    config: &Config,
    uids: Range<u32>,
    proxies: &[SocketAddr],
    f: impl FnOnce(&GuardRules<'_>) -> T,
) -> T {
    let resolvers = resolv::host_nameservers();
    let (subnets, deny) = (config.network.sandbox_subnets(), config.network.denied());
    f(&GuardRules {
        uids,
        resolvers: &resolvers,
        proxies,
        subnets: &subnets,
        deny: &deny,
        allow: &config.network.allow,
    })
}

/// The policy `ServerNetwork::build` would arrive at on this host, found without
/// installing anything: the decision, then what it needs checked in place (the subnet
/// against the host's routes, the table's rules by the kernel with `nft --check`, which
/// commits nothing). For `sandbox doctor`.
pub async fn dry_run(config: &Config, host: &Host, uids: Range<u32>) -> NetworkPolicy {
    let policy = NetworkPolicy::decide(config.enable_network, config.network.isolation, host.level);
    match policy {
        NetworkPolicy::Isolated => {
            let proxies = proxy_addresses(config).await;
            let checked = subnet_free(config).and_then(|()| {
                let name = Table::name_for(ISOLATED_TABLE_PREFIX);
                // The relay's port is the kernel's choice at start; any port checks the same.
                let rules = IsolatedRules::new(config, uids, &proxies, &name, 53);
                let forwarding_off = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                    .is_ok_and(|v| v.trim() == "0");
                Table::check(&rules.script(forwarding_off)).map_err(IsolationError::from)
            });
            match checked {
                Ok(()) => policy,
                Err(reason) => policy.isolation_failed(&reason.to_string()),
            }
        }
        NetworkPolicy::Shared { guarded: true, .. } => {
            let proxies = proxy_addresses(config).await;
            match with_guard_rules(config, uids, &proxies, NetGuard::check) {
                Ok(()) => policy,
                Err(e) => {
                    tracing::debug!(error = %e, "the network guard would not install");
                    policy.guard_failed()
                }
            }
        }
        policy => policy,
    }
}

/// Why runs cannot have networks of their own on this host.
#[derive(Debug, thiserror::Error)]
enum IsolationError {
    #[error(
        "network_subnet {subnet} overlaps this host's route to {route}: set network_subnet (NETWORK_SUBNET) to a private block no route uses"
    )]
    SubnetTaken {
        subnet: ipnet::Ipv4Net,
        route: String,
    },
    #[error(transparent)]
    Dns(#[from] crate::isolation::net::dns::DnsError),
    #[error(transparent)]
    Forwarding(#[from] forwarding::ForwardingError),
    #[error(transparent)]
    Table(#[from] nft::NftError),
    #[error(transparent)]
    Namespaces(#[from] NetnsError),
}

/// The run subnet is free: no route of this host overlaps it.
fn subnet_free(config: &Config) -> Result<(), IsolationError> {
    let subnet = config.network.subnet;
    overlapping_route(subnet).map_or(Ok(()), |route| {
        Err(IsolationError::SubnetTaken { subnet, route })
    })
}

/// This server's tag in its runs' interface names: one no interface uses yet.
fn tag() -> String {
    server_tag(std::process::id(), |t| {
        std::fs::read_dir("/sys/class/net").is_ok_and(|d| {
            d.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{IFNAME_PREFIX}{t}"))
            })
        })
    })
}

/// One run's namespace for `uid`, created and removed as a server does it, with
/// nothing else installed: what `sandbox doctor` tries. Its address, or why not.
pub async fn try_namespace(
    config: &Config,
    uids: Range<u32>,
    uid: u32,
) -> Result<crate::isolation::net::addressing::RunAddress, NetnsError> {
    let plumbing = Plumbing::new(config.network.subnet, uids, tag(), 0, Runs::new(1))?;
    let netns = plumbing.create(uid).await?;
    let address = netns.lease.address.clone();
    drop(netns.fd);
    // Not kept: the try leaves nothing behind.
    netns.lease.release(None, false).await;
    Ok(address)
}

/// The rules of the isolated network's table, apart from what only the start knows.
struct IsolatedRules<'a> {
    config: &'a Config,
    uids: Range<u32>,
    routes: Vec<ProxyRoute>,
    name: &'a str,
    tag: String,
    relay_port: u16,
}

impl<'a> IsolatedRules<'a> {
    fn new(
        config: &'a Config,
        uids: Range<u32>,
        proxies: &[SocketAddr],
        name: &'a str,
        relay_port: u16,
    ) -> Self {
        let routes = proxies
            .iter()
            .map(|a| {
                if ruleset::loopback(a.ip()) {
                    ProxyRoute::Loopback(a.port())
                } else {
                    ProxyRoute::Direct(*a)
                }
            })
            .collect();
        Self {
            config,
            uids,
            routes,
            name,
            tag: tag(),
            relay_port,
        }
    }

    /// The table's script; `confine_forwarding` when the server switched forwarding on.
    fn script(&self, confine_forwarding: bool) -> String {
        let n = &self.config.network;
        ruleset::isolated(&ruleset::Isolated {
            table: self.name,
            tag: &self.tag,
            subnet: n.subnet,
            subnets: &n.sandbox_subnets(),
            uids: self.uids.clone(),
            relay_port: self.relay_port,
            proxies: &self.routes,
            deny: &n.denied(),
            allow: &n.allow,
            confine_forwarding,
        })
    }
}

impl Isolated {
    async fn build(
        config: &Config,
        uids: Range<u32>,
        proxies: &[SocketAddr],
        held: impl Fn(u32) -> bool,
    ) -> Result<Self, IsolationError> {
        let n = &config.network;
        subnet_free(config)?;
        let upstreams = if n.dns.is_empty() {
            resolv::host_nameservers()
        } else {
            n.dns.clone()
        };
        let relay = DnsRelay::start(&upstreams, config.max_workers).await?;
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let loopback_proxies: Vec<u16> = proxies
            .iter()
            .filter(|a| ruleset::loopback(a.ip()))
            .map(|a| a.port())
            .collect();
        let name = Table::name_for(ISOLATED_TABLE_PREFIX);
        let rules = IsolatedRules::new(config, uids.clone(), proxies, &name, relay.port());
        let forwarding = Forwarding::prepare(&name, || nft::others_alive(ISOLATED_TABLE_PREFIX))?;
        if forwarding.switched_on {
            tracing::warn!(
                "net.ipv4.ip_forward was 0: switched it on for runs; forwarding between the host's other interfaces stays blocked by table {name} while the server runs"
            );
        }
        let script = rules.script(forwarding.switched_on);
        let tag = rules.tag;
        let table = Table::install(name, &script)?;
        // Enough for every worker slot and warm worker to find a namespace kept for it.
        let keep = config.max_workers + config.warm_workers * Language::ALL.len();
        let plumbing = Plumbing::new(n.subnet, uids, tag, keep, relay.runs())?;
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
            _forwarding: forwarding,
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
}

/// The addresses the configured proxies listen on (names resolved now, once).
/// The package mirrors are reached the same way: the installers' jails use the run
/// network, and a mirror on a private network must stay reachable to them.
async fn proxy_addresses(config: &Config) -> Vec<SocketAddr> {
    let proxy = &config.proxy;
    let mut out = Vec::new();
    for url in [
        &proxy.http,
        &proxy.https,
        &proxy.socks5,
        &config.python_pip_mirror_url,
        &config.nodejs_npm_mirror_url,
    ] {
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
