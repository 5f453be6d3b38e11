//! What one run holds on the host, with one owner: its uid lease, its network (its own
//! namespace and veth pair), its stage (the output directory handed to its uid, and the
//! private directory of the chroot level) and its cgroup. `RunResources::acquire` takes
//! them in that order, in one place, before the run is planned; a step that fails gives
//! back what the earlier ones took, in reverse order, by `Drop`. Once the run is over
//! (its worker saw every process of it gone), `release` gives everything back in
//! reverse order: the cgroup, the stage, the network, the uid last (the network may keep
//! it, with a namespace kept for the next run). Dropped before that (a request dropped
//! mid-run), the same happens in the background, the cgroup's removal first: it kills
//! what is left of the run and waits until it is empty.
//!
//! The acquiring and giving back go through two small traits, `Acquire` and `Kinds`:
//! the host's (`HostAcquire`, `Host`), or a recording double in the tests.

use std::future::Future;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use super::RunError;
use super::RunFiles;
use super::network::ServerNetwork;
use crate::isolation::cgroup::{CgroupDriver, RunCgroup};
use crate::isolation::net::netns::RunNetns;
use crate::isolation::uids::{UidLease, UidPool};

/// The kinds of what a run holds, and how each is given back.
pub trait Kinds: Sized + 'static {
    type Uid: Send + 'static;
    type Network: Send + 'static;
    type Stage: Send + 'static;
    type Cgroup: Send + 'static;

    fn uid_number(uid: &Self::Uid) -> u32;
    /// Blocking: kills what is left in it, then removes it.
    fn remove_cgroup(cgroup: Self::Cgroup);
    /// Blocking.
    fn remove_stage(stage: Self::Stage);
    /// Gives the network back, and `uid` after it (or keeps both for the next run, when
    /// `keep` and the network allows).
    fn release_network(
        network: Self::Network,
        uid: Option<Self::Uid>,
        keep: bool,
    ) -> impl Future<Output = ()> + Send;
}

/// The steps that acquire a run's resources.
pub trait Acquire {
    type Kinds: Kinds;

    /// A network a finished run left, with its uid (asked for networked runs first).
    fn reuse(&self) -> Option<(UidOf<Self>, NetworkOf<Self>)>;
    fn lease_uid(&self) -> Result<UidOf<Self>, RunError>;
    fn make_network(
        &self,
        uid: u32,
    ) -> impl Future<Output = Result<NetworkOf<Self>, RunError>> + Send;
    /// None when the run has no directory on the host (yet: see `set_private_dir`).
    fn make_stage(&self, uid: u32) -> Result<Option<<Self::Kinds as Kinds>::Stage>, RunError>;
    /// None where the host has no usable cgroup.
    fn make_cgroup(&self) -> Result<Option<<Self::Kinds as Kinds>::Cgroup>, RunError>;
}

type UidOf<A> = <<A as Acquire>::Kinds as Kinds>::Uid;
type NetworkOf<A> = <<A as Acquire>::Kinds as Kinds>::Network;

/// Everything one run holds; see the module's text.
pub struct RunResources<K: Kinds = Host> {
    uid_number: u32,
    uid: Option<K::Uid>,
    network: Option<K::Network>,
    stage: Option<K::Stage>,
    cgroup: Option<K::Cgroup>,
}

impl<K: Kinds> Default for RunResources<K> {
    /// Holding nothing.
    fn default() -> Self {
        Self {
            uid_number: 0,
            uid: None,
            network: None,
            stage: None,
            cgroup: None,
        }
    }
}

impl<K: Kinds> RunResources<K> {
    /// Acquire a run's resources: its uid (with a kept namespace when `own_network` and
    /// one is there), its own network namespace (`own_network`), its stage, its cgroup.
    pub async fn acquire<A>(parts: &A, own_network: bool) -> Result<Self, RunError>
    where
        A: Acquire<Kinds = K> + Sync,
    {
        let (uid, network) = match own_network.then(|| parts.reuse()).flatten() {
            Some((uid, network)) => (uid, Some(network)),
            None => (parts.lease_uid()?, None),
        };
        // From here a failed step drops `held`, which gives back what it holds.
        let mut held = Self {
            uid_number: K::uid_number(&uid),
            uid: Some(uid),
            network,
            stage: None,
            cgroup: None,
        };
        if own_network && held.network.is_none() {
            held.network = Some(parts.make_network(held.uid_number).await?);
        }
        held.stage = parts.make_stage(held.uid_number)?;
        held.cgroup = parts.make_cgroup()?;
        Ok(held)
    }

