//! One jail, proven the same on every path. One probe (`tests/probes/jail_probe.py`, and
//! its Node twin `jail_probe.js`) reports what a run can observe of its jail: ids and
//! groups, capabilities, no_new_privs, seccomp, every rlimit, its mounts, namespaces,
//! cgroup, the masked /proc paths, environment, working directory, umask, descriptors,
//! signal dispositions, hostname, /etc/passwd and /etc/resolv.conf, its own pid. While
//! the probe waits, the test reads the same process from the host (`/proc/<pid>`): what
//! the kernel says of it, whatever /proc the run itself is shown.
//!
//! It runs on every path (the Python plain worker, the Python fork server, Node, the
//! chroot level, the rootless level), two runs at a time on each, and compares every
//! path with the plain Python worker's jail: the differences must be exactly those of
//! `EXPECTED` below, each with its reason. Any other difference fails with a diff, and
//! so does an entry of `EXPECTED` that no longer shows. Properties every jail must have
//! whatever the table says (not root, no capability, no_new_privs, a seccomp filter,
//! private namespaces, masked /proc paths, no stray descriptor) are asserted apart.
//!
//! ```text
//! cargo test --test jail_equivalence -- --nocapture   # prints every path's report
//! ```

#![cfg(target_os = "linux")]

mod common;
common::needs_root!();

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::{Map, Value, json};

/// A difference between a path's jail and the baseline's (the plain Python worker's).
/// `field` is a key of the flattened report (printed with `--nocapture`); a `*` matches
/// any run of characters. `run.` keys are what the run observes from inside, `host.`
/// keys what the host reads of its process.
struct Expected {
    field: &'static str,
    paths: &'static [&'static str],
    why: &'static str,
}

/// The path every other one is compared with.
const BASELINE: &str = "python";

const NODE: &[&str] = &["node", "node-chroot", "node-rootless"];
const CHROOT: &[&str] = &["python-chroot", "node-chroot"];
/// Node's paths with a root of their own (mounts).
const NODE_MOUNTING: &[&str] = &["node", "node-rootless"];
const ROOTLESS: &[&str] = &["python-rootless", "node-rootless"];

