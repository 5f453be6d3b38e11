//! The composition root: from a validated configuration to a ready engine. Prepares the
//! state directory, detects what the host allows, discovers the interpreters, sets up
//! extra Python packages and the network guard.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};

use tokio::sync::Semaphore;

use super::forkserver::{ForkServer, Recipe};
use super::network::RunNetwork;
use super::outcome::RunLimits;
use super::warm::WarmPool;
use super::{Engine, RUN_PREFIX};
use crate::config::Config;
use crate::deps::{Dependencies, DepsError};
use crate::isolation::chroot_root;
use crate::isolation::detect::{self, DetectError};
use crate::isolation::spec::IsolationLevel;
use crate::isolation::uids::{SANDBOX_UIDS, UidError, UidPool};
use crate::runtime::{DiscoveryError, Language, Runtime, nodejs, python};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "cannot create the state directory {path}: {source}; set state_dir / SANDBOX_STATE_DIR to a writable place"
    )]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Detect(#[from] DetectError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(transparent)]
    Deps(#[from] DepsError),
    #[error("cannot prepare the chroot root {path}: {source}")]
    ChrootRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Uids(#[from] UidError),
}

impl BuildError {
    /// Whether the operator's input is at fault (an interpreter that does not run), as
    /// opposed to the host.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Discovery(_))
    }
}

impl Engine {
    /// Everything a server or a local run needs, from `config`. Networked runs are
    /// prepared only when `config.enable_network` is set. Must run inside a tokio
    /// runtime (the network's netlink connection and DNS relay live on it).
    pub async fn build(config: Config) -> Result<Self, BuildError> {
        let state = config.state();
        let mount_point = state.mount_point();
        std::fs::create_dir_all(&mount_point).map_err(|source| BuildError::StateDir {
            path: mount_point.clone(),
            source,
        })?;
        let force = config.force_chroot.then_some(IsolationLevel::Chroot);
        let host = detect::detect(&mount_point, force)?;
        let mut runtimes = discover_runtimes(&config)?;
        let chroot = host.level == IsolationLevel::Chroot;
        // Extra Python packages live in the state directory and are bound into the root.
        let deps = match runtimes.get_mut(&Language::Python3) {
            Some(Ok(python)) => {
                let mut deps = Dependencies::new(
                    python.program.clone(),
                    config.dependencies_path.clone(),
                    &state,
                    config.python_pip_mirror_url.clone(),
                )?;
                python.add_package_dir(deps.root(), &deps.current());
                if chroot {
                    deps.add_chroot_copy(state.chroot_root(Language::Python3));
                }
                Some(Arc::new(deps))
            }
            _ => None,
        };
        if chroot {
            for rt in runtimes.values().flatten() {
                let path = state.chroot_root(rt.language);
                chroot_root::prepare(&path, &rt.root)
                    .map_err(|source| BuildError::ChrootRoot { path, source })?;
            }
        }
        let root = host.level != IsolationLevel::Rootless;
        let uids = UidPool::new(&state.uid_leases(root), SANDBOX_UIDS)?;
        let network =
            RunNetwork::build(&config, &host, uids.range(), |uid| uids.is_held(uid)).await;
        if let Some(cg) = &host.cgroup {
            cg.remove_stale(RUN_PREFIX);
        }
        let fork_server = fork_server(&config, &host, &runtimes, &state).await;
        Ok(Self {
            limits: RunLimits {
                timeout: config.worker_timeout,
                memory_mb: config.memory_limit_mb,
                max_processes: config.max_processes,
                max_output_bytes: config.max_output_bytes,
                tmp_mb: config.tmp_size_mb,
            },
            workers: Arc::new(Semaphore::new(config.max_workers)),
            warm: WarmPool::new(config.warm_workers),
            config: Arc::new(config),
            host,
            state,
            runtimes,
            uids,
            counter: AtomicU64::new(0),
            queued: AtomicI64::new(0),
            deps,
            network,
            fork_server,
            restarting: std::sync::atomic::AtomicBool::new(false),
            false_ends: Default::default(),
            tasks: tokio_util::task::TaskTracker::new(),
        })
    }
}

/// Discover every language's interpreter. A language whose interpreter was configured
/// explicitly and does not run is an error; one left to the default is only disabled.
fn discover_runtimes(
    config: &Config,
) -> Result<HashMap<Language, Result<Runtime, String>>, DiscoveryError> {
    type Discover = fn(&str, &[PathBuf]) -> Result<Runtime, DiscoveryError>;
    let languages: [(Language, Discover, &str, bool); 2] = [
        (
            Language::Python3,
            python::discover,
            &config.python_path,
            config.python_path_explicit,
        ),
        (
            Language::Nodejs,
            nodejs::discover,
            &config.nodejs_path,
            config.nodejs_path_explicit,
        ),
    ];
    let mut map = HashMap::new();
    for (language, discover, path, explicit) in languages {
        match discover(path, &config.system_lib_requirements) {
            Ok(rt) => {
                map.insert(language, Ok(rt));
            }
            // A path the operator chose must work; a default one may be missing.
            Err(e) if explicit => return Err(e),
            Err(e) => {
                map.insert(language, Err(e.to_string()));
            }
        }
    }
    Ok(map)
}

/// The Python fork server, where it can run: with root's namespaces (it jails each run
/// itself, in its own namespaces), when configured and Python works.
async fn fork_server(
    config: &Config,
    host: &crate::isolation::detect::Host,
    runtimes: &HashMap<Language, Result<Runtime, String>>,
    state: &crate::state::StateDir,
) -> Option<Arc<ForkServer>> {
    if !config.python_fork_server || host.level != IsolationLevel::Namespaces {
        return None;
    }
    let Some(Ok(python)) = runtimes.get(&Language::Python3) else {
        return None;
    };
    let recipe = match Recipe::new(
        python,
        state.mount_point(),
        host.cgroup.as_ref(),
        &config.python_preload_modules,
        &config.allowed_syscalls,
        &config.extra_syscalls,
    ) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "no Python fork server; Python runs start their own interpreters");
            return None;
        }
    };
    match ForkServer::start(recipe).await {
        Ok(fs) => Some(Arc::new(fs)),
        Err(e) => {
            tracing::warn!(error = %e, "no Python fork server; Python runs start their own interpreters");
            None
        }
    }
}
