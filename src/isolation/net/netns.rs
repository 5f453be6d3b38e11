//! A networked run's network namespace: created by the server before the run's helper
//! starts (so it costs the request nothing), joined to the host by a veth pair whose
//! host end is `sbx<uid>`, with the run's address, a default route through its gateway,
//! a loopback of its own and no IPv6. The helper's child joins it with setns(2).
//!
//! When a run ends, its namespace is kept for the next networked run of the same uid if
//! the run left no trace in it (see `traces`): most runs never touch the network they
//! asked for. Otherwise it is destroyed with its last reference, which takes the veth
//! pair with it; releasing the run waits for that. Its counters are read again when it
//! is handed to the next run: one that moved while it waited is destroyed the same way
//! and the run gets a new one.
//!
//! The DNS relay serves a run while its lease is held: released (kept or destroyed) or
//! dropped, its queries and connections still with the relay are dropped at once and
//! stop counting against the relay; the next run at its address starts at zero.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use nix::sched::{CloneFlags, unshare};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::addressing::{IFNAME_PREFIX, RUN_PREFIX_LEN, RunAddress, uid_of_interface};
use super::conntrack;
use super::dns::{Admission, Runs};
use super::traces::{TraceFiles, Traces};
use crate::isolation::uids::UidLease;

/// The run's end of its veth pair.
const RUN_IFNAME: &str = "eth0";

/// The loopback's index in every network namespace (the kernel's LOOPBACK_IFINDEX).
const LOOPBACK_IFINDEX: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("uid {0} has no address in network_subnet; widen network_subnet")]
    NoAddress(u32),
    #[error("cannot create a network namespace: {0}")]
    Namespace(String),
    #[error("{step} failed: {source}")]
    Netlink {
        step: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{0} is missing after it was created")]
    Missing(String),
    #[error("cannot set {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn netlink(step: &'static str) -> impl FnOnce(rtnetlink::Error) -> NetnsError {
    move |source| NetnsError::Netlink { step, source }
}

/// A prepared namespace, waiting for its run.
pub struct RunNetns {
    /// The namespace, for the run's helper (the lease keeps a reference of its own).
    pub fd: OwnedFd,
    /// What the run's network holds on the host, until released.
    pub lease: NetLease,
}

/// What the server holds of a namespace: the last references to it once its run is gone.
struct Kept {
    ns: OwnedFd,
    /// The netlink socket it was plumbed through: part of the baseline of `traces`.
    _inside: Handle,
    traces: Traces,
}

/// A run's namespace, veth pair and conntrack entries on the host: `release` keeps the
/// namespace for the next run or removes it all.
pub struct NetLease {
    host: Handle,
    pub address: RunAddress,
    kept: Kept,
    lot: Arc<Lot>,
    /// The DNS relay serves the run until this goes.
    dns: Admission,
}

impl NetLease {
    /// Called with the lease of the run's uid. When `run_gone` (every process of the run
    /// was seen gone) and the run left no trace in its namespace, the namespace is kept
    /// with that lease for the next networked run; otherwise it is destroyed, its veth
    /// pair and conntrack entries with it, and the uid is given back.
    pub async fn release(self, uid: Option<UidLease>, run_gone: bool) {
        let Self {
            host,
            address,
            kept,
            lot,
            dns,
        } = self;
        // First: the run is over, whatever it left with the relay has nobody to go to.
        drop(dns);
        let untouched = run_gone && kept.traces.none_left();
        let (uid, address, kept) = match uid {
            Some(uid) if untouched => match lot.park(Parked { uid, address, kept }) {
                None => return,
                // The lot is full.
                Some(p) => (Some(p.uid), p.address, p.kept),
            },
            uid => (uid, address, kept),
        };
        destroy(&host, uid, address, kept, untouched).await;
    }
}

