//! Starting a worker, in three steps kept apart: what the run holds on the host is
//! acquired (`RunResources`, in one place), the sandbox is planned (`plan`, pure), then
//! started: forked by the Python fork server, or a helper of its own.

use std::sync::atomic::Ordering;

use super::plan::{self, PlanInput};
use super::resources::{HostAcquire, RunResources};
use super::worker::Worker;
use super::{Engine, PoolKey, RUN_PREFIX, RunError, RunFiles};
use crate::isolation::rootfs;
use crate::isolation::spec::{IsolationLevel, NetworkSetup, SandboxSpec};
use crate::runtime::Language;

impl Engine {
    /// Start a sandbox and its interpreter; the snippet is sent later by `run_worker`.
    pub(super) async fn spawn_worker(
        &self,
        key: PoolKey,
        allow_fork: bool,
        files: &RunFiles,
    ) -> Result<Worker, RunError> {
        let runtime = self.runtime(key.language)?;
        self.roots
            .wait(&self.state.chroot_root(key.language))
            .await
            .map_err(RunError::Setup)?;
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
                        self.limits.memory_mb << 20,
                        self.limits.max_processes,
                    )
                }),
            },
            network == NetworkSetup::Own,
        )
        .await?;
        let (resolv_conf, proxy) = self
            .network
            .for_run(resources.gateway(), &self.config.proxy);
        let spec = plan::plan(PlanInput {
            level: self.host.level,
            mmap_min_addr: self.host.report.mmap_min_addr,
            state: &self.state,
            runtime,
            limits: &self.limits,
            network,
            resolv_conf,
            uid: resources.uid(),
            cgroup_procs: resources
                .cgroup()
                .map(|c| c.procs_files())
                .unwrap_or_default(),
            proxy: &proxy,
            allowed_syscalls: &self.config.allowed_syscalls,
            extra_syscalls: &self.config.extra_syscalls,
            files,
        });
        if spec.level == IsolationLevel::Chroot {
            // The helper makes it; it goes with the run's other resources.
            resources.set_private_dir(rootfs::inside(&spec.root_dir, &spec.workdir));
        }
        let forkable = allow_fork && files.is_empty() && key.language == Language::Python3;
        self.start(spec, resources, forkable).await
    }

    /// Fork the run from the fork server when it may and the server is up, else start a
    /// helper for it.
    async fn start(
        &self,
        spec: SandboxSpec,
        resources: RunResources,
        forkable: bool,
    ) -> Result<Worker, RunError> {
        match &self.fork_server {
            Some(fs) if forkable && fs.up() => {
                // The fork server gets the namespace and keeps nothing of it; the
                // resources keep their own copy in case the fork fails.
                let shared = match resources.netns() {
                    Some(fd) => Some(fd.try_clone_to_owned().map_err(RunError::Spawn)?),
                    None => None,
                };
                match fs.fork(&spec, shared).await {
                    Ok((keeper, pipes)) => return Ok(Worker::forked(keeper, pipes, resources)),
                    Err(e) => {
                        tracing::warn!(error = %e, "the Python fork server failed a run's start; using a fresh interpreter")
                    }
                }
            }
            _ => {}
        }
        Worker::spawn(&spec, resources)
    }
}
