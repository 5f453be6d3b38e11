//! What networked runs get on this host, read from the same policy the server follows
//! (`engine::network::NetworkPolicy`) with nothing installed: what it needs is checked in
//! place (the subnet against the routes, the table's rules by the kernel with
//! `nft --check`), forwarding and the resolvers are read, and one run's namespace is
//! created and removed.

use std::time::Instant;

use crate::config::Config;
use crate::engine::network::{self, NetworkPolicy};
use crate::isolation::detect::Host;
use crate::isolation::net::{forwarding, resolv};
use crate::isolation::spec::IsolationLevel;
use crate::isolation::uids::{SANDBOX_UIDS, UidPool};

use super::packages::{Need, PackageManager};
use super::{Check, Status, check, ok};

/// The checks, and the network level in words.
pub(super) fn network_checks(
    config: &Config,
    host: Option<&Host>,
    pm: PackageManager,
) -> (Vec<Check>, Option<String>) {
    let Some(host) = host else {
        return (Vec::new(), None);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let c = check(
                "network",
                Status::Failed,
                format!("cannot start an async runtime to try it: {e}"),
                None,
            );
            return (vec![c], None);
        }
    };
    runtime.block_on(async {
        let policy = network::dry_run(config, host, SANDBOX_UIDS).await;
        let level = policy.describe();
        let mut checks = vec![level_check(&policy, host, pm)];
        if policy == NetworkPolicy::Isolated {
            checks.push(forwarding_check(forwarding::iptables_drops_forwarded()));
            checks.push(resolver_check(config));
            let uids = UidPool::new(
                &crate::state::StateDir::new(&config.state_dir)
                    .uid_leases(host.level != IsolationLevel::Rootless),
                SANDBOX_UIDS,
            );
            if let Ok(pool) = &uids {
                checks.push(probe_check(config, pool).await);
            }
        }
        (checks, Some(level))
    })
}

fn level_check(policy: &NetworkPolicy, host: &Host, pm: PackageManager) -> Check {
    const NAME: &str = "network";
    let level = policy.describe();
    match policy {
        NetworkPolicy::Off | NetworkPolicy::Isolated => ok(NAME, level),
        NetworkPolicy::Shared {
            guarded: true,
            requested: false,
        } => ok(NAME, level),
        NetworkPolicy::Shared { .. } => check(
            NAME,
            Status::Warning,
            level,
            Some("remove network_isolation: shared to give each run a network of its own".into()),
        ),
        NetworkPolicy::Refused(_) => check(
            NAME,
            // Without root this is a developer's or a CI job's machine: offline runs work.
            if host.level == IsolationLevel::Rootless {
                Status::Warning
            } else {
                Status::Failed
            },
            level,
            Some(format!(
                "{} (nftables), then see the reason above",
                pm.install(Need::Nftables)
            )),
        ),
    }
}

fn forwarding_check(iptables_drops: bool) -> Check {
    let value = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    let iptables = if iptables_drops {
        "; iptables drops forwarded packets (FORWARD policy DROP, as Docker sets it): the server adds two exceptions for sbx+ interfaces while it runs"
    } else {
        ""
    };
    match value.trim() {
        "1" => ok("ip_forward", format!("net.ipv4.ip_forward is 1{iptables}")),
        other => check(
            "ip_forward",
            Status::Warning,
            format!(
                "net.ipv4.ip_forward is {other:?}: the server switches it on while it serves, and keeps forwarding between the host's other interfaces blocked{iptables}"
            ),
            Some("sysctl -w net.ipv4.ip_forward=1 and persist it in /etc/sysctl.d, if this host may route".into()),
        ),
    }
}

fn resolver_check(config: &Config) -> Check {
    let host = resolv::host_nameservers();
    let upstreams = if config.network.dns.is_empty() {
        host.clone()
    } else {
        config.network.dns.clone()
    };
    let list = |v: &[std::net::IpAddr]| {
        v.iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let stub = upstreams.iter().any(|a| a.is_loopback());
    let how = if stub {
        "a loopback stub runs could not reach themselves"
    } else {
        "reachable by the server"
    };
    if upstreams.is_empty() {
        return check(
            "resolver",
            Status::Failed,
            "no resolver: /etc/resolv.conf names none and network_dns is empty",
            Some("set network_dns (NETWORK_DNS) to your resolvers".into()),
        );
    }
    ok(
        "resolver",
        format!(
            "runs ask their gateway; the server relays to {} ({how})",
            list(&upstreams)
        ),
    )
}

/// One run's network, created and removed as the server does it.
async fn probe_check(config: &Config, pool: &UidPool) -> Check {
    const NAME: &str = "veth";
    let lease = match pool.acquire() {
        Ok(l) => l,
        Err(e) => {
            return check(
                NAME,
                Status::Warning,
                format!("no free uid to try with: {e}"),
                None,
            );
        }
    };
    let started = Instant::now();
    match network::try_namespace(config, pool.range(), lease.uid).await {
        Ok(a) => ok(
            NAME,
            format!(
                "a run's namespace and veth pair created and removed in {:.1} ms (run {} via gateway {} on {})",
                started.elapsed().as_secs_f64() * 1000.0,
                a.address,
                a.gateway,
                a.host_if
            ),
        ),
        Err(e) => check(
            NAME,
            Status::Failed,
            format!("cannot create a run's network: {e}"),
            Some("the server needs CAP_NET_ADMIN and veth support (modprobe veth)".into()),
        ),
    }
}
