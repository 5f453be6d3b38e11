//! Warm, single-use workers per key (language and network setting): a run takes one,
//! and the pool is topped up in the background. A worker is never given back.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::runtime::Language;

/// Which warm workers a run can use: they differ in namespaces and seccomp rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub language: Language,
    pub network: bool,
}

/// What the warm pool needs to know about an idle worker.
pub trait Idle {
    /// Whether its process has exited while it waited.
    fn is_dead(&mut self) -> bool;
}

pub struct WarmPool<W> {
    target: usize,
    state: Mutex<WarmState<W>>,
    taken: Notify,
    added: Notify,
}

struct WarmState<W> {
    idle: HashMap<PoolKey, VecDeque<W>>,
    pending: HashMap<PoolKey, usize>,
}

impl<W: Idle> WarmPool<W> {
    pub fn new(target: usize) -> Self {
        Self {
            target,
            state: Mutex::new(WarmState {
                idle: HashMap::new(),
                pending: HashMap::new(),
            }),
            taken: Notify::new(),
            added: Notify::new(),
        }
    }

    pub fn target(&self) -> usize {
        self.target
    }

    fn lock(&self) -> MutexGuard<'_, WarmState<W>> {
        // A panic while holding the lock leaves plain collections behind: still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep workers ready for `key` from now on.
    pub fn want(&self, key: PoolKey) {
        if self.target > 0 {
            self.lock().idle.entry(key).or_default();
        }
    }

    /// A ready worker for `key`, if any. Asking for a new key starts keeping it warm.
    pub fn take(&self, key: PoolKey) -> Option<W> {
        if self.target == 0 {
            return None;
        }
        let mut state = self.lock();
        let queue = state.idle.entry(key).or_default();
        let mut found = None;
        let mut dead = Vec::new();
        while let Some(mut w) = queue.pop_front() {
            if w.is_dead() {
                dead.push(w);
            } else {
                found = Some(w);
                break;
            }
        }
        // Dead ones go back to be found and cleaned up by the tender.
        queue.extend(dead);
        drop(state);
        self.taken.notify_one();
        found
    }

