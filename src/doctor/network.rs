//! What networked runs get on this host, tried for real: the network the server would
//! set up (its nftables table, forwarding, DNS relay), and one run's namespace created
//! and removed.

use std::time::Instant;

use crate::config::Config;
use crate::engine::network::RunNetwork;
use crate::isolation::detect::Host;
use crate::isolation::net::resolv;
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
        let uids = UidPool::new(
            &crate::state::StateDir::new(&config.state_dir)
                .uid_leases(host.level != IsolationLevel::Rootless),
            SANDBOX_UIDS,
        )
        .ok();
        let held = |uid| uids.as_ref().is_none_or(|p| p.is_held(uid));
        let network = RunNetwork::build(config, host, SANDBOX_UIDS, held).await;
        let level = network.describe();
        let mut checks = vec![level_check(&network, host, pm)];
        if let RunNetwork::Isolated(isolated) = &network {
            checks.push(forwarding_check(isolated.iptables_exceptions()));
            checks.push(resolver_check(config));
            if let Some(pool) = &uids {
                checks.push(probe_check(&network, pool).await);
            }
        }
        (checks, Some(level))
    })
}

fn level_check(network: &RunNetwork, host: &Host, pm: PackageManager) -> Check {
    const NAME: &str = "network";
    let level = network.describe();
    match network {
        RunNetwork::Off | RunNetwork::Isolated(_) => ok(NAME, level),
        RunNetwork::Host {
            guard: Some(_),
            requested: false,
        } => ok(NAME, level),
        RunNetwork::Host { .. } => check(
            NAME,
            Status::Warning,
            level,
            Some("remove network_isolation: shared to give each run a network of its own".into()),
        ),
        RunNetwork::Unavailable(_) => check(
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

fn forwarding_check(iptables_exceptions: bool) -> Check {
    let value = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    let iptables = if iptables_exceptions {
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
async fn probe_check(network: &RunNetwork, pool: &UidPool) -> Check {
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
    let proxy = crate::config::Proxy::default();
    match network.prepare(lease.uid, true, &proxy, None).await {
        Ok(prepared) => {
            let address = prepared.netns.as_ref().map(|n| n.lease.address.clone());
            if let Some(netns) = prepared.netns {
                drop(netns.fd);
                // Not kept: the check leaves nothing behind.
                netns.lease.release(None, false).await;
            }
            ok(
                NAME,
                format!(
                    "a run's namespace and veth pair created and removed in {:.1} ms{}",
                    started.elapsed().as_secs_f64() * 1000.0,
                    address.map_or_else(String::new, |a| format!(
                        " (run {} via gateway {} on {})",
                        a.address, a.gateway, a.host_if
                    ))
                ),
            )
        }
        Err(e) => check(
            NAME,
            Status::Failed,
            format!("cannot create a run's network: {e}"),
            Some("the server needs CAP_NET_ADMIN and veth support (modprobe veth)".into()),
        ),
    }
}