/// Every documented difference from the baseline. Keep it exact: an entry that no longer
/// matches a difference on one of its paths fails the test as well.
const EXPECTED: &[Expected] = &[
    // The fork server's runs.
    Expected {
        field: "*.fds[255]",
        paths: &["python-forked"],
        why: "a forked Python run announces its end (its output closed, its exit status) on \
              its highest descriptor, so the answer need not wait for the interpreter's \
              teardown; Node keeps the same channel on fd 3, a plain Python run has none",
    },
    // Node's own runtime and root.
    Expected {
        field: "*.status[Sig*]",
        paths: NODE,
        why: "Node's runtime installs its own signal handlers (SIGINT, SIGTERM, SIGCHLD, ...) \
              and ignores SIGPIPE: interpreter behaviour after exec, not the jail's",
    },
    Expected {
        field: "*.fds[*]",
        paths: NODE,
        why: "libuv keeps its own descriptors (epoll, eventfd, signal pipes, a reserve on \
              /dev/null), marks stdio close-on-exec, and the bootstrap keeps fd 3 to announce \
              the run's end (see `absolute` for the kinds allowed)",
    },
    Expected {
        field: "*.env*[SSL_CERT_FILE]",
        paths: NODE,
        why: "Node is pointed at the host's CA bundle (runtime/nodejs.rs)",
    },
    Expected {
        field: "*.mounts[/usr/*]",
        paths: NODE,
        why: "each language's root binds its own interpreter's files",
    },
    Expected {
        field: "*.mounts[<state>/python-packages/current]",
        paths: NODE,
        why: "each language's runs bind their own live package generation: Python's on its search path",
    },
    Expected {
        field: "*.mounts[/node_modules]",
        paths: NODE_MOUNTING,
        why: "each language's runs bind their own live package generation: Node's where its resolution looks",
    },
    Expected {
        field: "run.root",
        paths: &["node", "node-rootless"],
        why: "no /var in Node's root: it held the Python packages' mount point",
    },
    // The chroot level: chroot + setuid + seccomp, no namespaces, no mounts, no /proc.
    Expected {
        field: "host.ns[*]",
        paths: CHROOT,
        why: "the chroot level makes no namespaces: every one is the server's",
    },
    Expected {
        field: "host.status[NSpid]",
        paths: CHROOT,
        why: "no pid namespace at the chroot level: the run is not pid 2 (its init's child)",
    },
    // What a run reads in /proc: the chroot root has none, so each reading fails; the
    // host's view (host.*) shows what it would.
    Expected {
        field: "run.status*",
        paths: CHROOT,
        why: "no /proc in the chroot root",
    },
    Expected {
        field: "run.mounts*",
        paths: CHROOT,
        why: "no /proc in the chroot root",
    },
    Expected {
        field: "run.ns*",
        paths: CHROOT,
        why: "no /proc in the chroot root",
    },
    Expected {
        field: "run.cgroup",
        paths: CHROOT,
        why: "no /proc in the chroot root",
    },
    Expected {
        field: "run.fds*",
        paths: CHROOT,
        why: "no /proc in the chroot root",
    },
    Expected {
        field: "run.proc *",
        paths: CHROOT,
        why: "no /proc in the chroot root",
    },
    Expected {
        field: "run.uid_map",
        paths: CHROOT,
        why: "no /proc in the chroot root",
    },
    Expected {
        field: "run.environ*",
        paths: CHROOT,
        why: "no /proc in the chroot root",
    },
    Expected {
        field: "run.masked[*]",
        paths: CHROOT,
        why: "no /proc in the chroot root: nothing of it to mask",
    },
    Expected {
        field: "host.masked[*]",
        paths: CHROOT,
        why: "no /proc in the chroot root: nothing of it to mask",
    },
    Expected {
        field: "host.mounts[*]",
        paths: CHROOT,
        why: "no mount namespace: the host sees the server's mount table below the chroot",
    },
    Expected {
        field: "run.rlimits*",
        paths: &["node-chroot"],
        why: "Node reads its rlimits from /proc/self/limits (the host's view has them)",
    },
    Expected {
        field: "run.ids[res *]",
        paths: &["node-chroot"],
        why: "Node reads its saved ids from /proc/self/status: real and effective only",
    },
    // The rest of the chroot level's jail.
    Expected {
        field: "run.cwd",
        paths: CHROOT,
        why: "no private /tmp without mounts: the run works in /tmp/run-<uid>, a directory \
              only its uid can enter",
    },
    Expected {
        field: "*.env*[HOME]",
        paths: CHROOT,
        why: "HOME is the run's directory, /tmp/run-<uid>",
    },
    Expected {
        field: "*.env*[TMPDIR]",
        paths: CHROOT,
        why: "TMPDIR is the run's directory, /tmp/run-<uid>",
    },
    Expected {
        field: "run.umask",
        paths: CHROOT,
        why: "umask 077: what a run creates stays its own in the shared root (helper.rs)",
    },
    Expected {
        field: "run.hostname",
        paths: CHROOT,
        why: "no UTS namespace: the host's name",
    },
    Expected {
        field: "run.passwd[*]",
        paths: CHROOT,
        why: "the copied root's /etc/passwd is shared by every run (no mount to give each its \
              own): root only",
    },
    Expected {
        field: "run.root",
        paths: CHROOT,
        why: "the copied root: its marker file, no /proc",
    },
    // The rootless level: a user namespace per run, one uid mapped, no cgroups.
    Expected {
        field: "host.ns[user]",
        paths: ROOTLESS,
        why: "each rootless run makes its own user namespace",
    },
    Expected {
        field: "*.uid_map",
        paths: ROOTLESS,
        why: "a rootless run's namespace maps one uid: its pool uid to the server's",
    },
    Expected {
        field: "host.status[Uid]",
        paths: ROOTLESS,
        why: "seen from the host a rootless run has the server's uid (nobody), the only one \
              it may map",
    },
    Expected {
        field: "host.status[Gid]",
        paths: ROOTLESS,
        why: "likewise its gid: the server's",
    },
    Expected {
        field: "*.status[CapBnd]",
        paths: ROOTLESS,
        why: "a new user namespace starts with a full bounding set where the root levels \
              inherit the host's; the run holds no capability either way (CapPrm/CapEff 0)",
    },
    Expected {
        field: "*.cgroup",
        paths: ROOTLESS,
        why: "without root there is no cgroup of the run's own: rlimits stand in for it",
    },
    Expected {
        field: "*.rlimits[as]",
        paths: &["python-rootless"],
        why: "without a memory cgroup Python's memory is bounded by RLIMIT_AS (Node's by its \
              heap limit)",
    },
    Expected {
        field: "run.root",
        paths: ROOTLESS,
        why: "the rootless state directory (the packages' mount point) lies under the \
              user's home in /tmp here, not /var",
    },
];

const TOKEN_PREFIX: &str = "jail-probe-";