    /// Workers to start now: per key, the target less what is idle or starting. The
    /// returned starts are counted as pending until `put` or `spawn_failed`.
    pub fn missing(&self) -> Vec<PoolKey> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut out = Vec::new();
        for (key, queue) in &state.idle {
            let pending = state.pending.entry(*key).or_default();
            let have = queue.len() + *pending;
            let lacking = self.target.saturating_sub(have);
            out.extend(std::iter::repeat_n(*key, lacking));
            *pending += lacking;
        }
        out
    }

    pub fn put(&self, key: PoolKey, worker: W) {
        let mut state = self.lock();
        if let Some(p) = state.pending.get_mut(&key) {
            *p = p.saturating_sub(1);
        }
        state.idle.entry(key).or_default().push_back(worker);
        drop(state);
        self.added.notify_waiters();
    }

    /// Like `take`, but when none is ready and one is being started, wait for it: it is
    /// further along than a worker started now would be.
    pub async fn take_or_wait(&self, key: PoolKey) -> Option<W> {
        loop {
            let added = self.added.notified();
            if let Some(w) = self.take(key) {
                return Some(w);
            }
            if self.lock().pending.get(&key).copied().unwrap_or(0) == 0 {
                return None;
            }
            added.await;
        }
    }

    pub fn spawn_failed(&self, key: PoolKey) {
        if let Some(p) = self.lock().pending.get_mut(&key) {
            *p = p.saturating_sub(1);
        }
        self.added.notify_waiters();
    }

    /// Idle workers whose process has died.
    pub fn remove_dead(&self) -> Vec<W> {
        let mut state = self.lock();
        let mut dead = Vec::new();
        for queue in state.idle.values_mut() {
            let mut keep = VecDeque::new();
            while let Some(mut w) = queue.pop_front() {
                if w.is_dead() {
                    dead.push(w)
                } else {
                    keep.push_back(w)
                }
            }
            *queue = keep;
        }
        dead
    }

    /// The idle workers `pick` chooses, taken out.
    pub fn drain_where(&self, pick: impl Fn(&PoolKey, &W) -> bool) -> Vec<W> {
        let mut state = self.lock();
        let mut out = Vec::new();
        for (key, queue) in state.idle.iter_mut() {
            let (taken, kept): (VecDeque<W>, VecDeque<W>) =
                queue.drain(..).partition(|w| pick(key, w));
            out.extend(taken);
            *queue = kept;
        }
        drop(state);
        self.taken.notify_one();
        out
    }

    /// Every idle worker, taken out (at shutdown).
    pub fn drain(&self) -> Vec<W> {
        let mut state = self.lock();
        state.idle.values_mut().flat_map(|q| q.drain(..)).collect()
    }

    /// How many workers are ready, per key.
    pub fn ready(&self) -> Vec<(PoolKey, usize)> {
        self.lock()
            .idle
            .iter()
            .map(|(k, q)| (*k, q.len()))
            .collect()
    }

    pub async fn wait_for_take(&self) {
        self.taken.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    /// A worker whose death the test decides.
    struct Fake {
        id: u32,
        dead: Arc<AtomicBool>,
    }

    impl Fake {
        fn new(id: u32) -> (Self, Arc<AtomicBool>) {
            let dead = Arc::new(AtomicBool::new(false));
            (
                Self {
                    id,
                    dead: dead.clone(),
                },
                dead,
            )
        }
    }

    impl Idle for Fake {
        fn is_dead(&mut self) -> bool {
            self.dead.load(Ordering::SeqCst)
        }
    }

    const PY: PoolKey = PoolKey {
        language: Language::Python3,
        network: true,
    };
    const NODE: PoolKey = PoolKey {
        language: Language::Nodejs,
        network: false,
    };

    #[test]
    fn missing_counts_what_is_idle_or_starting_per_key() {
        let pool = WarmPool::<Fake>::new(2);
        assert!(pool.missing().is_empty(), "no key wanted yet");
        pool.want(PY);
        assert_eq!(pool.missing(), vec![PY, PY]);
        // Both starts are pending now: nothing more to start.
        assert!(pool.missing().is_empty());
        pool.put(PY, Fake::new(1).0);
        pool.spawn_failed(PY);
        assert_eq!(pool.missing(), vec![PY], "one idle, the failed one retried");
    }

    #[test]
    fn take_skips_dead_workers_and_leaves_them_for_the_tender() {
        let pool = WarmPool::new(2);
        pool.want(PY);
        let (a, a_dead) = Fake::new(1);
        let (b, _) = Fake::new(2);
        pool.put(PY, a);
        pool.put(PY, b);
        a_dead.store(true, Ordering::SeqCst);
        assert_eq!(pool.take(PY).map(|w| w.id), Some(2));
        assert_eq!(pool.ready(), vec![(PY, 1)], "the dead one is still queued");
        let dead = pool.remove_dead();
        assert_eq!(dead.iter().map(|w| w.id).collect::<Vec<_>>(), vec![1]);
        assert!(pool.take(PY).is_none());
    }

    #[test]
    fn keys_are_kept_apart_and_a_new_key_is_wanted_on_first_take() {
        let pool = WarmPool::new(1);
        pool.want(PY);
        pool.put(PY, Fake::new(1).0);
        assert!(pool.take(NODE).is_none());
        assert_eq!(
            pool.missing(),
            vec![NODE],
            "asked for once, kept warm since"
        );
        assert_eq!(pool.take(PY).map(|w| w.id), Some(1));
    }

    #[test]
    fn a_pool_of_zero_keeps_nothing() {
        let pool = WarmPool::<Fake>::new(0);
        pool.want(PY);
        assert!(pool.take(PY).is_none());
        assert!(pool.missing().is_empty());
    }

    #[test]
    fn drain_where_takes_only_the_chosen_workers() {
        let pool = WarmPool::new(3);
        pool.want(PY);
        for id in 1..=3 {
            pool.put(PY, Fake::new(id).0);
        }
        let taken = pool.drain_where(|_, w| w.id % 2 == 1);
        assert_eq!(taken.iter().map(|w| w.id).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(pool.take(PY).map(|w| w.id), Some(2));
    }

    #[test]
    fn drain_empties_every_key() {
        let pool = WarmPool::new(2);
        pool.want(PY);
        pool.want(NODE);
        pool.put(PY, Fake::new(1).0);
        pool.put(NODE, Fake::new(2).0);
        assert_eq!(pool.drain().len(), 2);
        assert!(pool.ready().iter().all(|(_, n)| *n == 0));
    }

    #[tokio::test]
    async fn take_or_wait_waits_for_a_worker_being_started() {
        let pool = Arc::new(WarmPool::new(1));
        pool.want(PY);
        assert_eq!(pool.missing(), vec![PY]);
        let starter = {
            let pool = pool.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                pool.put(PY, Fake::new(7).0);
            })
        };
        let got = tokio::time::timeout(Duration::from_secs(5), pool.take_or_wait(PY))
            .await
            .expect("not stuck");
        assert_eq!(got.map(|w| w.id), Some(7));
        starter.await.expect("starter");
    }

    #[tokio::test]
    async fn take_or_wait_gives_up_when_the_start_fails() {
        let pool = Arc::new(WarmPool::<Fake>::new(1));
        pool.want(PY);
        assert_eq!(pool.missing(), vec![PY]);
        let failer = {
            let pool = pool.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                pool.spawn_failed(PY);
            })
        };
        let got = tokio::time::timeout(Duration::from_secs(5), pool.take_or_wait(PY))
            .await
            .expect("a failed start wakes the waiter");
        assert!(got.is_none());
        failer.await.expect("failer");
    }
}
