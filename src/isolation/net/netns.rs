//! A networked run's network namespace: created by the server before the run's helper
//! starts (so it costs the request nothing), joined to the host by a veth pair whose
//! host end is `sbx<uid>`, with the run's address, a default route through its gateway,
//! a loopback of its own and no IPv6. The helper's child joins it with setns(2). What it
//! holds on the host, and the namespaces kept for reuse after their run: `kept`.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use nix::sched::{CloneFlags, unshare};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::addressing::{IFNAME_PREFIX, RUN_PREFIX_LEN, RunAddress, uid_of_interface};
use super::conntrack;
use super::dns::Runs;
pub use super::kept::NetLease;
use super::kept::{Kept, Lot};
use super::links::{self, remove_link};
use super::traces::TraceFiles;
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
            lot: Arc::new(Lot::new(keep)),
            dns,
        })
    }

    /// A namespace a finished run left untouched, with its uid's lease (see
    /// `Lot::take_untouched`).
    pub fn reuse(&self) -> Option<(UidLease, RunNetns)> {
        let p = self.lot.take_untouched(&self.host)?;
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

    /// How many namespaces wait for reuse.
    pub fn kept(&self) -> usize {
        self.lot.len()
    }

    /// Destroy the namespaces kept for reuse and wait until their veth pairs are gone.
    pub async fn close(&self) {
        self.lot.close(&self.host).await;
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

async fn index_of(handle: &Handle, name: &str) -> Result<u32, NetnsError> {
    links::index_of(handle, name)
        .await
        .ok_or_else(|| NetnsError::Missing(name.to_string()))
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