/// One way a run is started.
struct RunPath {
    name: &'static str,
    language: &'static str,
    level: Level,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Level {
    Plain,
    Forked,
    Chroot,
    Rootless,
}

const PATHS: &[RunPath] = &[
    RunPath {
        name: "python",
        language: "python3",
        level: Level::Plain,
    },
    RunPath {
        name: "python-forked",
        language: "python3",
        level: Level::Forked,
    },
    RunPath {
        name: "node",
        language: "nodejs",
        level: Level::Forked,
    },
    RunPath {
        name: "python-chroot",
        language: "python3",
        level: Level::Chroot,
    },
    RunPath {
        name: "node-chroot",
        language: "nodejs",
        level: Level::Chroot,
    },
    RunPath {
        name: "python-rootless",
        language: "python3",
        level: Level::Rootless,
    },
    RunPath {
        name: "node-rootless",
        language: "nodejs",
        level: Level::Rootless,
    },
];

/// Namespaces a jail with namespaces makes for each offline run.
const PRIVATE_NS: &[&str] = &["ipc", "mnt", "net", "pid", "uts"];

const NOBODY: u32 = 65534;
const POOL: std::ops::Range<u64> = 10000..11000;

#[tokio::test(flavor = "multi_thread")]
async fn every_path_jails_a_run_the_same_way() {
    let started = Instant::now();
    let masked = masked_proc_names();
    let chroot_state = tempfile::Builder::new()
        .prefix("sandbox-equiv-chroot-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let home = tempfile::Builder::new()
        .prefix("sandbox-equiv-home-")
        .tempdir_in("/tmp")
        .unwrap();
    std::os::unix::fs::chown(home.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let home_dir = home.path().to_str().unwrap().to_string();
    // State directories: each is shown as <state> in the reports.
    let root_state = "/var/lib/sandbox".to_string();
    let chroot_dir = chroot_state.path().to_str().unwrap().to_string();
    let rootless_state = format!("{home_dir}/state");
    // The same interpreters on every path (nobody may not reach the test's own ones).
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut env = vec![
            ("PYTHON_PATH", "/usr/bin/python3"),
            ("NODEJS_PATH", "/usr/bin/node"),
        ];
        env.extend_from_slice(extra);
        env
    };
    let mut chroot_env = with(&[("SANDBOX_ISOLATION", "chroot")]);
    chroot_env.push(("SANDBOX_STATE_DIR", &chroot_dir));
    let mut rootless_env = with(&[]);
    rootless_env.extend([
        ("HOME", home_dir.as_str()),
        ("SANDBOX_STATE_DIR", &rootless_state),
    ]);
    // Explicit both ways: CI runs some suites with PYTHON_FORK_SERVER=false in the
    // environment the servers inherit.
    let plain_env = with(&[("PYTHON_FORK_SERVER", "false")]);
    let forked_env = with(&[("PYTHON_FORK_SERVER", "true")]);
    let (plain, forked, chroot, rootless) = tokio::join!(
        Server::start(&plain_env),
        Server::start(&forked_env),
        Server::start(&chroot_env),
        Server::start_as(NOBODY, &rootless_env),
    );
    let server_of = |level: Level| match level {
        Level::Plain => (&plain, &root_state),
        Level::Forked => (&forked, &root_state),
        Level::Chroot => (&chroot, &chroot_dir),
        Level::Rootless => (&rootless, &rootless_state),
    };

    let mut reports: BTreeMap<&str, BTreeMap<String, String>> = BTreeMap::new();
    let mut failures = Vec::new();
    for path in PATHS {
        let (server, state) = server_of(path.level);
        let (a, b) = tokio::join!(
            probe(server, path.language, &masked),
            probe(server, path.language, &masked)
        );
        let server_ns = namespaces_of(server.pid());
        let server_cgroup = read(&format!("/proc/{}/cgroup", server.pid()));
        let host = Host {
            ns: &server_ns,
            cgroup: &server_cgroup,
            pid: server.pid(),
            state,
        };
        let flat_a = normalise(&a, &b, &host);
        let flat_b = normalise(&b, &a, &host);
        println!("== {} ==", path.name);
        for (k, v) in &flat_a {
            println!("  {k} = {v}");
        }
        for line in diff(&flat_a, &flat_b) {
            failures.push(format!(
                "{}: two runs on the same path differ: {line}",
                path.name
            ));
        }
        for (o, flat) in [(&a, &flat_a), (&b, &flat_b)] {
            for found in absolute(path, o, flat, &masked) {
                let line = format!("{}: {found}", path.name);
                if !failures.contains(&line) {
                    failures.push(line);
                }
            }
        }
        reports.insert(path.name, flat_a);
    }
    failures.extend(compare(&reports));
    println!("took {:?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "the jails differ from the documented list:\n{}",
        failures.join("\n")
    );
}

/// The masked /proc paths, read from the source that masks them, so the list cannot
/// drift from it.
fn masked_proc_names() -> Vec<String> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut names = Vec::new();
    let mut stack = vec![src];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            for list in ["MASKED_PROC_FILES", "MASKED_PROC_DIRS"] {
                let Some(at) = text.find(&format!("const {list}: &[&str] = &[")) else {
                    continue;
                };
                let body = &text[at..];
                let body = &body[body.find("&[").unwrap() + 2..body.find("];").unwrap()];
                names.extend(body.split('"').skip(1).step_by(2).map(str::to_string));
            }
        }
    }
    assert!(
        names.len() > 5,
        "MASKED_PROC_FILES / MASKED_PROC_DIRS not found under src/: {names:?}"
    );
    names.sort();
    names
}

