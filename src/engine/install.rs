//! Package installers in a jail. pip and npm run as a run does (their own uid, pid,
//! mount and network namespaces, a cgroup, no_new_privs, seccomp), with a profile of
//! their own: a root that holds the host's system directories read-only (installers
//! spawn compilers, git and shells), exec and child processes allowed, the dependency
//! file's staged directory read-only at /job, and the new generation the only place
//! they may write (at /tmp/out). Limits are generous but real.
//!
//! Live updates: the dependency files are looked at every few seconds; a change is
//! installed without a restart, and warm workers and the fork server move to the new
//! generation once it is live.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::warm::PoolKey;
use super::{Engine, RunError, RunFiles, RunLimits, RunRequest};
use crate::deps::{InstallJob, Installer, PackageSet};
use crate::isolation::spec::Profile;
use crate::protocol::Invocation;
use crate::runtime::root::RootBuilder;
use crate::runtime::{Language, Runtime};

/// Where a Node run finds its packages.
const NODE_MODULES: &str = "/node_modules";

/// What one install may take.
pub fn installer_limits() -> RunLimits {
    RunLimits {
        timeout: Duration::from_secs(15 * 60),
        memory_mb: 2048,
        max_processes: 256,
        max_output_bytes: 4 << 20,
        // The private /tmp (build trees, npm's cache) and the new generation each.
        tmp_mb: 2048,
    }
}

/// The host's directories an installer's root holds, read-only, besides its interpreter:
/// compilers, a shell, git, and the few files of /etc they read. Not /etc as a whole,
/// nor /home, /root, /var, /srv, /opt or /run.
const INSTALLER_PATHS: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/alternatives",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/localtime",
    "/etc/protocols",
    "/etc/services",
    "/etc/mime.types",
];

/// The installer's runtime for `rt`'s language: the interpreter as runs have it, in a
/// root with the system directories and (for Node) npm's own package directory.
pub fn installer_runtime(rt: &Runtime, npm_cli: Option<&Path>) -> Runtime {
    let mut b = RootBuilder::new();
    for path in rt
        .root
        .binds
        .iter()
        .chain(rt.root.symlinks.iter().map(|(l, _)| l))
    {
        b.add(path);
    }
    for path in INSTALLER_PATHS {
        b.add(Path::new(path));
    }
    // npm-cli.js is <npm>/bin/npm-cli.js.
    if let Some(npm) = npm_cli.and_then(|p| p.parent()?.parent()) {
        b.add(npm);
    }
    let mut env: Vec<String> = rt
        .env
        .iter()
        .filter(|e| !e.starts_with("PATH="))
        .cloned()
        .collect();
    // Package scripts call the interpreter by name.
    let program_dir = rt.program.parent().unwrap_or(Path::new("/usr/bin"));
    env.push(format!(
        "PATH={}:/usr/local/bin:/usr/bin:/bin",
        program_dir.display()
    ));
    Runtime {
        root: b.build(),
        profile: Profile::Installer,
        env,
        ..rt.clone()
    }
}

impl Installer for Engine {
    async fn install(&self, job: InstallJob) -> Result<(), String> {
        if !self.host.level.private_root() {
            return Err(format!(
                "installing packages needs the namespaces or rootless level (this host runs at the {:?} level, where an installer cannot be jailed); see `sandbox doctor`",
                self.host.level
            ));
        }
        let limits = installer_limits();
        let outcome = self.run_installer(job).await.map_err(|e| e.to_string())?;
        if outcome.exit_code == 0 && outcome.limit.is_none() {
            return Ok(());
        }
        // The installer's own words: the end of what it printed.
        let text = format!("{}\n{}", outcome.stdout, outcome.stderr);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(12)..].join("\n");
        let why = match outcome.limit {
            Some(limit) => format!(
                "stopped by the installer's {} limit ({} s, {} MiB memory, {} processes, {} MiB disk)",
                limit.as_str(),
                limits.timeout.as_secs(),
                limits.memory_mb,
                limits.max_processes,
                limits.tmp_mb
            ),
            None => format!("exit code {}", outcome.exit_code),
        };
        Err(format!("{} ({why})", tail.trim()))
    }
}

