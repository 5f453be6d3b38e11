//! What a networked run's network holds on the host (`NetLease`), and the namespaces
//! kept for reuse (`Lot`).
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

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rtnetlink::Handle;

use super::addressing::RunAddress;
use super::conntrack;
use super::dns::Admission;
use super::links::{index_of, remove_link};
use super::traces::Traces;
use crate::isolation::uids::UidLease;

/// What the server holds of a namespace: the last references to it once its run is gone.
pub(super) struct Kept {
    pub(super) ns: OwnedFd,
    /// The netlink socket it was plumbed through: part of the baseline of `traces`.
    pub(super) _inside: Handle,
    pub(super) traces: Traces,
}

/// A run's namespace, veth pair and conntrack entries on the host: `release` keeps the
/// namespace for the next run or removes it all.
pub struct NetLease {
    pub(super) host: Handle,
    pub address: RunAddress,
    pub(super) kept: Kept,
    pub(super) lot: Arc<Lot>,
    /// The DNS relay serves the run until this goes.
    pub(super) dns: Admission,
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
pub(super) struct Lot {
    parked: Mutex<Vec<Parked>>,
    limit: usize,
    /// Namespaces found moved at their handover, being destroyed.
    discarding: tokio_util::task::TaskTracker,
}

pub(super) struct Parked {
    pub(super) uid: UidLease,
    pub(super) address: RunAddress,
    pub(super) kept: Kept,
}

impl Lot {
    /// At most `limit` namespaces are kept.
    pub(super) fn new(limit: usize) -> Self {
        Self {
            parked: Mutex::new(Vec::new()),
            limit,
            discarding: tokio_util::task::TaskTracker::new(),
        }
    }

    /// A parked namespace nothing reached while it waited. Its counters are read again
    /// first: one that something reached (a packet from another server's runs, say) is
    /// destroyed in the background, and the next one is tried.
    pub(super) fn take_untouched(&self, host: &Handle) -> Option<Parked> {
        loop {
            let p = self.parked().pop()?;
            if p.kept.traces.none_left() {
                return Some(p);
            }
            tracing::warn!(
                uid = p.address.uid,
                "a kept network namespace changed while it waited for its next run; destroyed"
            );
            self.discard(host.clone(), p);
        }
    }

    /// Destroy `p` without holding up the caller: the uid goes back once its veth pair
    /// and connections are gone.
    fn discard(&self, host: Handle, p: Parked) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                self.discarding.spawn_on(
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
    pub(super) fn len(&self) -> usize {
        self.parked().len()
    }

    /// Destroy the namespaces kept for reuse and wait until their veth pairs are gone.
    pub(super) async fn close(&self, host: &Handle) {
        self.discarding.close();
        self.discarding.wait().await;
        let parked = std::mem::take(&mut *self.parked());
        // Every namespace's last references go at once (`kept` dropped), then the uids
        // go back once the veth pairs are gone.
        let going: Vec<(UidLease, RunAddress)> =
            parked.into_iter().map(|p| (p.uid, p.address)).collect();
        futures::future::join_all(going.iter().map(|(_, a)| async move {
            if !gone(host, &a.host_if, LINK_GONE_WAIT).await {
                remove_link(host, &a.host_if).await;
            }
        }))
        .await;
    }

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
        if index_of(host, name).await.is_none() {
            return true;
        }
        if tokio::time::Instant::now() + pause > deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}