/// One probe run: what it printed, and the host's reading of its process.
struct Observed {
    run: Value,
    host: Value,
}

/// Runs the probe and reads its process from the host while it waits.
async fn probe(server: &Server, language: &str, masked: &[String]) -> Observed {
    static PROBES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let token = format!("{TOKEN_PREFIX}{}-{n}", std::process::id());
    let source = match language {
        "python3" => include_str!("probes/jail_probe.py"),
        _ => include_str!("probes/jail_probe.js"),
    };
    let code = source
        .replace("__TOKEN__", &token)
        .replace("__MASKED__", &serde_json::to_string(masked).unwrap());
    let run =
        server.spawn_run(json!({"language": language, "code": code, "enable_network": false}));
    let deadline = Instant::now() + Duration::from_secs(20);
    let (pid, marker) = loop {
        if let Some(found) = holder_of(&token, server.pid()) {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "{language}: no process of the server holds the probe's file {token}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let host = host_view(pid, &token, masked);
    // Written through the probe's own descriptor (nothing is created in the run's
    // filesystem, where the host's root may have no uid): the probe may end now.
    std::fs::write(&marker, "done").unwrap_or_else(|e| panic!("writing {marker:?}: {e}"));
    let body = run.await.unwrap();
    assert_eq!(body["code"], 0, "{language}: {body}");
    let data = &body["data"];
    assert_eq!(data["error"], "", "{language}: {data}");
    let stdout = data["stdout"].as_str().unwrap_or_default();
    let run: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{language}: the probe's report is not JSON ({e}): {data}"));
    Observed { run, host }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The process below `server` that holds a file named `token` open, and that
/// descriptor's link in /proc.
fn holder_of(token: &str, server: u32) -> Option<(u32, std::path::PathBuf)> {
    let mut parent = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = read(&format!("/proc/{pid}/stat"));
        if let Some(ppid) = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok())
        {
            parent.insert(pid, ppid);
        }
    }
    let below = |mut pid: u32| {
        while let Some(&up) = parent.get(&pid) {
            if up == server {
                return true;
            }
            pid = up;
        }
        false
    };
    parent
        .keys()
        .copied()
        .filter(|&p| below(p))
        .find_map(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .find(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|t| t.file_name().is_some_and(|n| n == token))
                })
                .map(|fd| (pid, fd.path()))
        })
}

