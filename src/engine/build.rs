//! The composition root: from a validated configuration to a ready engine. Prepares the
//! state directory, detects what the host allows, discovers the interpreters, sets up
//! extra packages and the network guard.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};

use tokio::sync::Semaphore;

use super::forkserver::{ForkServer, Recipe};
use super::network::ServerNetwork;
use super::warm::WarmPool;
use super::{Engine, RUN_PREFIX, Unavailable};
use crate::config::Config;
use crate::deps::{DepsError, PackageSet};
use crate::isolation::chroot_root::Roots;
use crate::isolation::detect::{self, DetectError};
use crate::isolation::seccomp::{self, Programs, apply::SeccompApplyError};
use crate::isolation::spec::IsolationLevel;
use crate::isolation::uids::{SANDBOX_UIDS, UidError, UidPool};
use crate::runtime::{DiscoveryError, Language, Runtime, nodejs, python};
use crate::state::StateDir;

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
    #[error(transparent)]
    Uids(#[from] UidError),
    #[error("{0}; check allowed_syscalls and extra_syscalls in the configuration")]
    Seccomp(#[from] SeccompApplyError),
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
        let state = StateDir::new(&config.state_dir);
        let mount_point = state.mount_point();
        std::fs::create_dir_all(&mount_point).map_err(|source| BuildError::StateDir {
            path: mount_point.clone(),
            source,
        })?;
        let force = config.force_chroot.then_some(IsolationLevel::Chroot);
        let host = detect::detect(&mount_point, force)?;
        let readonly_beneath = crate::isolation::sys::raw::has_mount_setattr();
        let exec_page = seccomp::programs::exec_page_for(host.level, host.report.mmap_min_addr);
        let seccomp = Programs::build(
            host.level,
            &config.allowed_syscalls,
            &config.extra_syscalls,
            exec_page,
        )?;
        // The interpreters are asked about themselves while the network is set up: both
        // mostly wait for other processes (the interpreters, nft).
        let discovery = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || discover_runtimes(&config))
        };
        let root = host.level != IsolationLevel::Rootless;
        let uids = UidPool::new(&state.uid_leases(root), SANDBOX_UIDS)?;
        let network =
            ServerNetwork::build(&config, &host, uids.range(), |uid| uids.is_held(uid)).await;
        let discovered = discovery
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let mut runtimes = match discovered {
            Ok(runtimes) => runtimes,
            Err(e) => {
                network.close().await;
                return Err(e.into());
            }
        };
        let chroot = host.level == IsolationLevel::Chroot;
        // Extra packages live in the state directory: Python's bound into its root (on
        // the search path), Node's bound per run at /node_modules (see `install`).
        let mut packages = HashMap::new();
        let mut installers = HashMap::new();
        for language in Language::ALL {
            let Some(Ok(rt)) = runtimes.get_mut(&language) else {
                continue;
            };
            let made = match language {
                Language::Python3 => PackageSet::python(
                    config.dependencies_path.clone(),
                    &state,
                    config.python_pip_mirror_url.clone(),
                ),
                Language::Nodejs => PackageSet::nodejs(
                    &rt.program,
                    config.nodejs_dependencies_path.clone(),
                    &state,
                    config.nodejs_npm_mirror_url.clone(),
                ),
            };
            let set = match made {
                Ok(set) => set,
                Err(e) => {
                    network.close().await;
                    return Err(e.into());
                }
            };
            // The installer's root is made before the packages join the runs': an
            // installer sees no generation but the one it writes.
            let npm = (language == Language::Nodejs)
                .then(|| crate::deps::node::find_npm_cli(&rt.program))
                .flatten();
            installers.insert(
                language,
                super::install::installer_runtime(rt, npm.as_deref()),
            );
            if language == Language::Python3 {
                // Runs with a root of their own bind their generation themselves; the
                // chroot level's roots are copies, which hold the package directory.
                let bind = chroot.then(|| set.root());
                rt.add_package_dir(bind, &set.current());
            }
            packages.insert(language, set);
        }
        // Copied in the background: the server listens meanwhile, runs wait for them.
        let roots = if chroot {
            // Python first: most of Dify's code nodes.
            let roots = Roots::prepare(
                Language::ALL
                    .into_iter()
                    .filter_map(|lang| runtimes.get(&lang)?.as_ref().ok())
                    .map(|rt| (state.chroot_root(rt.language), rt.root.clone()))
                    .collect(),
            );
            for (language, set) in packages.iter_mut() {
                set.add_chroot_copy(state.chroot_root(*language), roots.clone());
            }
            roots
        } else {
            Roots::none()
        };
        let packages: HashMap<Language, Arc<PackageSet>> = packages
            .into_iter()
            .map(|(language, set)| (language, Arc::new(set)))
            .collect();
        if let Some(cg) = &host.cgroup {
            cg.remove_stale(RUN_PREFIX);
        }
        // The fork server imports its preloads from the live generation too (it is
        // restarted when another goes live); each forked run binds its own.
        let python_packages = packages
            .get(&Language::Python3)
            .map(|s| s.root().to_path_buf());
        let fork_server = fork_server(
            &config,
            &host,
            &runtimes,
            &state,
            readonly_beneath,
            python_packages.as_deref(),
        )
        .await;
        Ok(Self {
            seccomp,
            readonly_beneath,
            limits: config.run_limits(),
            workers: Arc::new(Semaphore::new(config.max_workers)),
            warm: WarmPool::new(config.warm_workers),
            config: Arc::new(config),
            host,
            state,
            runtimes,
            uids,
            counter: AtomicU64::new(0),
            queued: AtomicI64::new(0),
            packages,
            installers,
            installer_limits: super::install::installer_limits(),
            roots,
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
) -> Result<HashMap<Language, Result<Runtime, Unavailable>>, DiscoveryError> {
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
    // Each language asks its interpreter, which takes a good part of the start: at once.
    let found: Vec<_> = std::thread::scope(|scope| {
        let asked: Vec<_> = languages
            .map(|(language, discover, path, explicit)| {
                let system_libs = &config.system_lib_requirements;
                let asking = scope.spawn(move || discover(path, system_libs));
                (language, explicit, asking)
            })
            .into_iter()
            .collect();
        asked
            .into_iter()
            .map(|(language, explicit, asking)| {
                let found = asking
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (language, explicit, found)
            })
            .collect()
    });
    let mut map = HashMap::new();
    for (language, explicit, found) in found {
        match found {
            Ok(rt) => {
                map.insert(language, Ok(rt));
            }
            // A path the operator chose must work; a default one may be missing.
            Err(e) if explicit => return Err(e),
            Err(e) => {
                map.insert(language, Err(Unavailable::Discovery(Arc::new(e))));
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
    runtimes: &HashMap<Language, Result<Runtime, Unavailable>>,
    state: &crate::state::StateDir,
    readonly_beneath: bool,
    packages: Option<&std::path::Path>,
) -> Option<Arc<ForkServer>> {
    if !config.python_fork_server || host.level != IsolationLevel::Namespaces {
        return None;
    }
    let Some(Ok(python)) = runtimes.get(&Language::Python3) else {
        return None;
    };
    let mut python = python.clone();
    if let Some(dir) = packages {
        python.add_bind(dir);
    }
    let recipe = match Recipe::new(
        &python,
        state.mount_point(),
        host.cgroup.as_ref(),
        &config.python_preload_modules,
        readonly_beneath,
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