    /// The run's uid.
    pub fn uid(&self) -> u32 {
        self.uid_number
    }

    /// Once the run is over: give everything back, in reverse order. The network (and
    /// its uid) is kept for the next run when `keep_network` and nothing of the run is
    /// left in it.
    pub async fn release(mut self, keep_network: bool) {
        let (uid, network, stage, cgroup) = self.take();
        if let Some(cgroup) = cgroup {
            let _ = tokio::task::spawn_blocking(move || K::remove_cgroup(cgroup)).await;
        }
        if let Some(stage) = stage {
            let _ = tokio::task::spawn_blocking(move || K::remove_stage(stage)).await;
        }
        match network {
            Some(network) => K::release_network(network, uid, keep_network).await,
            None => drop(uid),
        }
    }

    /// Give everything back without waiting (from a `Drop`), in reverse order, and
    /// `last` after it all (a worker slot: the next run waits until this one's
    /// resources are back). Removing a cgroup or a directory takes a while: not on the
    /// async runtime's threads.
    pub fn release_in_background<L: Send + 'static>(mut self, last: L) {
        let (uid, network, stage, cgroup) = self.take();
        let busy = cgroup.is_some() || stage.is_some();
        let release = move || {
            if let Some(cgroup) = cgroup {
                K::remove_cgroup(cgroup);
            }
            if let Some(stage) = stage {
                K::remove_stage(stage);
            }
            match (network, tokio::runtime::Handle::try_current()) {
                (Some(network), Ok(rt)) => {
                    rt.spawn(async move {
                        K::release_network(network, uid, false).await;
                        drop(last);
                    });
                }
                // No runtime left to wait on: the network goes with its last
                // references, the uid after it.
                (network, _) => {
                    drop(network);
                    drop(uid);
                    drop(last);
                }
            }
        };
        match (busy, tokio::runtime::Handle::try_current()) {
            (true, Ok(rt)) => {
                let _ = std::thread::spawn(move || {
                    let _guard = rt.enter();
                    release();
                });
            }
            _ => release(),
        }
    }

    #[allow(clippy::type_complexity)]
    fn take(
        &mut self,
    ) -> (
        Option<K::Uid>,
        Option<K::Network>,
        Option<K::Stage>,
        Option<K::Cgroup>,
    ) {
        (
            self.uid.take(),
            self.network.take(),
            self.stage.take(),
            self.cgroup.take(),
        )
    }
}

impl<K: Kinds> Drop for RunResources<K> {
    fn drop(&mut self) {
        if self.uid.is_some()
            || self.network.is_some()
            || self.stage.is_some()
            || self.cgroup.is_some()
        {
            std::mem::take(self).release_in_background(());
        }
    }
}

/// What a run holds on this host.
pub struct Host;

/// The run's directories on the host, besides its cgroup.
#[derive(Debug, Default)]
pub struct Stage {
    /// Bound at the run's /tmp/out (`sandbox run`): the caller's, watched, kept.
    out: Option<PathBuf>,
    /// The chroot level's private directory (no private tmpfs to vanish with the run):
    /// made by the helper, watched, removed with the run.
    private: Option<PathBuf>,
}

impl Kinds for Host {
    type Uid = UidLease;
    type Network = RunNetns;
    type Stage = Stage;
    type Cgroup = RunCgroup;

    fn uid_number(uid: &UidLease) -> u32 {
        uid.uid
    }

    fn remove_cgroup(cgroup: RunCgroup) {
        cgroup.remove();
    }

