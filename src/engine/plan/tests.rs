//! The plan case by case, and the order of every jail's steps.
use std::path::Path;
use std::time::Duration;

use super::steps::{ERROR_FD, EXEC_FD};
use super::*;
use crate::isolation::jail::{Fd, Op};
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
        readonly_beneath: true,
        files,
        packages: None,
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
        (Fd::Status, 9),
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
                // The init forks off once the descriptors and limits are set, before
                // the run drops its ids and loads its filter (which refuses processes).
                // Early, while the process is small, and in the run's namespaces.
                assert!(at("fork_init") < at("close_range"), "{what}");
                if level.private_root() {
                    assert!(at("sethostname") < at("fork_init"), "{what}");
                    assert!(at("fork_init") < position(&n, "mount"), "{what}");
                } else {
                    assert!(at("chroot") < at("fork_init"), "{what}");
                }
                let init = &run.calls[at("fork_init")];
                assert_eq!(init[1], 9, "{what}: the init keeps its status pipe");
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
