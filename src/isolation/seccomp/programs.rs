//! Every seccomp program a server's runs can get, compiled once at start: by language,
//! network setting and whether the run execs its interpreter (a helper's) or not (a fork
//! server's). A run's plan takes its program from here as bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::apply::{FilterOptions, SeccompApplyError, SocketPolicy, export};
use crate::isolation::spec::{IsolationLevel, NetworkSetup, Profile};

/// How a run's interpreter starts, which decides whether its filter admits one exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Start {
    /// The helper execs the interpreter through `execveat` with the exec page's pointer.
    Exec,
    /// A fork server's run is the interpreter already: no exec at all.
    Fork,
}

type Key = (Profile, NetworkSetup, Start);

/// The compiled programs, and the exec page the helpers' programs name.
#[derive(Debug)]
pub struct Programs {
    by_key: BTreeMap<Key, Arc<[u8]>>,
    exec_page: u64,
}

const PROFILES: [Profile; 2] = [Profile::Python, Profile::Nodejs];
const NETWORKS: [NetworkSetup; 3] = [NetworkSetup::Offline, NetworkSetup::Own, NetworkSetup::Host];

impl Programs {
    /// Compile them all for runs at `level`, with the operator's syscall lists.
    pub fn build(
        level: IsolationLevel,
        allowed_syscalls: &[i64],
        extra_syscalls: &[i64],
        exec_page: u64,
    ) -> Result<Self, SeccompApplyError> {
        let mut by_key = BTreeMap::new();
        for profile in PROFILES {
            for network in NETWORKS {
                for start in [Start::Exec, Start::Fork] {
                    let program = export(&FilterOptions {
                        profile,
                        sockets: SocketPolicy::for_run(network, level),
                        allowed_syscalls,
                        extra_syscalls,
                        exec_path: (start == Start::Exec).then_some(exec_page),
                    })?;
                    by_key.insert((profile, network, start), Arc::from(program));
                }
            }
        }
        // An installer always execs its interpreter (never forked).
        for network in NETWORKS {
            let program = export(&FilterOptions {
                profile: Profile::Installer,
                sockets: SocketPolicy::for_run(network, level),
                allowed_syscalls,
                extra_syscalls,
                exec_path: Some(exec_page),
            })?;
            by_key.insert(
                (Profile::Installer, network, Start::Exec),
                Arc::from(program),
            );
        }
        Ok(Self { by_key, exec_page })
    }

    /// The program for a run.
    pub fn get(&self, profile: Profile, network: NetworkSetup, start: Start) -> Arc<[u8]> {
        // Built for every key above.
        self.by_key
            .get(&(profile, network, start))
            .cloned()
            .unwrap_or_else(|| Arc::from(Vec::new()))
    }

    /// The address of the empty path `execveat` may take (see `exec_page`).
    pub fn exec_page(&self) -> u64 {
        self.exec_page
    }
}

/// The empty pathname the helpers' `execveat` takes; the filter admits `execveat` only
/// with this exact pointer. Preferred: a page below `vm.mmap_min_addr`, which only a
/// process with CAP_SYS_RAWIO can map: the helper, root until it drops its uid, and
/// never the snippet, so after exec nobody can put a path of their own there. Without
/// that capability (rootless, an unprivileged container): a page at a random address
/// drawn at the server's start. Either way the one admitted call also needs the
/// interpreter's descriptor, 1023, which the snippet can never hold (RLIMIT_NOFILE is
/// below it and the descriptor is closed at exec).
pub fn exec_page(mmap_min_addr: Option<u64>, can_map_low: bool, random: u64) -> u64 {
    match mmap_min_addr.filter(|m| *m >= 4096) {
        // Not the page's first byte: the address must not be NULL.
        Some(min) if can_map_low => ((min - 1) & !0xfff) + 8,
        _ => {
            const LOW: u64 = 1 << 32;
            const HIGH: u64 = 1 << 46;
            (LOW + random % (HIGH - LOW)) & !0xfff
        }
    }
}

/// The exec page for this server's helpers, drawn once at its start.
pub fn exec_page_for(level: IsolationLevel, mmap_min_addr: Option<u64>) -> u64 {
    let can_map_low = level != IsolationLevel::Rootless && has_cap_sys_rawio();
    exec_page(
        mmap_min_addr,
        can_map_low,
        crate::isolation::sys::random_u64(),
    )
}

/// Whether this process (and so the helpers it starts, before they drop their uid) holds
/// CAP_SYS_RAWIO, which mapping below vm.mmap_min_addr takes.
fn has_cap_sys_rawio() -> bool {
    use crate::isolation::detect::{CAP_SYS_RAWIO, effective_caps};
    effective_caps().is_some_and(|caps| caps & (1 << CAP_SYS_RAWIO) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exec_page_is_below_mmap_min_addr_only_with_the_capability() {
        assert_eq!(exec_page(Some(65536), true, 7), 0xf008);
        let random = exec_page(Some(65536), false, 0x1234_5678_9abc);
        assert!((1 << 32..1 << 46).contains(&random) && random.is_multiple_of(4096));
        assert!(exec_page(Some(0), true, 99) >= 1 << 32);
    }

    #[test]
    fn every_key_has_a_program_and_forked_runs_get_another_one() {
        let p = Programs::build(IsolationLevel::Namespaces, &[], &[], 0xf008).expect("build");
        for profile in PROFILES {
            for network in NETWORKS {
                let exec = p.get(profile, network, Start::Exec);
                let fork = p.get(profile, network, Start::Fork);
                assert!(!exec.is_empty() && exec.len().is_multiple_of(8));
                assert_ne!(exec, fork, "{profile:?} {network:?}");
            }
        }
    }
}