    fn remove_stage(stage: Stage) {
        if let Some(dir) = stage.private {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    async fn release_network(network: RunNetns, uid: Option<UidLease>, keep: bool) {
        let RunNetns { fd, lease } = network;
        // Our copy of the namespace's descriptor would keep it alive.
        drop(fd);
        lease.release(uid, keep).await;
    }
}

/// The host's acquiring steps for one run.
pub struct HostAcquire<'a> {
    pub uids: &'a UidPool,
    pub network: &'a ServerNetwork,
    pub files: &'a RunFiles,
    /// The output directory is handed to the run's uid (root's levels; without root the
    /// run's uid is the caller's own, which already owns it).
    pub chown_out: bool,
    /// The driver, the cgroup's name and its limits (memory in bytes, processes).
    pub cgroup: Option<(&'a CgroupDriver, String, u64, u64)>,
}

impl Acquire for HostAcquire<'_> {
    type Kinds = Host;

    fn reuse(&self) -> Option<(UidLease, RunNetns)> {
        self.network.reuse()
    }

    fn lease_uid(&self) -> Result<UidLease, RunError> {
        Ok(self.uids.acquire()?)
    }

    async fn make_network(&self, uid: u32) -> Result<RunNetns, RunError> {
        self.network
            .create(uid)
            .await
            .map_err(|e| RunError::NetworkUnavailable(e.to_string()))
    }

    fn make_stage(&self, uid: u32) -> Result<Option<Stage>, RunError> {
        let Some(out) = &self.files.out else {
            return Ok(None);
        };
        if self.chown_out {
            std::os::unix::fs::chown(out, Some(uid), Some(uid)).map_err(|source| {
                RunError::OutputDir {
                    path: out.clone(),
                    source,
                }
            })?;
        }
        Ok(Some(Stage {
            out: Some(out.clone()),
            private: None,
        }))
    }

    fn make_cgroup(&self) -> Result<Option<RunCgroup>, RunError> {
        match &self.cgroup {
            Some((driver, name, memory, pids)) => {
                Ok(Some(driver.create_run(name, *memory, *pids)?))
            }
            None => Ok(None),
        }
    }
}

impl RunResources<Host> {
    pub fn cgroup(&self) -> Option<&RunCgroup> {
        self.cgroup.as_ref()
    }

    /// The run's own network namespace, for its helper or fork server.
    pub fn netns(&self) -> Option<BorrowedFd<'_>> {
        self.network.as_ref().map(|n| n.fd.as_fd())
    }