/// Destroy a namespace, its veth pair and its connections (unless `untouched`: nothing
/// was sent in it), then give its uid back.
async fn destroy(
    host: &Handle,
    uid: Option<UidLease>,
    address: RunAddress,
    kept: Kept,
    untouched: bool,
) {
    drop(kept);
    // The namespace dies with its last reference and the kernel then deletes both veth
    // ends, batched with other dying namespaces. Deleting the link ourselves would
    // hold the rtnl lock through an RCU grace period per run, stalling every other
    // run's plumbing: networked throughput fell to a third. So wait for it to go, and
    // delete it only if it does not (something still holds the namespace).
    if !gone(host, &address.host_if, LINK_GONE_WAIT).await {
        remove_link(host, &address.host_if).await;
    }
    // A run that sent no packet has no connection to forget.
    if !untouched {
        let mark = address.ct_mark;
        let flushed = tokio::task::spawn_blocking(move || conntrack::flush_mark(mark)).await;
        if let Ok(Err(e)) = flushed {
            tracing::warn!(error = %e, uid = address.uid, "cannot forget a run's connections");
        }
    }
    // The uid goes back last: nothing of its network is left for its next holder.
    drop(uid);
}

/// Namespaces kept for the next networked run, each with its uid's lease (so no other
/// run, nor another server on this host, gets that uid and its address meanwhile).
struct Lot {
    parked: Mutex<Vec<Parked>>,
    limit: usize,
    /// Namespaces found moved at their handover, being destroyed.
    discarding: tokio_util::task::TaskTracker,
}

struct Parked {
    uid: UidLease,
    address: RunAddress,
    kept: Kept,
}

impl Lot {
    /// The parked namespaces (a panic elsewhere leaves the list itself intact).
    fn parked(&self) -> std::sync::MutexGuard<'_, Vec<Parked>> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keep `p`, or hand it back when the lot is full.
    fn park(&self, p: Parked) -> Option<Parked> {
        let mut parked = self.parked();
        if parked.len() >= self.limit {
            return Some(p);
        }
        parked.push(p);
        None
    }
}

/// How long a released run's host end may take to vanish with its namespace.
const LINK_GONE_WAIT: Duration = Duration::from_secs(2);

