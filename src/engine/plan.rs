//! The plan of one run: a pure function from what the host allows, the runtime, the
//! limits and the run's own parameters to the `SandboxSpec` the helper applies. Nothing
//! here touches the system, so each rule is checked case by case in the unit tests.

use std::path::PathBuf;

use super::RunFiles;
use super::outcome::RunLimits;
use crate::config::Proxy;
use crate::isolation::jail::{Fd, Jail, Keep, Op};
use crate::isolation::rootfs::{self, Extras, RootSteps};
use crate::isolation::seccomp::{Programs, Start};
use crate::isolation::spec::{
    IsolationLevel, JOB_MOUNT, Limits, NetworkSetup, OUT_MOUNT, SandboxSpec,
};
use crate::runtime::Runtime;
use crate::state::StateDir;

/// Descriptors a run may hold: enough for any snippet, far below the exec descriptor.
const OPEN_FILES: u64 = 256;
/// The descriptor the interpreter is opened on, the only one `execveat` accepts; above
/// RLIMIT_NOFILE, so the snippet can never recreate it.
pub const EXEC_FD: i32 = crate::isolation::sys::EXEC_FD;
/// Where a failed step is written until the run starts: above everything a run keeps.
pub const ERROR_FD: i32 = 1022;
/// Where descriptors wait while the others are closed: between the two.
const PARK_FD: i32 = 512;
/// The snippet's socket in the run.
pub const CODE_FD: i32 = 3;
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
            open_files: OPEN_FILES,
        },
        cgroup_procs: p.cgroup_procs,
        profile: p.runtime.profile,
        program: p.runtime.program.clone(),
        workdir,
        argv: p.runtime.argv(l.memory_mb),
        env,
        job_dir: p.files.job.clone(),
        out_dir: p.files.out.clone(),
        jail: Jail::default(),
    };
    spec.jail = jail(&spec, p.seccomp, p.start);
    spec
}