    /// The gateway of the run's own network.
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.network.as_ref().map(|n| n.lease.address.gateway)
    }

    /// The chroot level's private directory, as planned: removed with the run.
    pub fn set_private_dir(&mut self, dir: PathBuf) {
        self.stage.get_or_insert_with(Stage::default).private = Some(dir);
    }

    pub fn private_dir(&self) -> Option<&Path> {
        self.stage.as_ref()?.private.as_deref()
    }

    /// The run's directories on the host's disk, whose size is watched.
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        self.stage
            .iter()
            .flat_map(|s| s.private.iter().chain(&s.out))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    type Log = Arc<Mutex<Vec<String>>>;

    fn push(log: &Log, what: String) {
        log.lock().unwrap_or_else(|e| e.into_inner()).push(what);
    }

    fn read(log: &Log) -> Vec<String> {
        log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A resource of the double: its release is recorded when it is dropped.
    struct Rec {
        name: &'static str,
        log: Log,
    }

    impl Drop for Rec {
        fn drop(&mut self) {
            push(&self.log, format!("release {}", self.name));
        }
    }

    /// The network of the double, and whether it was kept.
    struct Net(Rec);

    struct Double;

    impl Kinds for Double {
        type Uid = Rec;
        type Network = Net;
        type Stage = Rec;
        type Cgroup = Rec;

        fn uid_number(_: &Rec) -> u32 {
            10_007
        }

        fn remove_cgroup(cgroup: Rec) {
            drop(cgroup);
        }

        fn remove_stage(stage: Rec) {
            drop(stage);
        }

        async fn release_network(network: Net, uid: Option<Rec>, keep: bool) {
            // The real lease waits for the veth pair to go: so does the double.
            tokio::task::yield_now().await;
            if keep {
                push(&network.0.log, "keep network".into());
                std::mem::forget((network, uid));
                return;
            }
            drop(network);
            drop(uid);
        }
    }

    /// Acquiring steps that record what they take and fail at the step named `fail`.
    struct Steps {
        log: Log,
        fail: Option<&'static str>,
        /// A kept network is there to be reused.
        kept: bool,
        cgroup: bool,
    }

    impl Steps {
        fn step(&self, name: &'static str) -> Result<Rec, RunError> {
            if self.fail == Some(name) {
                push(&self.log, format!("fail {name}"));
                return Err(RunError::Spawn(std::io::Error::other(name)));
            }
            push(&self.log, format!("acquire {name}"));
            Ok(Rec {
                name,
                log: self.log.clone(),
            })
        }
    }

    impl Acquire for Steps {
        type Kinds = Double;

        fn reuse(&self) -> Option<(Rec, Net)> {
            let rec = |name| Rec {
                name,
                log: self.log.clone(),
            };
            self.kept.then(|| {
                push(&self.log, "reuse uid and network".into());
                (rec("uid"), Net(rec("network")))
            })
        }

        fn lease_uid(&self) -> Result<Rec, RunError> {
            self.step("uid")
        }

        async fn make_network(&self, _: u32) -> Result<Net, RunError> {
            tokio::task::yield_now().await;
            self.step("network").map(Net)
        }

        fn make_stage(&self, _: u32) -> Result<Option<Rec>, RunError> {
            self.step("stage").map(Some)
        }

        fn make_cgroup(&self) -> Result<Option<Rec>, RunError> {
            if !self.cgroup {
                return Ok(None);
            }
            self.step("cgroup").map(Some)
        }
    }

    fn steps(fail: Option<&'static str>) -> Steps {
        Steps {
            log: Log::default(),
            fail,
            kept: false,
            cgroup: true,
        }
    }

    /// The log once `n` entries are in: a release in the background takes a thread and
    /// a task.
    async fn settled(log: &Log, n: usize) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while read(log).len() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Anything more would be a release too many.
        tokio::time::sleep(Duration::from_millis(20)).await;
        read(log)
    }

    #[tokio::test]
    async fn a_failed_step_gives_back_exactly_the_earlier_ones_in_reverse_order() {
        let order = ["uid", "network", "stage", "cgroup"];
        for (i, failing) in order.iter().enumerate() {
            let s = steps(Some(failing));
            let got = RunResources::acquire(&s, true).await;
            assert!(got.is_err(), "{failing} failed, yet acquired");
            drop(got);
            let mut want: Vec<String> = order[..i].iter().map(|n| format!("acquire {n}")).collect();
            want.push(format!("fail {failing}"));
            want.extend(order[..i].iter().rev().map(|n| format!("release {n}")));
            assert_eq!(
                settled(&s.log, want.len()).await,
                want,
                "failing at {failing}"
            );
        }
    }

    #[tokio::test]
    async fn an_offline_run_takes_no_network_and_a_host_without_cgroups_no_cgroup() {
        let s = Steps {
            cgroup: false,
            fail: Some("stage"),
            ..steps(None)
        };
        assert!(RunResources::acquire(&s, false).await.is_err());
        let want = ["acquire uid", "fail stage", "release uid"];
        assert_eq!(settled(&s.log, want.len()).await, want);
    }

    #[tokio::test]
    async fn a_reused_network_comes_with_its_uid_and_goes_back_with_it() {
        let s = Steps {
            kept: true,
            ..steps(Some("cgroup"))
        };
        assert!(RunResources::acquire(&s, true).await.is_err());
        let want = [
            "reuse uid and network",
            "acquire stage",
            "fail cgroup",
            "release stage",
            "release network",
            "release uid",
        ];
        assert_eq!(settled(&s.log, want.len()).await, want);
    }

    #[tokio::test]
    async fn release_gives_everything_back_in_reverse_order() {
        let s = steps(None);
        let held = RunResources::acquire(&s, true).await.expect("acquired");
        assert_eq!(held.uid(), 10_007);
        held.release(false).await;
        let log = read(&s.log);
        assert_eq!(
            log[4..],
            [
                "release cgroup",
                "release stage",
                "release network",
                "release uid"
            ],
            "{log:?}"
        );
    }

    #[tokio::test]
    async fn a_kept_network_keeps_its_uid() {
        let s = steps(None);
        let held = RunResources::acquire(&s, true).await.expect("acquired");
        held.release(true).await;
        let log = read(&s.log);
        assert_eq!(
            log[4..],
            ["release cgroup", "release stage", "keep network"],
            "{log:?}"
        );
    }

    #[tokio::test]
    async fn dropped_mid_run_the_slot_goes_back_after_everything_else() {
        let s = steps(None);
        let held = RunResources::acquire(&s, true).await.expect("acquired");
        let slot = Rec {
            name: "slot",
            log: s.log.clone(),
        };
        held.release_in_background(slot);
        let log = settled(&s.log, 9).await;
        assert_eq!(
            log[4..],
            [
                "release cgroup",
                "release stage",
                "release network",
                "release uid",
                "release slot"
            ],
            "{log:?}"
        );
    }
}