impl Engine {
    /// One installer run: a worker of its own, in the installer's jail, on the run
    /// network when the policy grants it (else offline: an offline directory still works).
    async fn run_installer(&self, job: InstallJob) -> Result<super::RunOutcome, RunError> {
        let network = self.network.policy().grant(true).is_ok();
        let req = RunRequest {
            language: job.language,
            code: job.code,
            preload: String::new(),
            network,
            sink: None,
            invocation: Invocation::default(),
            stdin: None,
            files: RunFiles {
                job: Some(job.job),
                out: Some(job.out),
            },
            wait_for_exit: true,
            cancel: None,
        };
        let slot = self.workers.clone().acquire_owned().await;
        let mut slot = Some(slot.map_err(|_| RunError::ShuttingDown)?);
        let key = PoolKey {
            language: req.language,
            network: req.network,
        };
        let worker = self
            .spawn_worker(key, false, &req.files, RunKind::Installer)
            .await?;
        self.run_worker(worker, &req, &mut slot, RunKind::Installer)
            .await
    }

    /// Install a language's dependency file now (`force`: even when unchanged).
    pub async fn install_packages(&self, language: Language, force: bool) -> Result<(), String> {
        let set = self.packages.get(&language).ok_or_else(|| {
            format!("{language} is not available on this server, so it has no dependencies")
        })?;
        set.install(force, self).await.map_err(|e| e.to_string())
    }

    /// Install each language's dependency file that changed since its live generation,
    /// saying so through `say` (a failure too: the live generation then stays in use).
    pub async fn install_changed_packages(&self, say: impl Fn(String)) {
        for set in self.packages.values() {
            if !set.changed() {
                continue;
            }
            say(format!(
                "installing {} packages from {} (changed since the last install)",
                set.language(),
                set.file().display()
            ));
            if let Err(e) = set.install(false, self).await {
                say(format!("warning: {e}"));
            }
        }
    }

    /// Install at start, then whenever a dependency file changes (looked at every
    /// `deps::POLL`), and every `interval` in any case (0: never).
    pub fn spawn_package_updates(self: &Arc<Self>, interval: Duration) {
        for set in self.packages.values() {
            let (engine, set) = (Arc::clone(self), Arc::clone(set));
            tokio::spawn(async move {
                let _ = set.install(false, &*engine).await;
                let mut forced = tokio::time::Instant::now() + interval;
                loop {
                    tokio::time::sleep(crate::deps::POLL).await;
                    if engine.workers.is_closed() {
                        return;
                    }
                    let due = !interval.is_zero() && tokio::time::Instant::now() >= forced;
                    if due || set.changed() {
                        if due {
                            forced = tokio::time::Instant::now() + interval;
                        }
                        let _ = set.install(due, &*engine).await;
                    }
                }
            });
        }
    }

    /// A run's packages, bound read-only for the whole run (a generation going live
    /// meanwhile is the next run's): the live generation where the language looks.
    /// Python's at `<packages>/current` (on its search path); Node's `node_modules` at
    /// /node_modules, where resolution from any file ends up looking (require and import
    /// alike). At the chroot level, without mounts, runs read the copied `current`.
    pub(super) fn run_packages(&self, language: Language) -> Option<(PathBuf, PathBuf)> {
        if !self.host.level.private_root() {
            return None;
        }
        let set = self.packages.get(&language)?;
        let live = set.live_dir();
        match language {
            Language::Python3 => Some((live, set.current())),
            Language::Nodejs => Some((live.join("node_modules"), PathBuf::from(NODE_MODULES))),
        }
        .filter(|(dir, _)| dir.is_dir())
    }

    /// The package sets, for `doctor`, `/metrics` and the dependency endpoints.
    pub fn package_set(&self, language: Language) -> Option<&Arc<PackageSet>> {
        self.packages.get(&language)
    }
}

/// What a worker is started for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    Snippet,
    Installer,
}