fn namespaces_of(pid: u32) -> BTreeMap<String, String> {
    std::fs::read_dir(format!("/proc/{pid}/ns"))
        .unwrap()
        .flatten()
        .map(|e| {
            let link = std::fs::read_link(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                link.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

/// What the host reads of the run's process: the kernel's own account, whatever the
/// run is shown.
fn host_view(pid: u32, token: &str, masked: &[String]) -> Value {
    let mut status = Map::new();
    for line in read(&format!("/proc/{pid}/status")).lines() {
        let (k, v) = line.split_once(':').unwrap_or((line, ""));
        if [
            "Uid",
            "Gid",
            "Groups",
            "CapInh",
            "CapPrm",
            "CapEff",
            "CapBnd",
            "CapAmb",
            "NoNewPrivs",
            "Seccomp",
            "Seccomp_filters",
            "SigBlk",
            "SigIgn",
            "SigCgt",
            "NSpid",
        ]
        .contains(&k)
        {
            let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
            status.insert(k.to_string(), Value::String(v));
        }
    }
    let mut rlimits = Map::new();
    for line in read(&format!("/proc/{pid}/limits")).lines().skip(1) {
        let (name, rest) = line.split_at(26.min(line.len()));
        let values: Vec<&str> = rest.split_whitespace().take(2).collect();
        if let Some(short) = rlimit_name(name.trim()) {
            rlimits.insert(short.to_string(), Value::String(values.join(" ")));
        }
    }
    let mut fds = Map::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if target.ends_with(token) {
            continue; // the probe's marker, opened after its own readings
        }
        let n = fd.file_name().to_string_lossy().into_owned();
        let flags = read(&format!("/proc/{pid}/fdinfo/{n}"))
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            .map(|v| {
                let mode = ["r", "w", "rw", "?"][(v & 3) as usize];
                let cloexec = if v & 0o2000000 != 0 { ",cloexec" } else { "" };
                format!("{mode}{cloexec}")
            })
            .unwrap_or_else(|| "?".into());
        fds.insert(n, Value::String(format!("{} {flags}", fd_kind(&target))));
    }
    let ns: Map<String, Value> = namespaces_of(pid)
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    json!({
        "status": status,
        "rlimits": rlimits,
        "fds": fds,
        "ns": ns,
        "cgroup": read(&format!("/proc/{pid}/cgroup")).lines().collect::<Vec<_>>(),
        "uid_map": read(&format!("/proc/{pid}/uid_map")).split_whitespace().collect::<Vec<_>>(),
        "mounts": mounts(&read(&format!("/proc/{pid}/mountinfo"))),
        // Root's while the process is not dumpable: its /proc files are then closed to it.
        "dumpable": proc_owner(pid),
        "masked": masked_from_host(pid, masked),
        "environ": environ(&std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default()),
    })
}

/// Whose the process's private /proc files are (/proc/<pid>/environ, mode 0400): its
/// own uid's while it is dumpable, root's once it is not.
fn proc_owner(pid: u32) -> String {
    use std::os::unix::fs::MetadataExt;
    let uid = read(&format!("/proc/{pid}/status"))
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next()?.parse::<u32>().ok());
    match std::fs::metadata(format!("/proc/{pid}/environ")) {
        Ok(m) if Some(m.uid()) == uid => "the run's uid".into(),
        Ok(m) => format!("uid {}", m.uid()),
        Err(e) => format!("unreadable: {e}"),
    }
}

/// Mount point, fs type and the flags that matter, as the probes list them.
fn mounts(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .map(|line| {
            let (left, right) = line.split_once(" - ").unwrap_or((line, ""));
            let f: Vec<&str> = left.split(' ').collect();
            let fstype = right.split(' ').next().unwrap_or("");
            let flags: Vec<&str> = (f.get(5).unwrap_or(&"").split(','))
                .filter(|o| ["ro", "rw", "nosuid", "nodev", "noexec"].contains(o))
                .collect();
            format!("{} {fstype} {}", f.get(4).unwrap_or(&""), flags.join(","))
        })
        .collect()
}

/// The masked /proc paths as the run's root shows them, read through /proc/<pid>/root.
fn masked_from_host(pid: u32, masked: &[String]) -> Value {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = Map::new();
    for name in masked {
        let p = format!("/proc/{pid}/root/proc/{name}");
        let shown = match std::fs::symlink_metadata(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "absent".to_string(),
            Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(0)),
            Ok(m) if m.file_type().is_char_device() && m.rdev() == libc_makedev(1, 3) => {
                "null device".into()
            }
            Ok(m) if m.is_dir() => match std::fs::read_dir(&p).map(|mut d| d.next().is_none()) {
                Ok(true) => "empty dir".into(),
                Ok(false) => "listable dir".into(),
                Err(e) => format!("dir, errno {}", e.raw_os_error().unwrap_or(0)),
            },
            Ok(_) => "exposed".into(),
        };
        out.insert(name.clone(), Value::String(shown));
    }
    Value::Object(out)
}

/// makedev(3) for the small numbers used here.
fn libc_makedev(major: u64, minor: u64) -> u64 {
    (major << 8) | minor
}

/// An environment block (NUL-separated `NAME=value`) by name.
fn environ(block: &[u8]) -> Value {
    let mut out = Map::new();
    for entry in block.split(|&b| b == 0).filter(|e| !e.is_empty()) {
        let entry = String::from_utf8_lossy(entry);
        let (k, v) = entry.split_once('=').unwrap_or((&entry, ""));
        out.insert(k.to_string(), Value::String(v.to_string()));
    }
    Value::Object(out)
}

fn rlimit_name(row: &str) -> Option<&'static str> {
    Some(match row {
        "Max cpu time" => "cpu",
        "Max file size" => "fsize",
        "Max data size" => "data",
        "Max stack size" => "stack",
        "Max core file size" => "core",
        "Max resident set" => "rss",
        "Max processes" => "nproc",
        "Max open files" => "nofile",
        "Max locked memory" => "memlock",
        "Max address space" => "as",
        "Max file locks" => "locks",
        "Max pending signals" => "sigpending",
        "Max msgqueue size" => "msgqueue",
        "Max nice priority" => "nice",
        "Max realtime priority" => "rtprio",
        "Max realtime timeout" => "rttime",
        _ => return None,
    })
}