/// Whether the link `name` disappears within `wait`.
async fn gone(host: &Handle, name: &str, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    let mut pause = Duration::from_millis(2);
    loop {
        if index_of(host, name).await.is_err() {
            return true;
        }
        if tokio::time::Instant::now() + pause > deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Makes and removes runs' namespaces through the host's rtnetlink.
pub struct Plumbing {
    host: Handle,
    subnet: Ipv4Net,
    uids: Range<u32>,
    /// This server's tag in its runs' interface names.
    tag: String,
    lot: Arc<Lot>,
    /// The DNS relay's runs: each lease is one while it is held.
    dns: Runs,
}

impl Plumbing {
    /// Must run inside a tokio runtime: the host's netlink connection is spawned on it.
    /// At most `keep` namespaces are kept for reuse; `dns` serves each run's DNS.
    pub fn new(
        subnet: Ipv4Net,
        uids: Range<u32>,
        tag: String,
        keep: usize,
        dns: Runs,
    ) -> Result<Self, NetnsError> {
        let (connection, host, _) = rtnetlink::new_connection()
            .map_err(|e| NetnsError::Namespace(format!("netlink socket: {e}")))?;
        tokio::spawn(connection);
        Ok(Self {
            host,
            subnet,
            uids,
            tag,
            lot: Arc::new(Lot {
                parked: Mutex::new(Vec::new()),
                limit: keep,
                discarding: tokio_util::task::TaskTracker::new(),
            }),
            dns,
        })
    }

    /// A namespace a finished run left untouched, with its uid's lease. Its counters
    /// are read again first: one that something reached while it waited (a packet from
    /// another server's runs, say) is destroyed in the background, and the next one is
    /// tried.
    pub fn reuse(&self) -> Option<(UidLease, RunNetns)> {
        let p = loop {
            let p = self.lot.parked().pop()?;
            if p.kept.traces.none_left() {
                break p;
            }
            tracing::warn!(
                uid = p.address.uid,
                "a kept network namespace changed while it waited for its next run; destroyed"
            );
            self.discard(p);
        };
        // On failure `p` is dropped: the namespace goes, and the uid with it.
        let fd = p.kept.ns.try_clone().ok()?;
        Some((
            p.uid,
            RunNetns {
                fd,
                lease: NetLease {
                    host: self.host.clone(),
                    dns: self.dns.admit(p.address.address),
                    address: p.address,
                    kept: p.kept,
                    lot: self.lot.clone(),
                },
            },
        ))
    }

    /// Destroy `p` without holding up the caller: the uid goes back once its veth pair
    /// and connections are gone.
    fn discard(&self, p: Parked) {
        let host = self.host.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                self.lot.discarding.spawn_on(
                    async move { destroy(&host, Some(p.uid), p.address, p.kept, false).await },
                    &runtime,
                );
            }
            // Outside the runtime: the namespace goes with `p`; a veth pair the kernel
            // has not removed yet is removed by the next `create` for this uid.
            Err(_) => drop(p),
        }
    }

    /// How many namespaces wait for reuse.
    pub fn kept(&self) -> usize {
        self.lot.parked().len()
    }

    /// Destroy the namespaces kept for reuse and wait until their veth pairs are gone.
    pub async fn close(&self) {
        self.lot.discarding.close();
        self.lot.discarding.wait().await;
        let parked = std::mem::take(&mut *self.lot.parked());
        // Every namespace's last references go at once (`kept` dropped), then the uids
        // go back once the veth pairs are gone.
        let going: Vec<(UidLease, RunAddress)> =
            parked.into_iter().map(|p| (p.uid, p.address)).collect();
        futures::future::join_all(going.iter().map(|(_, a)| async move {
            if !gone(&self.host, &a.host_if, LINK_GONE_WAIT).await {
                remove_link(&self.host, &a.host_if).await;
            }
        }))
        .await;
    }

    pub fn address_of(&self, uid: u32) -> Result<RunAddress, NetnsError> {
        RunAddress::of(uid, &self.uids, self.subnet, &self.tag).ok_or(NetnsError::NoAddress(uid))
    }

    /// A new namespace for the run of `uid`, plumbed and ready.
    pub async fn create(&self, uid: u32) -> Result<RunNetns, NetnsError> {
        let address = self.address_of(uid)?;
        // A previous run of this uid whose namespace the kernel has not destroyed yet.
        self.remove_link(&address.host_if).await;
        let (fd, inside, files) = new_namespace().await?;
        let made = self.plumb(&fd, &inside, &address).await.and_then(|()| {
            let traces = files
                .baseline()
                .map_err(|e| NetnsError::Namespace(format!("reading its counters: {e}")))?;
            let ns = fd
                .try_clone()
                .map_err(|e| NetnsError::Namespace(format!("dup: {e}")))?;
            Ok((ns, traces))
        });
        match made {
            Ok((ns, traces)) => Ok(RunNetns {
                fd,
                lease: NetLease {
                    host: self.host.clone(),
                    dns: self.dns.admit(address.address),
                    address,
                    kept: Kept {
                        ns,
                        _inside: inside,
                        traces,
                    },
                    lot: self.lot.clone(),
                },
            }),
            Err(e) => {
                drop((fd, inside));
                self.remove_link(&address.host_if).await;
                Err(e)
            }
        }
    }

    async fn plumb(&self, ns: &OwnedFd, inside: &Handle, a: &RunAddress) -> Result<(), NetnsError> {
        // The host end comes up as it is made: one rtnl-locked request fewer. (The run's
        // end cannot: opening it within the same request fails with ENOTCONN.)
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(RUN_IFNAME)
            .setns_by_fd(ns.as_raw_fd())
            .build();
        let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(a.host_if.clone())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .up()
            .build();
        self.host
            .link()
            .add(veth)
            .execute()
            .await
            .map_err(netlink("creating the veth pair"))?;
        let host_end = index_of(&self.host, &a.host_if).await?;
        // route_localnet: the gateway's DNS and loopback proxies are translated to
        // 127.0.0.1, which the kernel otherwise refuses from a non-loopback interface.
        let conf = format!("/proc/sys/net/ipv4/conf/{}/route_localnet", a.host_if);
        sysctl(&conf, "1")?;
        let _ = sysctl(
            &format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", a.host_if),
            "1",
        );
        self.host
            .address()
            .add(host_end, IpAddr::V4(a.gateway), RUN_PREFIX_LEN)
            .execute()
            .await
            .map_err(netlink("addressing the host end"))?;
        let eth = index_of(inside, RUN_IFNAME).await?;
        inside
            .link()
            .set(LinkUnspec::new_with_index(LOOPBACK_IFINDEX).up().build())
            .execute()
            .await
            .map_err(netlink("bringing the run's loopback up"))?;
        inside
            .address()
            .add(eth, IpAddr::V4(a.address), RUN_PREFIX_LEN)
            .execute()
            .await
            .map_err(netlink("addressing the run's end"))?;
        inside
            .link()
            .set(LinkUnspec::new_with_index(eth).up().build())
            .execute()
            .await
            .map_err(netlink("bringing the run's end up"))?;
        inside
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(a.gateway)
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink("adding the run's default route"))?;
        Ok(())
    }

    async fn remove_link(&self, name: &str) {
        remove_link(&self.host, name).await;
    }

    /// Run interfaces on the host (of every server): (name, uid).
    pub async fn run_interfaces(&self) -> Vec<(String, u32)> {
        let mut links = self.host.link().get().execute();
        let mut uids = Vec::new();
        while let Ok(Some(link)) = links.try_next().await {
            let name = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            if let Some(name) = name
                && let Some(uid) = uid_of_interface(&name)
            {
                uids.push((name, uid));
            }
        }
        uids
    }

    /// Remove the interfaces and connections of runs whose uid nobody holds any more (a
    /// server killed before it could clean up). Connections outlive their namespace, so
    /// every such uid's mark is flushed, with an interface left or not.
    pub async fn remove_stale(&self, held: impl Fn(u32) -> bool) -> usize {
        let mut removed = 0;
        for (name, uid) in self.run_interfaces().await {
            if !held(uid) {
                remove_link(&self.host, &name).await;
                removed += 1;
            }
        }
        let marks: Vec<u32> = self
            .uids
            .clone()
            .filter(|uid| !held(*uid))
            .filter_map(|uid| self.address_of(uid).ok())
            .map(|a| a.ct_mark)
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for mark in marks {
                let _ = conntrack::flush_mark(mark);
            }
        })
        .await;
        removed
    }
}

