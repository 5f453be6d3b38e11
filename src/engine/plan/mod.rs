//! The plan of one run: a pure function from what the host allows, the runtime, the
//! limits and the run's own parameters to the `SandboxSpec` the helper applies. Nothing
//! here touches the system, so each rule is checked case by case in the unit tests.

use std::path::PathBuf;

mod steps;

use super::RunFiles;
use crate::config::{Proxy, RunLimits};
use crate::isolation::jail::Jail;
use crate::isolation::seccomp::{Programs, Start};
use crate::isolation::spec::{
    IsolationLevel, Limits, NetworkSetup, OUT_MOUNT, Profile, SandboxSpec,
};
use crate::runtime::Runtime;
use crate::state::StateDir;

/// Descriptors a run may hold: enough for any snippet, far below the exec descriptor.
const OPEN_FILES: u64 = 256;
/// RLIMIT_CPU is a backstop behind the wall timeout, not the limit users meet.
const CPU_GRACE_SECS: u64 = 2;

/// Everything a run's sandbox depends on.
pub struct PlanInput<'a> {
    pub level: IsolationLevel,
    pub state: &'a StateDir,
    pub runtime: &'a Runtime,
    pub limits: &'a RunLimits,
    pub network: NetworkSetup,
    /// The run's own /etc/resolv.conf, when its network needs one.
    pub resolv_conf: Option<String>,
    pub uid: u32,
    /// The run cgroup's `cgroup.procs` files; empty when the host has no usable cgroup.
    pub cgroup_procs: Vec<PathBuf>,
    /// The proxies as this run reaches them (a loopback proxy through its gateway).
    pub proxy: &'a Proxy,
    /// The seccomp programs, compiled at start.
    pub seccomp: &'a Programs,
    /// Whether the helper execs the interpreter or a fork server forks it.
    pub start: Start,
    /// Whether the kernel can make a tree of mounts read-only (see `RootSteps`).
    pub readonly_beneath: bool,
    /// The run's job and output directories on the host (`sandbox run`).
    pub files: &'a RunFiles,
    /// The run's extra packages (see `SandboxSpec::packages`).
    pub packages: Option<(PathBuf, PathBuf)>,
}
/// Descriptors an installer may hold: npm opens many files at once. Its filter allows
/// exec anyway, so nothing depends on it staying below the exec descriptor.
const INSTALLER_OPEN_FILES: u64 = 4096;

pub fn plan(p: PlanInput<'_>) -> SandboxSpec {
    let workdir = match p.level {
        IsolationLevel::Namespaces | IsolationLevel::Rootless => PathBuf::from("/tmp"),
        IsolationLevel::Chroot => PathBuf::from(format!("/tmp/run-{}", p.uid)),
    };
    let root_dir = match p.level {
        IsolationLevel::Namespaces | IsolationLevel::Rootless => p.state.mount_point(),
        IsolationLevel::Chroot => p.state.chroot_root(p.runtime.language),
    };
    let mut env = base_env(&workdir, p.runtime);
    if p.network.networked() {
        env.extend(proxy_env(p.proxy));
    }
    if p.files.out.is_some() {
        env.push(format!("SANDBOX_OUT={OUT_MOUNT}"));
    }
    let mut root_files = vec![(
        PathBuf::from("/etc/passwd"),
        format!(
            "root:x:0:0:root:/:/nonexistent\nsandbox:x:{uid}:{uid}:sandbox:{home}:/nonexistent\n",
            uid = p.uid,
            home = workdir.display()
        ),
    )];
    if let Some(text) = p.resolv_conf {
        root_files.push((PathBuf::from("/etc/resolv.conf"), text));
    }
    let l = p.limits;
    let cgroup = !p.cgroup_procs.is_empty();
    let mut spec = SandboxSpec {
        level: p.level,
        root_dir,
        root: p.runtime.root.clone(),
        uid: p.uid,
        gid: p.uid,
        network: p.network,
        root_files,
        limits: Limits {
            address_space_bytes: p.runtime.address_space_limit(l.memory_mb, cgroup),
            max_processes: l.max_processes,
            tmp_bytes: l.tmp_mb << 20,
            cpu_seconds: l.timeout.as_secs() + CPU_GRACE_SECS,
            open_files: match p.runtime.profile {
                Profile::Installer => INSTALLER_OPEN_FILES,
                _ => OPEN_FILES,
            },
        },
        cgroup_procs: p.cgroup_procs,
        profile: p.runtime.profile,
        program: p.runtime.program.clone(),
        workdir,
        argv: p.runtime.argv(l.memory_mb),
        env,
        job_dir: p.files.job.clone(),
        out_dir: p.files.out.clone(),
        packages: p.packages,
        jail: Jail::default(),
    };
    spec.jail = steps::jail(&spec, p.seccomp, p.start, p.readonly_beneath);
    spec
}

/// The environment every run of `runtime` starts with, its home at `workdir`. The fork
/// server starts with it too: a forked run's /proc/self/environ is the fork server's.
pub fn base_env(workdir: &std::path::Path, runtime: &Runtime) -> Vec<String> {
    let mut env = Vec::new();
    // A runtime that sets its own PATH (an installer's) keeps it.
    if !runtime.env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/bin:/usr/bin:/bin".to_string());
    }
    env.extend([
        format!("HOME={}", workdir.display()),
        format!("TMPDIR={}", workdir.display()),
        "LANG=C.UTF-8".to_string(),
    ]);
    env.extend(runtime.env.iter().cloned());
    env
}

/// The proxy variables a networked run gets, in both spellings tools look for.
fn proxy_env(p: &Proxy) -> Vec<String> {
    let mut env = Vec::new();
    for (vars, value) in [
        (["HTTP_PROXY", "http_proxy"], &p.http),
        (["HTTPS_PROXY", "https_proxy"], &p.https),
        (["ALL_PROXY", "all_proxy"], &p.socks5),
    ] {
        if !value.is_empty() {
            env.extend(vars.iter().map(|v| format!("{v}={value}")));
        }
    }
    env
}

#[cfg(test)]
mod tests;