/// A descriptor's kind as the probes name it: pipe, socket, anon_inode:[...], or its path.
fn fd_kind(target: &str) -> String {
    for kind in ["pipe", "socket"] {
        if target.starts_with(&format!("{kind}:")) {
            return kind.to_string();
        }
    }
    if target.starts_with("anon_inode:") && target.contains('[') {
        return format!("{}]", target.split(']').next().unwrap_or(target));
    }
    target.to_string()
}

/// The report with what legitimately differs from run to run replaced by what it means
/// (a namespace id by whose it is, a pool uid by `<uid>`, a pid by whether it is 1),
/// flattened to `view.section[key] = value`. `twin` is the other run of the same path.
fn normalise(me: &Observed, twin: &Observed, server: &Host) -> BTreeMap<String, String> {
    let (server_ns, server_cgroup, server_pid) = (server.ns, server.cgroup, server.pid);
    let mut run = me.run.clone();
    let mut host = me.host.clone();
    // Namespaces: the host's view by whose they are; the run's by whether they are the
    // ones the host sees it in.
    if let Some(ns) = host["ns"].as_object_mut() {
        for (name, id) in ns.iter_mut() {
            let twin_id = &twin.host["ns"][name];
            let class = if server_ns.get(name) == id.as_str().map(str::to_string).as_ref() {
                "the server's"
            } else if twin_id == id {
                "shared by runs"
            } else {
                "own"
            };
            *id = json!(class);
        }
    }
    if let Some(ns) = run["ns"].as_object_mut() {
        for (name, id) in ns.iter_mut() {
            let class = if me.host["ns"][name] == *id {
                "as the host sees the run"
            } else if server_ns.get(name).map(String::as_str) == id.as_str() {
                "the server's"
            } else {
                "another process's"
            };
            *id = json!(class);
        }
    }
    // Cgroups: the server's path and the run's leaf by name.
    let cgroup = |lines: &Value| -> Value {
        let lines = lines.as_array().cloned().unwrap_or_default();
        let mut out = Vec::new();
        for line in lines.iter().filter_map(Value::as_str) {
            let mut parts = line.splitn(3, ':');
            let (h, c, path) = (
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
            );
            let theirs = server_cgroup
                .lines()
                .find_map(|l| {
                    let mut p = l.splitn(3, ':');
                    let (sh, sc) = (p.next()?, p.next()?);
                    (sh == h && sc == c).then(|| p.next().unwrap_or("").to_string())
                })
                .unwrap_or_default();
            let mut path = path.to_string();
            let leaf_prefix = format!("sandbox-run-{server_pid}-");
            if let Some(at) = path.rfind('/')
                && path[at + 1..].starts_with(&leaf_prefix)
            {
                path = format!("{}/<the run's cgroup>", &path[..at]);
            }
            if !theirs.is_empty() && path.starts_with(&theirs) && theirs != "/" {
                path = format!("<the server's>{}", &path[theirs.len()..]);
            } else if path == theirs {
                path = "<the server's>".into();
            }
            out.push(Value::String(format!("{h}:{c}:{path}")));
        }
        Value::Array(out)
    };
    if run["cgroup"].is_array() {
        run["cgroup"] = cgroup(&run["cgroup"]);
    }
    host["cgroup"] = cgroup(&host["cgroup"]);
    // Pids: only whether the run is pid 1 or 2 of its namespace counts (its init is 1).
    let pidish = |v: &Value| match v.as_u64() {
        Some(n @ (1 | 2)) => json!(n),
        _ => json!("<pid>"),
    };
    if run["proc self"].is_object() {
        let own = run["proc self"]["pid"].clone();
        let link = run["proc self"]["/proc/self"].as_str().unwrap_or("");
        run["proc self"]["/proc/self"] =
            if own.as_u64().map(|p| p.to_string()).as_deref() == Some(link) {
                json!("its own pid")
            } else {
                json!("another pid")
            };
        run["proc self"]["pid"] = pidish(&own);
    }
    if let Some(pids) = run["proc pids"].as_array() {
        let summary = match pids
            .iter()
            .map(|p| p.as_u64())
            .collect::<Vec<_>>()
            .as_slice()
        {
            [Some(1)] => "only 1",
            p if p.contains(&Some(1)) => "1 and others",
            _ => "not 1",
        };
        run["proc pids"] = json!(summary);
    }
    for status in [&mut run["status"], &mut host["status"]] {
        if let Some(nspid) = status["NSpid"].as_str() {
            let tokens: Vec<&str> = nspid.split(' ').collect();
            let shown: Vec<&str> = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    if i + 1 == tokens.len() && (*t == "1" || *t == "2") {
                        t
                    } else {
                        "<pid>"
                    }
                })
                .collect();
            status["NSpid"] = json!(shown.join(" "));
        }
    }
    let mut flat = BTreeMap::new();
    flatten("run", &run, &mut flat);
    flatten("host", &host, &mut flat);
    // Pool uids (the run's uid differs from run to run), the directories named by them,
    // and the server's state directory.
    let text = |t: &str| pool_uids(&t.replace(server.state.as_str(), "<state>"));
    flat.into_iter()
        .map(|(k, v)| (text(&k), text(&v)))
        .collect()
}

