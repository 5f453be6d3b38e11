//! Starting a worker, in three steps kept apart: what the run holds on the host is
//! acquired (`RunResources`, in one place), the sandbox is planned (`plan`, pure), then
//! started: forked by the Python fork server, or a helper of its own.

use std::sync::atomic::Ordering;

use super::install::RunKind;
use super::plan::{self, PlanInput};
use super::resources::{HostAcquire, RunResources};
use super::worker::Worker;
use super::{Engine, PoolKey, RUN_PREFIX, RunError, RunFiles, SetupError};
use crate::isolation::rootfs;
use crate::isolation::seccomp::Start;
use crate::isolation::spec::{IsolationLevel, NetworkSetup};
use crate::runtime::Language;

impl Engine {
    /// Start a sandbox and its interpreter; the snippet is sent later by `run_worker`.
    pub(super) async fn spawn_worker(
        &self,
        key: PoolKey,
        allow_fork: bool,
        files: &RunFiles,
        kind: RunKind,
    ) -> Result<Worker, RunError> {
        let runtime = match kind {
            RunKind::Snippet => self.runtime(key.language)?,
            RunKind::Installer => {
                self.installers
                    .get(&key.language)
                    .ok_or(RunError::LanguageUnavailable(
                        key.language,
                        super::Unavailable::NotConfigured,
                    ))?
            }
        };
        let limits = self.limits_for(kind);
        self.roots
            .wait(&self.state.chroot_root(key.language))
            .await
            .map_err(SetupError::Root)?;
        let network = self.network.policy().grant(key.network)?;
        let mut resources = RunResources::acquire(
            &HostAcquire {
                uids: &self.uids,
                network: &self.network,
                files,
                chown_out: self.host.level == IsolationLevel::Namespaces,
                cgroup: self.host.cgroup.as_ref().map(|driver| {
                    let run_no = self.counter.fetch_add(1, Ordering::Relaxed);
                    (
                        driver,
                        format!("{RUN_PREFIX}{}-{run_no}", std::process::id()),
                        limits.memory_mb << 20,
                        // One more task than the run's own: its init (`isolation::init`).
                        limits.max_processes + 1,
                    )
                }),
            },
            network == NetworkSetup::Own,
        )
        .await?;
        let (resolv_conf, proxy) = self
            .network
            .for_run(resources.gateway(), &self.config.proxy);
        let forkable = allow_fork
            && kind == RunKind::Snippet
            && files.is_empty()
            && key.language == Language::Python3;
        let packages = match kind {
            RunKind::Snippet => self.run_packages(key.language),
            RunKind::Installer => None,
        };
        let live = packages.as_ref().map(|(dir, _)| dir.clone());
        let cgroup_procs = (resources.cgroup())
            .map(|c| c.procs_files())
            .unwrap_or_default();
        let uid = resources.uid();
        // Planned for the fork server or a helper: the two jails differ in how the run
        // starts (an exec, or the snippet in place).
        let plan_for = |start| {
            plan::plan(PlanInput {
                level: self.host.level,
                state: &self.state,
                runtime,
                limits,
                network,
                resolv_conf: resolv_conf.clone(),
                uid,
                cgroup_procs: cgroup_procs.clone(),
                proxy: &proxy,
                seccomp: &self.seccomp,
                start,
                readonly_beneath: self.readonly_beneath,
                files,
                packages: packages.clone(),
            })
        };
        if let Some(fs) = self.fork_server.as_ref().filter(|fs| forkable && fs.up()) {
            // The fork server gets the namespace and keeps nothing of it; the resources
            // keep their own copy in case the fork fails.
            let shared = match resources.netns() {
                Some(fd) => Some(fd.try_clone_to_owned().map_err(RunError::Spawn)?),
                None => None,
            };
            match fs.fork(&plan_for(Start::Fork), shared).await {
                Ok((keeper, pipes)) => {
                    return Ok(Worker::forked(keeper, pipes, resources).with_packages(live));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the Python fork server failed a run's start; using a fresh interpreter")
                }
            }
        }
        let spec = plan_for(Start::Exec);
        if spec.level == IsolationLevel::Chroot {
            // The helper makes it; it goes with the run's other resources.
            resources.set_private_dir(rootfs::inside(&spec.root_dir, &spec.workdir));
        }
        Ok(Worker::spawn(&spec, resources)?.with_packages(live))
    }
}