/// Whether `name` is a run's host end.
pub fn is_run_interface(name: &str) -> bool {
    name.starts_with(IFNAME_PREFIX) && uid_of_interface(name).is_some()
}

async fn remove_link(host: &Handle, name: &str) {
    if let Ok(index) = index_of(host, name).await {
        let _ = host.link().del(index).execute().await;
    }
}

async fn index_of(handle: &Handle, name: &str) -> Result<u32, NetnsError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        _ => Err(NetnsError::Missing(name.to_string())),
    }
}

fn sysctl(path: &str, value: &str) -> Result<(), NetnsError> {
    std::fs::write(path, value).map_err(|source| NetnsError::Sysctl {
        path: path.to_string(),
        source,
    })
}

/// A fresh network namespace and a netlink handle inside it. Made on a thread of its own
/// that ends right after: a namespace is a per-thread property, and no thread of the
/// async runtime may be left in it.
async fn new_namespace() -> Result<(OwnedFd, Handle, TraceFiles), NetnsError> {
    let runtime = tokio::runtime::Handle::current();
    let made = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare: {}", e.desc()))?;
            // Runs have IPv4 only: no link-local IPv6 address to reach the host end by.
            for key in ["all", "default"] {
                let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{key}/disable_ipv6"), "1");
            }
            // No multicast groups: the kernel sends a group's reports on timers, after
            // the run that joined it may be gone, and after its namespace was found
            // untouched (see `traces`).
            std::fs::write("/proc/sys/net/ipv4/igmp_max_memberships", "0")
                .map_err(|e| format!("net.ipv4.igmp_max_memberships: {e}"))?;
            let fd: OwnedFd = File::open("/proc/thread-self/ns/net")
                .map_err(|e| format!("/proc/thread-self/ns/net: {e}"))?
                .into();
            let files =
                TraceFiles::open_here().map_err(|e| format!("/proc/thread-self/net: {e}"))?;
            // The socket belongs to the namespace it is created in: this one. It is
            // registered with the server's runtime, which drives it from then on.
            let _runtime = runtime.enter();
            let (connection, handle, _) =
                rtnetlink::new_connection().map_err(|e| format!("netlink socket: {e}"))?;
            Ok::<_, String>((fd, connection, handle, files))
        })
        .join()
        .map_err(|_| "the namespace thread panicked".to_string())?
    })
    .await
    .map_err(|e| NetnsError::Namespace(e.to_string()))?
    .map_err(NetnsError::Namespace)?;
    let (fd, connection, handle, files) = made;
    tokio::spawn(connection);
    Ok((fd, handle, files))
}