/// The server a run came from, as its runs' reports are normalised against.
struct Host<'a> {
    ns: &'a BTreeMap<String, String>,
    cgroup: &'a str,
    pid: u32,
    state: &'a String,
}

/// `run-10042` and a bare 10042 (a pool uid) shown as `<uid>`.
fn pool_uids(text: &str) -> String {
    let mut out = String::new();
    let mut digits = String::new();
    let flush = |digits: &mut String, out: &mut String| {
        if digits.parse::<u64>().is_ok_and(|n| POOL.contains(&n)) {
            out.push_str("<uid>");
        } else {
            out.push_str(digits);
        }
        digits.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
        } else {
            flush(&mut digits, &mut out);
            out.push(c);
        }
    }
    flush(&mut digits, &mut out);
    out
}

/// `view.section = value` for leaves; `view.section[key] = value` one level down (the
/// mount table by mount point, stacked mounts joined by ` + `).
fn flatten(view: &str, report: &Value, into: &mut BTreeMap<String, String>) {
    let Some(sections) = report.as_object() else {
        into.insert(view.to_string(), show(report));
        return;
    };
    for (section, value) in sections {
        let key = format!("{view}.{section}");
        match value {
            Value::Object(m) => {
                for (k, v) in m {
                    into.insert(format!("{key}[{k}]"), show(v));
                }
            }
            Value::Array(lines) if section == "mounts" => {
                let mut by_point: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for line in lines.iter().filter_map(Value::as_str) {
                    let (point, rest) = line.split_once(' ').unwrap_or((line, ""));
                    by_point
                        .entry(point.to_string())
                        .or_default()
                        .push(rest.to_string());
                }
                for (point, stack) in by_point {
                    into.insert(format!("{key}[{point}]"), stack.join(" + "));
                }
            }
            v => {
                into.insert(key, show(v));
            }
        }
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// `key: a -> b` for every key whose value differs (or is missing on one side).
fn diff(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let missing = "<missing>".to_string();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (a.get(k).unwrap_or(&missing), b.get(k).unwrap_or(&missing));
            (x != y).then(|| format!("{k}: {x}  ->  {y}"))
        })
        .collect()
}

/// `*` matches any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            text.starts_with(head)
                && (0..=text.len() - head.len())
                    .filter(|&i| text.is_char_boundary(head.len() + i))
                    .any(|i| glob(tail, &text[head.len() + i..]))
        }
    }
}

/// Every path against the baseline: each difference needs an entry of `EXPECTED` naming
/// its field and path, and each entry must still match a difference on each of its paths.
fn compare(reports: &BTreeMap<&str, BTreeMap<String, String>>) -> Vec<String> {
    let mut failures = Vec::new();
    let base = &reports[BASELINE];
    let mut used: BTreeSet<(usize, &str)> = BTreeSet::new();
    for (&path, report) in reports {
        if path == BASELINE {
            continue;
        }
        let mut undocumented = String::new();
        let keys: BTreeSet<&String> = base.keys().chain(report.keys()).collect();
        let missing = "<missing>".to_string();
        for k in keys {
            let (b, p) = (
                base.get(k).unwrap_or(&missing),
                report.get(k).unwrap_or(&missing),
            );
            if b == p {
                continue;
            }
            let entries: Vec<usize> = (0..EXPECTED.len())
                .filter(|&i| EXPECTED[i].paths.contains(&path) && glob(EXPECTED[i].field, k))
                .collect();
            if entries.is_empty() {
                let _ = writeln!(
                    undocumented,
                    "    {k}\n      {BASELINE}: {b}\n      {path}: {p}"
                );
            } else {
                println!("documented: {path}: {k}: {b}  ->  {p}");
            }
            used.extend(entries.into_iter().map(|i| (i, path)));
        }
        if !undocumented.is_empty() {
            failures.push(format!(
                "{path}: undocumented differences from {BASELINE}:\n{undocumented}"
            ));
        }
    }
    for (i, e) in EXPECTED.iter().enumerate() {
        for &path in e.paths {
            assert!(
                reports.contains_key(path),
                "EXPECTED names an unknown path {path}"
            );
            if !used.contains(&(i, path)) {
                failures.push(format!(
                    "{path}: documented difference no longer seen: {} ({})",
                    e.field, e.why
                ));
            }
        }
    }
    failures
}

