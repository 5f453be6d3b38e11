//! The plan of one run: a pure function from what the host allows, the runtime, the
//! limits and the run's own parameters to the `SandboxSpec` the helper applies. Nothing
//! here touches the system, so each rule is checked case by case in the unit tests.

use std::path::PathBuf;

use super::RunFiles;
use crate::config::{Proxy, RunLimits};
use crate::isolation::spec::{IsolationLevel, Limits, NetworkSetup, OUT_MOUNT, SandboxSpec};
use crate::runtime::Runtime;
use crate::state::StateDir;

/// Descriptors a run may hold: enough for any snippet, far below the exec descriptor.
const OPEN_FILES: u64 = 256;
/// RLIMIT_CPU is a backstop behind the wall timeout, not the limit users meet.
const CPU_GRACE_SECS: u64 = 2;

/// Everything a run's sandbox depends on.
pub struct PlanInput<'a> {
    pub level: IsolationLevel,
    /// The host's vm.mmap_min_addr (see `isolation::sys::empty_path`).
    pub mmap_min_addr: Option<u64>,
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
    pub allowed_syscalls: &'a [i64],
    pub extra_syscalls: &'a [i64],
    /// The run's job and output directories on the host (`sandbox run`).
    pub files: &'a RunFiles,
}

pub fn plan(p: PlanInput<'_>) -> SandboxSpec {
    let workdir = match p.level {
        IsolationLevel::Namespaces | IsolationLevel::Rootless => PathBuf::from("/tmp"),
        IsolationLevel::Chroot => PathBuf::from(format!("/tmp/run-{}", p.uid)),
    };
    let root_dir = match p.level {
        IsolationLevel::Namespaces | IsolationLevel::Rootless => p.state.mount_point(),
        IsolationLevel::Chroot => p.state.chroot_root(p.runtime.language),
    };
    let mut env = vec![
        "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
        format!("HOME={}", workdir.display()),
        format!("TMPDIR={}", workdir.display()),
        "LANG=C.UTF-8".to_string(),
    ];
    env.extend(p.runtime.env.iter().cloned());
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
    SandboxSpec {
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
            open_files: OPEN_FILES,
        },
        cgroup_procs: p.cgroup_procs,
        profile: p.runtime.profile,
        allowed_syscalls: p.allowed_syscalls.to_vec(),
        extra_syscalls: p.extra_syscalls.to_vec(),
        program: p.runtime.program.clone(),
        workdir,
        argv: p.runtime.argv(l.memory_mb),
        env,
        mmap_min_addr: p.mmap_min_addr,
        job_dir: p.files.job.clone(),
        out_dir: p.files.out.clone(),
    }
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
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::isolation::spec::{Profile, RootPlan};
    use crate::runtime::Language;

    fn runtime(language: Language) -> Runtime {
        Runtime {
            language,
            program: PathBuf::from(match language {
                Language::Python3 => "/usr/bin/python3.11",
                Language::Nodejs => "/usr/bin/node",
            }),
            version: "1".into(),
            root: RootPlan {
                binds: vec![PathBuf::from("/usr")],
                symlinks: vec![],
            },
            profile: match language {
                Language::Python3 => Profile::Python,
                Language::Nodejs => Profile::Nodejs,
            },
            modules: vec![],
            search_path: vec!["/usr/lib/python3.11".into()],
            env: vec!["EXTRA=1".into()],
        }
    }

    fn limits() -> RunLimits {
        RunLimits {
            timeout: Duration::from_secs(5),
            memory_mb: 128,
            max_processes: 16,
            max_output_bytes: 1 << 20,
            tmp_mb: 8,
        }
    }

    struct Case {
        level: IsolationLevel,
        language: Language,
        network: NetworkSetup,
        cgroup: bool,
    }

    fn plan_for(c: Case) -> SandboxSpec {
        plan_with_files(c, &RunFiles::default())
    }

    fn plan_with_files(c: Case, files: &RunFiles) -> SandboxSpec {
        let state = StateDir::new("/state");
        let rt = runtime(c.language);
        let l = limits();
        let proxy = Proxy {
            socks5: String::new(),
            http: "http://proxy:3128".into(),
            https: String::new(),
        };
        plan(PlanInput {
            level: c.level,
            mmap_min_addr: Some(65536),
            state: &state,
            runtime: &rt,
            limits: &l,
            network: c.network,
            resolv_conf: (c.network == NetworkSetup::Own).then(|| "nameserver 10.213.0.1\n".into()),
            uid: 10007,
            cgroup_procs: if c.cgroup {
                vec![PathBuf::from("/sys/fs/cgroup/run/cgroup.procs")]
            } else {
                vec![]
            },
            proxy: &proxy,
            allowed_syscalls: &[],
            extra_syscalls: &[309],
            files,
        })
    }

    fn env_has(spec: &SandboxSpec, entry: &str) -> bool {
        spec.env.iter().any(|e| e == entry)
    }

    #[test]
    fn namespaces_mount_a_private_root_with_tmp_as_home() {
        let spec = plan_for(Case {
            level: IsolationLevel::Namespaces,
            language: Language::Python3,
            network: NetworkSetup::Offline,
            cgroup: true,
        });
        assert_eq!(spec.root_dir, Path::new("/state/rootfs"));
        assert_eq!(spec.workdir, Path::new("/tmp"));
        assert!(env_has(&spec, "HOME=/tmp") && env_has(&spec, "TMPDIR=/tmp"));
        assert_eq!((spec.uid, spec.gid), (10007, 10007));
        assert_eq!(spec.limits.tmp_bytes, 8 << 20);
        assert_eq!(spec.limits.cpu_seconds, 7);
        assert_eq!(spec.limits.max_processes, 16);
        assert_eq!(spec.extra_syscalls, vec![309]);
        assert!(env_has(&spec, "EXTRA=1"), "the runtime's own variables");
        assert_eq!(spec.cwd(), Path::new("/tmp"));
        assert!(spec.job_dir.is_none() && spec.out_dir.is_none());
        assert!(!spec.env.iter().any(|e| e.starts_with("SANDBOX_OUT=")));
        assert_eq!(
            spec.root_files[0],
            (
                PathBuf::from("/etc/passwd"),
                "root:x:0:0:root:/:/nonexistent\nsandbox:x:10007:10007:sandbox:/tmp:/nonexistent\n"
                    .into()
            )
        );
    }

    #[test]
    fn the_chroot_level_uses_the_copied_root_and_a_private_directory() {
        let spec = plan_for(Case {
            level: IsolationLevel::Chroot,
            language: Language::Nodejs,
            network: NetworkSetup::Offline,
            cgroup: false,
        });
        assert_eq!(spec.root_dir, Path::new("/state/root-nodejs"));
        assert_eq!(spec.workdir, Path::new("/tmp/run-10007"));
        assert!(env_has(&spec, "HOME=/tmp/run-10007"));
    }

    #[test]
    fn proxies_reach_networked_runs_only() {
        let offline = plan_for(Case {
            level: IsolationLevel::Namespaces,
            language: Language::Python3,
            network: NetworkSetup::Offline,
            cgroup: true,
        });
        assert!(
            !offline
                .env
                .iter()
                .any(|e| e.contains("PROXY") || e.contains("proxy"))
        );
        let online = plan_for(Case {
            level: IsolationLevel::Namespaces,
            language: Language::Python3,
            network: NetworkSetup::Own,
            cgroup: true,
        });
        assert!(online.network.networked());
        assert!(
            online.root_files.contains(&(
                PathBuf::from("/etc/resolv.conf"),
                "nameserver 10.213.0.1\n".into()
            )),
            "a run of its own network resolves through its gateway"
        );
        assert!(
            !offline
                .root_files
                .iter()
                .any(|(p, _)| p.ends_with("resolv.conf"))
        );
        assert!(env_has(&online, "HTTP_PROXY=http://proxy:3128"));
        assert!(env_has(&online, "http_proxy=http://proxy:3128"));
        assert!(
            !online.env.iter().any(|e| e.starts_with("HTTPS_PROXY")),
            "unset proxies stay unset"
        );
    }

    #[test]
    fn memory_is_the_cgroups_job_and_else_the_runtimes_rule() {
        let case = |language, cgroup| {
            plan_for(Case {
                level: IsolationLevel::Namespaces,
                language,
                network: NetworkSetup::Offline,
                cgroup,
            })
        };
        assert_eq!(
            case(Language::Python3, true).limits.address_space_bytes,
            None
        );
        assert_eq!(
            case(Language::Python3, false).limits.address_space_bytes,
            Some(128 << 20)
        );
        // V8 reserves far more address space than it uses: its heap flag instead.
        let node = case(Language::Nodejs, false);
        assert_eq!(node.limits.address_space_bytes, None);
        assert!(node.argv.iter().any(|a| a == "--max-old-space-size=96"));
        let with_cgroup = case(Language::Python3, true);
        assert_eq!(
            with_cgroup.cgroup_procs,
            vec![PathBuf::from("/sys/fs/cgroup/run/cgroup.procs")]
        );
    }

    #[test]
    fn rootless_runs_pivot_like_namespaces() {
        let spec = plan_for(Case {
            level: IsolationLevel::Rootless,
            language: Language::Python3,
            network: NetworkSetup::Offline,
            cgroup: false,
        });
        assert_eq!(spec.root_dir, Path::new("/state/rootfs"));
        assert_eq!(spec.limits.address_space_bytes, Some(128 << 20));
        assert_eq!(spec.mmap_min_addr, Some(65536));
    }

    #[test]
    fn a_job_directory_is_the_cwd_and_the_output_directory_is_named() {
        let files = RunFiles {
            job: Some(PathBuf::from("/state/runs/1/job")),
            out: Some(PathBuf::from("/state/runs/1/out")),
        };
        let spec = plan_with_files(
            Case {
                level: IsolationLevel::Rootless,
                language: Language::Python3,
                network: NetworkSetup::Offline,
                cgroup: false,
            },
            &files,
        );
        assert_eq!(spec.cwd(), Path::new("/job"));
        assert_eq!(spec.workdir, Path::new("/tmp"), "HOME and TMPDIR stay /tmp");
        assert_eq!(spec.job_dir, files.job);
        assert_eq!(spec.out_dir, files.out);
        assert!(env_has(&spec, "SANDBOX_OUT=/tmp/out"));
    }
}