/// The steps of `spec`'s jail, in the order they must happen.
fn jail(spec: &SandboxSpec, seccomp: &Programs, start: Start) -> Jail {
    let mut owner: Vec<Op> = (spec.cgroup_procs.iter())
        .map(|procs| Op::JoinCgroup {
            procs: procs.clone(),
        })
        .collect();
    if spec.level == IsolationLevel::Rootless {
        owner.push(Op::EnterUserNamespace {
            uid: spec.uid,
            gid: spec.gid,
        });
    }
    if spec.level.private_root() {
        // A new pid namespace applies to children only: the forked run is its pid 1, and
        // when it exits the kernel kills everything left in the namespace.
        owner.push(Op::Unshare {
            flags: libc::CLONE_NEWPID,
        });
    }

    let sigkill = libc::SIGKILL;
    let mut run = vec![
        Op::ParentDeathSignal { signal: sigkill },
        // The root is built for another uid: its directories and files must not inherit
        // a caller's restrictive umask (077 would lock the run out of its interpreter).
        Op::Umask { mask: 0o022 },
        // No controlling terminal, no process group shared with the server: group-wide
        // signals and terminal tricks reach nobody else.
        Op::NewSession,
    ];
    match spec.level {
        IsolationLevel::Namespaces | IsolationLevel::Rootless => {
            let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
            if spec.network == NetworkSetup::Offline {
                flags |= libc::CLONE_NEWNET;
            }
            run.push(Op::Unshare { flags });
            if spec.network == NetworkSetup::Own {
                run.push(Op::JoinNetwork {
                    nstype: libc::CLONE_NEWNET,
                });
            }
            run.push(Op::Hostname {
                name: "sandbox".into(),
            });
            let job: Vec<_> = (spec.job_dir.iter())
                .map(|d| (d.clone(), PathBuf::from(JOB_MOUNT)))
                .collect();
            let out: Vec<_> = (spec.out_dir.iter())
                .map(|d| (d.clone(), PathBuf::from(OUT_MOUNT)))
                .collect();
            run.extend(rootfs::private_root(&RootSteps {
                root_dir: &spec.root_dir,
                plan: &spec.root,
                tmp_bytes: spec.limits.tmp_bytes,
                files: &spec.root_files,
                extras: Extras {
                    dirs: &[],
                    writable: &out,
                    readonly: &job,
                },
                keep_locked: spec.level == IsolationLevel::Rootless,
            }));
        }
        IsolationLevel::Chroot => {
            run.push(Op::Chroot {
                dir: spec.root_dir.clone(),
            });
            // No private tmpfs without mounts: a directory only this run's uid can enter.
            run.push(Op::FreshDir {
                path: spec.workdir.clone(),
                uid: spec.uid,
                gid: spec.gid,
                mode: 0o700,
            });
            // What the run creates is its own alone, even if a path leaked out.
            run.push(Op::Umask { mask: 0o077 });
        }
    }

    // fd 0: the run's stdin, 1 and 2: its output, 3: the snippet, the error pipe and the
    // interpreter (a helper's run) high above; nothing else survives.
    let mut keep = vec![
        Keep {
            fd: Fd::Stdin,
            at: 0,
            cloexec: false,
        },
        Keep {
            fd: Fd::Stdout,
            at: 1,
            cloexec: false,
        },
        Keep {
            fd: Fd::Stderr,
            at: 2,
            cloexec: false,
        },
        Keep {
            fd: Fd::Code,
            at: CODE_FD,
            cloexec: false,
        },
        Keep {
            fd: Fd::Error,
            at: ERROR_FD,
            cloexec: true,
        },
    ];
    if start == Start::Exec {
        run.push(Op::OpenProgram {
            path: spec.program.clone(),
        });
        keep.push(Keep {
            fd: Fd::Program,
            at: EXEC_FD,
            cloexec: true,
        });
    }
    run.push(Op::Descriptors {
        keep,
        park: PARK_FD,
    });

    let l = &spec.limits;
    let mut limits = vec![
        (
            libc::RLIMIT_NOFILE,
            "RLIMIT_NOFILE",
            l.open_files.min(ERROR_FD as u64 - 1),
        ),
        (libc::RLIMIT_NPROC, "RLIMIT_NPROC", l.max_processes),
        (libc::RLIMIT_FSIZE, "RLIMIT_FSIZE", l.tmp_bytes),
        (libc::RLIMIT_CORE, "RLIMIT_CORE", 0),
        (libc::RLIMIT_CPU, "RLIMIT_CPU", l.cpu_seconds),
    ];
    if let Some(bytes) = l.address_space_bytes {
        limits.push((libc::RLIMIT_AS, "RLIMIT_AS", bytes));
    }
    run.extend(
        limits
            .into_iter()
            .map(|(resource, name, value)| Op::Rlimit {
                resource: resource as i32,
                name: name.into(),
                value,
            }),
    );

    if start == Start::Exec {
        // Mapped while still root: the preferred page needs CAP_SYS_RAWIO.
        run.push(Op::MapExecPage {
            address: seccomp.exec_page(),
        });
    }
    // Rootless: the user namespace has setgroups disabled and no supplementary group
    // mapped, so there is nothing to drop.
    if spec.level != IsolationLevel::Rootless {
        run.push(Op::ClearGroups);
    }
    run.push(Op::SetGid { gid: spec.gid });
    run.push(Op::SetUid { uid: spec.uid });
    run.push(Op::Dumpable);
    // Changing credentials clears the parent-death signal: set it again.
    run.push(Op::ParentDeathSignal { signal: sigkill });
    run.push(Op::Chdir {
        path: spec.cwd().to_path_buf(),
    });
    run.push(Op::NoNewPrivs);
    run.push(Op::Seccomp {
        program: seccomp.get(spec.profile, spec.network, start).to_vec(),
    });
    run.push(match start {
        Start::Exec => Op::Exec {
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            path_address: seccomp.exec_page(),
        },
        Start::Fork => Op::Start {
            env: spec.env.clone(),
        },
    });
    Jail { owner, run }
}