/// What every jail must have, whatever `EXPECTED` says. Read from the host where the
/// run cannot see it (the chroot level has no /proc), and from inside where it can.
fn absolute(
    path: &RunPath,
    o: &Observed,
    flat: &BTreeMap<String, String>,
    masked: &[String],
) -> Vec<String> {
    let mut bad = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            bad.push(what);
        }
    };
    let st = &o.host["status"];
    let field = |k: &str| st[k].as_str().unwrap_or("").to_string();
    for k in ["Uid", "Gid"] {
        let ids = field(k);
        check(
            !ids.is_empty() && ids.split(' ').all(|id| id != "0"),
            format!("host: {k} is root somewhere: {ids:?}"),
        );
    }
    let uid = &o.run["ids"]["res uid"];
    check(
        uid.as_array().is_some_and(|ids| {
            !ids.is_empty()
                && ids
                    .iter()
                    .all(|id| id.as_u64().is_some_and(|n| POOL.contains(&n)))
        }),
        format!("run: uids are not one pool uid: {uid}"),
    );
    check(
        o.run["ids"]["groups"] == json!([]),
        format!("run: supplementary groups: {}", o.run["ids"]["groups"]),
    );
    for cap in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        check(
            field(cap) == "0000000000000000",
            format!("host: {cap} is {:?}", field(cap)),
        );
    }
    check(
        field("NoNewPrivs") == "1",
        format!("host: NoNewPrivs {:?}", field("NoNewPrivs")),
    );
    check(
        field("Seccomp") == "2",
        format!("host: Seccomp {:?}", field("Seccomp")),
    );
    check(
        field("Seccomp_filters")
            .parse::<u32>()
            .is_ok_and(|n| n >= 1),
        format!("host: Seccomp_filters {:?}", field("Seccomp_filters")),
    );
    if path.level != Level::Chroot {
        // Different from the server's and from the other run's, seen from the host.
        for ns in PRIVATE_NS {
            let class = flat.get(&format!("host.ns[{ns}]"));
            check(
                class.is_some_and(|c| c == "own"),
                format!("host: the {ns} namespace is not the run's own: {class:?}"),
            );
        }
        // Pid 1 is the run's init; the run is its child, an ordinary process.
        let is_pid2 = field("NSpid").split(' ').next_back() == Some("2");
        check(
            is_pid2,
            format!(
                "host: not pid 2 of its namespace (the child of its init): NSpid {:?}",
                field("NSpid")
            ),
        );
        // Inside and through /proc/<pid>/root: absent only where the host lacks it too.
        for name in masked {
            let exists = std::path::Path::new("/proc").join(name).exists();
            for view in ["run", "host"] {
                let shown = flat.get(&format!("{view}.masked[{name}]"));
                let shown = shown.map_or("unread", String::as_str);
                check(
                    matches!(shown, "null device" | "empty dir") || (!exists && shown == "absent"),
                    format!("{view}: /proc/{name} is not masked: {shown}"),
                );
            }
        }
    } else {
        check(
            o.run["root"]
                .as_array()
                .is_some_and(|r| !r.contains(&json!("proc"))),
            format!("run: the chroot root has a /proc: {}", o.run["root"]),
        );
    }
    // Descriptors: stdin, stdout, stderr; Node's event loop adds its own kinds only.
    let fds = o.host["fds"].as_object().cloned().unwrap_or_default();
    for (n, what) in &fds {
        let what = what.as_str().unwrap_or("");
        let allowed = match n.as_str() {
            "0" => what.starts_with("pipe r") || what.starts_with("/dev/null r"),
            "1" | "2" => what.starts_with("pipe w"),
            // libuv's loops (epoll, eventfd, the signal pipes), the fd-3 channel the
            // bootstrap announces the run's end on, libuv's reserve descriptor on /dev/null.
            "255" if path.name == "python-forked" => what == "socket rw,cloexec",
            _ if path.language == "nodejs" => {
                what.starts_with("anon_inode:[event")
                    || what.starts_with("pipe ")
                    || what == "socket rw,cloexec" && n == "3"
                    || what
                        .split(' ')
                        .next()
                        .is_some_and(|p| p.ends_with("/dev/null"))
                        && what.ends_with(" r,cloexec")
            }
            _ => false,
        };
        check(allowed, format!("host: descriptor {n} is open: {what}"));
    }
    bad
}