/// The environment every run of `runtime` starts with, its home at `workdir`. The fork
/// server starts with it too: a forked run's /proc/self/environ is the fork server's.
pub fn base_env(workdir: &std::path::Path, runtime: &Runtime) -> Vec<String> {
    let mut env = vec![
        "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
        format!("HOME={}", workdir.display()),
        format!("TMPDIR={}", workdir.display()),
        "LANG=C.UTF-8".to_string(),
    ];
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
        start: Start,
    }

    impl Default for Case {
        fn default() -> Self {
            Self {
                level: IsolationLevel::Namespaces,
                language: Language::Python3,
                network: NetworkSetup::Offline,
                cgroup: true,
                start: Start::Exec,
            }
        }
    }

    /// The programs of each level, compiled once for all tests.
    fn programs(level: IsolationLevel) -> &'static Programs {
        use std::sync::OnceLock;
        static BY_LEVEL: OnceLock<Vec<(IsolationLevel, Programs)>> = OnceLock::new();
        let all = BY_LEVEL.get_or_init(|| {
            [
                IsolationLevel::Namespaces,
                IsolationLevel::Chroot,
                IsolationLevel::Rootless,
            ]
            .into_iter()
            .map(|l| (l, Programs::build(l, &[], &[309], 0xf008).expect("compile")))
            .collect()
        });
        &all.iter()
            .find(|(l, _)| *l == level)
            .expect("every level")
            .1
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
            seccomp: programs(c.level),
            start: c.start,
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
            ..Default::default()
        });
        assert_eq!(spec.root_dir, Path::new("/state/rootfs"));
        assert_eq!(spec.workdir, Path::new("/tmp"));
        assert!(env_has(&spec, "HOME=/tmp") && env_has(&spec, "TMPDIR=/tmp"));
        assert_eq!((spec.uid, spec.gid), (10007, 10007));
        assert_eq!(spec.limits.tmp_bytes, 8 << 20);
        assert_eq!(spec.limits.cpu_seconds, 7);
        assert_eq!(spec.limits.max_processes, 16);
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
            ..Default::default()
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
            ..Default::default()
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
            ..Default::default()
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
                ..Default::default()
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
            ..Default::default()
        });
        assert_eq!(spec.root_dir, Path::new("/state/rootfs"));
        assert_eq!(spec.limits.address_space_bytes, Some(128 << 20));
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
                ..Default::default()
            },
            &files,
        );
        assert_eq!(spec.cwd(), Path::new("/job"));
        assert_eq!(spec.workdir, Path::new("/tmp"), "HOME and TMPDIR stay /tmp");
        assert_eq!(spec.job_dir, files.job);
        assert_eq!(spec.out_dir, files.out);
        assert!(env_has(&spec, "SANDBOX_OUT=/tmp/out"));
    }

    use crate::isolation::jail::record::{PYTHON_RECORDER, Recorder};
    use crate::isolation::jail::{Descriptors, execute};

    /// The descriptors a run's process starts from (numbers as the recorders see them).
    fn start_fds(network: NetworkSetup) -> Descriptors {
        let mut fds = Descriptors::default();
        for (fd, n) in [
            (Fd::Stdin, 5),
            (Fd::Stdout, 1),
            (Fd::Stderr, 2),
            (Fd::Code, 6),
            (Fd::Error, 7),
        ] {
            fds.0.insert(fd, n);
        }
        if network == NetworkSetup::Own {
            fds.0.insert(Fd::Netns, 8);
        }
        fds
    }

    fn recorder() -> Recorder {
        let mut r = Recorder::default();
        // Host paths the plan binds that are files, and a /proc file this kernel lacks.
        r.files.insert("/dev/null".into());
        r.missing.insert("/dev/full".into());
        r.missing.insert("/state/rootfs/proc/timer_stats".into());
        r
    }

    fn record(jail: &Jail, network: NetworkSetup) -> (Recorder, Recorder) {
        let mut owner = recorder();
        execute(&jail.owner, &mut owner, &mut Descriptors::default()).expect("owner steps");
        let mut run = recorder();
        let _ = execute(&jail.run, &mut run, &mut start_fds(network));
        (owner, run)
    }

    fn position(names: &[String], name: &str) -> usize {
        names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no {name} in {names:?}"))
    }

    fn last_position(names: &[String], name: &str) -> usize {
        names
            .iter()
            .rposition(|n| n == name)
            .unwrap_or_else(|| panic!("no {name} in {names:?}"))
    }

    #[test]
    fn every_jail_takes_its_steps_in_a_safe_order() {
        for level in [
            IsolationLevel::Namespaces,
            IsolationLevel::Rootless,
            IsolationLevel::Chroot,
        ] {
            for network in [NetworkSetup::Offline, NetworkSetup::Own, NetworkSetup::Host] {
                for start in [Start::Exec, Start::Fork] {
                    if level == IsolationLevel::Chroot && network == NetworkSetup::Own {
                        continue;
                    }
                    let c = Case {
                        level,
                        network,
                        start,
                        cgroup: level != IsolationLevel::Rootless,
                        ..Default::default()
                    };
                    let spec = plan_for(c);
                    let (owner, run) = record(&spec.jail, network);
                    let o = owner.names();
                    let n = run.names();
                    let at = |name| position(&n, name);
                    let what = format!("{level:?} {network:?} {start:?}: {n:?}");
                    // The cgroup is joined before anything else, the pid namespace made
                    // by the owner (it applies to the run it forks).
                    if level != IsolationLevel::Rootless {
                        assert_eq!(o.first().map(String::as_str), Some("join_cgroup"), "{what}");
                    }
                    if level.private_root() {
                        assert_eq!(o.last().map(String::as_str), Some("unshare"), "{what}");
                        assert_eq!(owner.calls.last().unwrap()[1], libc::CLONE_NEWPID, "{what}");
                        assert!(at("unshare") < position(&n, "mount"), "{what}");
                        assert!(
                            last_position(&n, "mount") > at("pivot_root_here"),
                            "{what}: / is remounted read-only last"
                        );
                        assert!(at("pivot_root_here") < at("close_range"), "{what}");
                        assert_eq!(
                            n.iter().filter(|x| *x == "setns").count(),
                            usize::from(network == NetworkSetup::Own),
                            "{what}"
                        );
                    } else {
                        assert!(at("chroot") < at("close_range"), "{what}");
                    }
                    // Descriptors, then limits, then ids (groups, gid, uid), then
                    // no_new_privs and the filter, the start last of all.
                    assert!(at("setsid") < at("close_range"), "{what}");
                    assert!(at("close_range") < at("setrlimit"), "{what}");
                    assert!(last_position(&n, "setrlimit") < at("setresgid"), "{what}");
                    if level != IsolationLevel::Rootless {
                        assert!(at("clear_groups") < at("setresgid"), "{what}");
                    } else {
                        assert!(!n.contains(&"clear_groups".to_string()), "{what}");
                    }
                    assert!(at("setresgid") < at("setresuid"), "{what}");
                    assert!(
                        at("setresuid") < last_position(&n, "set_pdeathsig"),
                        "{what}"
                    );
                    assert!(at("setresuid") < at("no_new_privs"), "{what}");
                    assert!(at("no_new_privs") < at("seccomp"), "{what}");
                    let end = n.len() - 1;
                    match start {
                        Start::Exec => {
                            assert_eq!(n[end], "exec", "{what}");
                            assert_eq!(n[end - 1], "reset_sigpipe", "{what}");
                            assert_eq!(n[end - 2], "seccomp", "{what}");
                            assert!(at("open_read") < at("close_range"), "{what}");
                            assert!(
                                at("map_page") < at("setresuid"),
                                "{what}: the page below mmap_min_addr needs root"
                            );
                        }
                        Start::Fork => {
                            assert_eq!(n[end], "start", "{what}");
                            assert_eq!(n[end - 1], "seccomp", "{what}");
                            assert!(
                                !n.iter().any(|x| x == "open_read" || x == "map_page"),
                                "{what}"
                            );
                        }
                    }
                    // What survives: 0-3, the error pipe, the interpreter (exec only).
                    let kept: Vec<i64> = run
                        .calls
                        .iter()
                        .filter(|c| c[0] == "dup_to")
                        .map(|c| c[2].as_i64().unwrap())
                        .collect();
                    let mut expected = vec![0, 1, 2, 3, ERROR_FD as i64];
                    if start == Start::Exec {
                        expected.push(EXEC_FD as i64);
                    }
                    assert_eq!(kept, expected, "{what}");
                }
            }
        }
    }

    #[test]
    fn a_forked_runs_jail_differs_from_a_helpers_only_in_how_it_starts() {
        for network in [NetworkSetup::Offline, NetworkSetup::Own, NetworkSetup::Host] {
            let exec = plan_for(Case {
                network,
                start: Start::Exec,
                ..Default::default()
            })
            .jail;
            let fork = plan_for(Case {
                network,
                start: Start::Fork,
                ..Default::default()
            })
            .jail;
            assert_eq!(exec.owner, fork.owner);
            // Remove what only an exec needs; the rest must be the same list.
            let only_exec = |op: &Op| {
                matches!(
                    op,
                    Op::OpenProgram { .. } | Op::MapExecPage { .. } | Op::Exec { .. }
                )
            };
            let strip = |ops: &[Op]| -> Vec<Op> {
                ops.iter()
                    .filter(|op| !only_exec(op))
                    .map(|op| match op {
                        Op::Descriptors { keep, park } => Op::Descriptors {
                            keep: keep
                                .iter()
                                .filter(|k| k.fd != Fd::Program)
                                .copied()
                                .collect(),
                            park: *park,
                        },
                        Op::Seccomp { .. } => Op::Seccomp {
                            program: Vec::new(),
                        },
                        Op::Start { .. } => Op::Start { env: Vec::new() },
                        other => other.clone(),
                    })
                    .collect()
            };
            let mut e = strip(&exec.run);
            e.push(Op::Start { env: Vec::new() });
            assert_eq!(e, strip(&fork.run), "{network:?}");
            // The filters differ in exactly the exec they admit.
            let program = |ops: &[Op]| {
                ops.iter().find_map(|op| match op {
                    Op::Seccomp { program } => Some(program.clone()),
                    _ => None,
                })
            };
            assert_ne!(program(&exec.run), program(&fork.run));
            // The environment is the same.
            let env = exec.run.iter().find_map(|op| match op {
                Op::Exec { env, .. } => Some(env.clone()),
                _ => None,
            });
            let fork_env = fork.run.iter().find_map(|op| match op {
                Op::Start { env } => Some(env.clone()),
                _ => None,
            });
            assert_eq!(env, fork_env);
        }
    }

    #[test]
    fn the_fork_servers_executor_makes_the_rust_executors_calls() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let code = format!("{}\n{}", crate::engine::forkserver::JAIL, PYTHON_RECORDER);
        for network in [NetworkSetup::Offline, NetworkSetup::Own, NetworkSetup::Host] {
            let jail = plan_for(Case {
                network,
                start: Start::Fork,
                ..Default::default()
            })
            .jail;
            for (ops, fds) in [
                (&jail.owner, Descriptors::default()),
                (&jail.run, start_fds(network)),
            ] {
                let mut rust = recorder();
                let mut table = fds.clone();
                execute(ops, &mut rust, &mut table).expect("the recorder fails nothing");
                let request = serde_json::json!({
                    "ops": ops,
                    "fds": fds.0.iter().collect::<Vec<_>>(),
                    "files": rust.files,
                    "missing": rust.missing,
                });
                let mut child = Command::new("python3")
                    .args(["-I", "-S", "-c", &code])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("python3 is needed to check the fork server's executor");
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(request.to_string().as_bytes())
                    .expect("write");
                let out = child.wait_with_output().expect("python3");
                assert!(
                    out.status.success(),
                    "the Python executor failed: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
                let python: serde_json::Value =
                    serde_json::from_slice(&out.stdout).expect("the calls as JSON");
                let rust = serde_json::Value::Array(rust.calls);
                if python != rust {
                    let (p, r) = (python.as_array().unwrap(), rust.as_array().unwrap());
                    let first = p
                        .iter()
                        .zip(r)
                        .position(|(a, b)| a != b)
                        .unwrap_or(p.len().min(r.len()));
                    panic!(
                        "{network:?}: the executors part at call {first}: python {:?}, rust {:?}",
                        p.get(first),
                        r.get(first)
                    );
                }
            }
        }
    }
}
