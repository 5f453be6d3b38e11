//! A run is over only when its last process is gone. A snippet can announce an end it
//! does not make (a forked Python run writes its end marker itself; Node's 'exit' event
//! can be emitted by hand) and keep running after its answer: these tests try that and
//! check that it never escapes `max_workers`, is killed, logged and counted, leaves its
//! network namespace to no other run, and that `sandbox run` waits for it.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::Server;

/// The uids runs execute as.
const SANDBOX_UID_RANGE: std::ops::Range<u32> = 10000..11000;
use serde_json::json;

fn out(d: &serde_json::Value) -> String {
    d["stdout"].as_str().unwrap_or_default().to_string()
}

/// Runs of the server `pid` alive now: the distinct sandbox uids among the processes of
/// its run cgroups.
fn live_runs(pid: u32) -> usize {
    run_uids(pid).len()
}

/// The sandbox uids of the processes in the run cgroups of the server `pid`.
fn run_uids(pid: u32) -> BTreeSet<u32> {
    let mut uids = BTreeSet::new();
    for cg in common::run_cgroups_of(pid) {
        let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
        for p in procs.split_whitespace() {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
            let uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1))
                .and_then(|u| u.parse::<u32>().ok());
            if let Some(uid) = uid.filter(|u| SANDBOX_UID_RANGE.contains(u)) {
                uids.insert(uid);
            }
        }
    }
    uids
}

/// The most runs of a server seen alive at once, sampled every few milliseconds.
struct LiveRuns {
    most: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl LiveRuns {
    fn sample(server: u32) -> Self {
        let (most, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let thread = {
            let (most, stop) = (most.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    most.fetch_max(live_runs(server), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        Self { most, stop, thread }
    }

    /// Stop sampling: the most seen.
    fn most(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("sampler");
        self.most.load(Ordering::Relaxed)
    }
}

/// A forked Python run writes its end marker on its highest descriptor and closes its
/// output, then holds 50 MB and works on for 3 s. (A plain worker has no such marker: the
/// write fails quietly and the run simply works for 3 s.)
const PYTHON_FORGED_END: &str = r#"
import os, resource, time
hold = bytearray(50 << 20)
for i in range(0, len(hold), 4096):
    hold[i] = 1
try:
    e = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1
    os.write(e, b"=0")
    os.close(e)
except OSError:
    pass
os.close(1)
os.close(2)
t = time.time()
while time.time() - t < 3:
    pass
raise SystemExit(3)
"#;

/// Node's bootstrap announces the run's end on 'exit'; the snippet emits it by hand.
const NODE_FORGED_END: &str = r#"
const hold = Buffer.alloc(50 << 20, 1);
process.emit('exit', 0);
const t = Date.now();
while (Date.now() - t < 3000) { hold[0]++; }
process.exit(3);
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_ends_never_hold_more_runs_than_max_workers() {
    let s = Arc::new(
        Server::start(&[
            ("MAX_WORKERS", "4"),
            ("WARM_WORKERS", "0"),
            ("WORKER_TIMEOUT", "10"),
        ])
        .await,
    );
    let sampler = LiveRuns::sample(s.pid());
    let mut clients = Vec::new();
    for i in 0..12 {
        let s = s.clone();
        clients.push(tokio::spawn(async move {
            let (language, code) = if i % 2 == 0 {
                ("python3", PYTHON_FORGED_END)
            } else {
                ("nodejs", NODE_FORGED_END)
            };
            for _ in 0..2 {
                let (status, body) = s
                    .run_json(json!({"language": language, "code": code, "enable_network": false}))
                    .await;
                assert_eq!((status, &body["code"]), (200, &json!(0)), "{body}");
            }
        }));
    }
    for c in clients {
        c.await.expect("client");
    }
    // Let the last runs' clean-ups finish while still sampling.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let most = sampler.most();
    assert!(most >= 2, "the load never ran runs side by side ({most})");
    assert!(
        most <= 4,
        "{most} runs were alive at once with max_workers 4"
    );
    // Every Node run (12) announced an end it did not make and was killed after its
    // answer; so was every forked Python run.
    let killed = s.metric("sandbox_runs_killed_after_answer_total").await;
    assert!(
        killed >= 12,
        "{killed} runs counted as killed after their answer"
    );
    assert_eq!(live_runs(s.pid()), 0, "runs outlived the load");
}

#[tokio::test]
async fn a_run_killed_after_its_answer_is_logged_counted_and_its_namespace_not_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("serve.log");
    let s = Server::start_logging(
        &[
            ("WARM_WORKERS", "0"),
            ("WORKER_TIMEOUT", "20"),
            ("SANDBOX_LOG", "warn"),
        ],
        &log,
    )
    .await;
    let probe = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), "little"))  # SO_NETNS_COOKIE
"#;
    let first = cookie(&s, probe).await;
    assert_eq!(
        cookie(&s, probe).await,
        first,
        "an untouched namespace was not kept"
    );

    // Takes the kept namespace, announces its end and works on.
    s.settled().await;
    let started = std::time::Instant::now();
    let code = "console.log(process.getuid()); process.emit('exit', 0); \
                const t = Date.now(); while (Date.now() - t < 5000) {}";
    let (status, body) = s
        .run_json(json!({"language": "nodejs", "code": code, "enable_network": true}))
        .await;
    assert_eq!((status, &body["code"]), (200, &json!(0)), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the answer waited"
    );
    let uid: u32 = out(&body["data"]).trim().parse().expect("the run's uid");
    assert!(
        common::no_process_of(uid, Duration::from_secs(3)).await,
        "the run still runs as uid {uid} after its answer"
    );
    s.settled().await;
    assert_eq!(
        s.metric("sandbox_runs_killed_after_answer_total").await,
        1,
        "the kill after the answer is not counted"
    );
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.contains("killed after its answer"),
        "the kill after the answer is not logged: {logged}"
    );
    assert_ne!(
        cookie(&s, probe).await,
        first,
        "the namespace of a run killed after its answer served the next run"
    );
}

/// The network namespace cookie a networked run of `probe` prints, once the previous
/// run's namespace was kept or destroyed.
async fn cookie(s: &Server, probe: &str) -> String {
    s.settled().await;
    let (status, body) = s
        .run_json(json!({"language": "python3", "code": probe, "enable_network": true}))
        .await;
    assert_eq!((status, &body["code"]), (200, &json!(0)), "{body}");
    out(&body["data"]).trim().to_string()
}

/// Run cgroups left by servers or commands that are gone.
/// The run cgroups `owner` (a `sandbox` process, gone) left behind. Only its own: a
/// test beside this one kills a server with SIGKILL on purpose, and that server's
/// cgroups wait for the next start.
fn orphaned_run_cgroups(owner: u32) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for root in [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/pids",
    ] {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        for line in own.lines() {
            let path = line.splitn(3, ':').nth(2).unwrap_or("");
            let dir = std::path::Path::new(root).join(path.trim_start_matches('/'));
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let made_by = name
                    .strip_prefix("sandbox-run-")
                    .and_then(|rest| rest.split('-').next())
                    .and_then(|pid| pid.parse::<u32>().ok());
                if made_by == Some(owner) {
                    found.push(e.path());
                }
            }
        }
    }
    found
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[test]
fn sandbox_run_waits_for_a_forged_end_and_exits_with_the_real_status() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let env = [("SANDBOX_STATE_DIR", state.to_str().expect("utf-8 path"))];

    // Writes 8 MB files forever after a forged end: held to --tmp-size, stopped for it.
    let script = work.path().join("forge.js");
    std::fs::write(
        &script,
        "console.log(process.getuid());\nprocess.emit('exit', 0);\n\
         const fs = require('fs'); const b = Buffer.alloc(8 << 20, 1);\n\
         for (let i = 0; ; i++) fs.writeFileSync('/tmp/out/f' + i, b);\n",
    )
    .expect("script");
    let out_dir = work.path().join("out");
    let child = std::process::Command::new(common::bin())
        .args([
            "run",
            "--tmp-size",
            "200",
            "--out",
            out_dir.to_str().expect("utf-8 path"),
            script.to_str().expect("utf-8 path"),
        ])
        .envs(env)
        .current_dir(std::env::temp_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run sandbox");
    let command = child.id();
    let o = child.wait_with_output().expect("sandbox run's output");
    let uid: u32 = common::stdout(&o).trim().parse().expect("the run's uid");
    assert_ne!(o.status.code(), Some(0), "{}", common::stderr(&o));
    assert!(
        common::stderr(&o).contains("disk limit"),
        "{}",
        common::stderr(&o)
    );
    assert!(
        dir_size(&out_dir) <= 200 << 20,
        "--out holds {} bytes, past --tmp-size",
        dir_size(&out_dir)
    );
    let runs = state.join("runs");
    let left: Vec<_> = std::fs::read_dir(&runs)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "stages left behind: {left:?}");
    assert_eq!(
        orphaned_run_cgroups(command),
        Vec::<std::path::PathBuf>::new()
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    assert!(
        rt.block_on(common::no_process_of(uid, Duration::ZERO)),
        "a process of the run (uid {uid}) outlived the command"
    );

    // A forged end, then a real one: the command's status is the real one, and what the
    // run wrote after its forged end is collected.
    let script = work.path().join("real.js");
    std::fs::write(
        &script,
        "const fs = require('fs');\nprocess.emit('exit', 0);\n\
         const t = Date.now(); while (Date.now() - t < 700) {}\n\
         fs.writeFileSync('/tmp/out/late.txt', 'late');\nprocess.exit(3);\n",
    )
    .expect("script");
    let out_dir = work.path().join("out2");
    let o = common::sandbox(
        &[
            "run",
            "--out",
            out_dir.to_str().expect("utf-8 path"),
            script.to_str().expect("utf-8 path"),
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(3), "{}", common::stderr(&o));
    assert_eq!(
        std::fs::read_to_string(out_dir.join("late.txt"))
            .ok()
            .as_deref(),
        Some("late")
    );
}

#[tokio::test]
async fn a_remote_sandbox_run_exits_with_the_real_status_too() {
    let s = Server::start(&[("WARM_WORKERS", "0")]).await;
    let code = "process.emit('exit', 0);\n\
                const t = Date.now(); while (Date.now() - t < 300) {}\nprocess.exit(3);";
    let base = s.base.clone();
    let o = tokio::task::spawn_blocking(move || {
        common::sandbox(
            &[
                "run",
                "--server",
                &base,
                "--key",
                common::KEY,
                "-l",
                "nodejs",
                "-e",
                code,
            ],
            &[],
        )
    })
    .await
    .expect("sandbox run");
    assert_eq!(o.status.code(), Some(3), "{}", common::stderr(&o));
    // Dify's own requests are still answered on the announced end.
    let (status, body) = s
        .run_json(json!({"language": "nodejs", "code": code, "enable_network": false}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["error"], "", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_dropped_mid_run_never_hold_more_runs_than_max_workers() {
    use tokio::io::AsyncWriteExt;
    let s = Server::start(&[
        ("MAX_WORKERS", "2"),
        ("WARM_WORKERS", "0"),
        ("WORKER_TIMEOUT", "10"),
    ])
    .await;
    let sampler = LiveRuns::sample(s.pid());
    // Each client asks for a run holding 50 MB and hangs up while it runs.
    let body =
        json!({"language": "nodejs", "code": NODE_FORGED_END, "enable_network": false}).to_string();
    let mut clients = Vec::new();
    for i in 0..16u64 {
        let (addr, body) = (s.addr().to_string(), body.clone());
        clients.push(tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect");
            let head = common::raw::run_head("application/json", body.len());
            c.write_all(head.as_bytes()).await.expect("head");
            c.write_all(body.as_bytes()).await.expect("body");
            tokio::time::sleep(Duration::from_millis(150 + 40 * (i % 5))).await;
            drop(c);
        }));
    }
    for c in clients {
        c.await.expect("client");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let most = sampler.most();
    assert!(most >= 1, "no run was ever seen");
    assert!(
        most <= 2,
        "{most} runs were alive at once with max_workers 2"
    );
    assert!(s.healthy().await);
    assert_eq!(
        live_runs(s.pid()),
        0,
        "runs outlived their dropped requests"
    );
}

/// Node: the end marker written on fd 3 by hand and fd 3 closed, stdout left open, then
/// the run works on for 3 s and would exit 3.
const NODE_ANNOUNCE_KEEP_OUTPUT: &str = r#"
const fs = require('fs');
console.log('partial');
fs.writeSync(3, '=0');
fs.closeSync(3);
const t = Date.now();
while (Date.now() - t < 3000) {}
process.exitCode = 3;
"#;

/// Forked Python: the end marker on the highest descriptor, stdout kept open by a
/// duplicate, then the run works on for 3 s and would exit 3.
const PYTHON_ANNOUNCE_KEEP_OUTPUT: &str = r#"
import os, resource, time
keep = os.dup(1)
print("partial", flush=True)
e = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1
try:
    os.write(e, b"=0")
    os.close(e)
except OSError:
    pass
os.close(1)
os.close(2)
t = time.time()
while time.time() - t < 3:
    pass
raise SystemExit(3)
"#;

async fn killed_before_its_answer_is_not_a_clean_exit(language: &str, code: &str) {
    let s = Server::start(&[("WARM_WORKERS", "0"), ("WORKER_TIMEOUT", "10")]).await;
    let before = s.metric("sandbox_runs_killed_after_answer_total").await
        + s.metric("sandbox_runs_misreported_end_total").await;
    let started = std::time::Instant::now();
    let (status, body) = s
        .run_json(json!({"language": language, "code": code, "enable_network": false}))
        .await;
    let took = started.elapsed();
    assert_eq!((status, &body["code"]), (200, &json!(0)), "{body}");
    s.settled().await;
    let after = s.metric("sandbox_runs_killed_after_answer_total").await
        + s.metric("sandbox_runs_misreported_end_total").await;
    let data = &body["data"];
    // A plain Python worker has no end marker to forge: the run simply works on and is
    // answered on its real end.
    if language == "python3" && data["exit_code"] == json!(3) {
        return;
    }
    // The run never exited: the server killed it (about 0.5 s after its marker, far
    // before the 3 s it would have worked). Reporting the announced `exit 0` with no
    // error tells Dify a clean success that never happened.
    assert_eq!(data["exit_code"], json!(137), "{data}");
    assert!(
        took < Duration::from_secs(2),
        "the run was not stopped early ({took:?}): {body}"
    );
    assert!(
        data["exit_code"] != json!(0) || data["error"] != json!(""),
        "a run the server killed is answered as a clean exit 0: {data}"
    );
    assert!(
        after > before,
        "a run killed for a false end is counted nowhere in /metrics"
    );
}

#[tokio::test]
async fn node_announcing_its_end_with_output_open_is_not_answered_as_a_clean_exit() {
    killed_before_its_answer_is_not_a_clean_exit("nodejs", NODE_ANNOUNCE_KEEP_OUTPUT).await;
}

#[tokio::test]
async fn forked_python_announcing_its_end_with_output_open_is_not_answered_as_a_clean_exit() {
    killed_before_its_answer_is_not_a_clean_exit("python3", PYTHON_ANNOUNCE_KEEP_OUTPUT).await;
}

#[tokio::test]
async fn runs_of_a_server_killed_without_its_shutdown_are_killed_by_the_next_start() {
    let env = [("WARM_WORKERS", "0"), ("WORKER_TIMEOUT", "60")];
    let s = Server::start(&env).await;
    let mut runs = Vec::new();
    for language in ["python3", "nodejs"] {
        let code = match language {
            "python3" => "import time\ntime.sleep(60)",
            _ => "setTimeout(() => {}, 60000)",
        };
        runs.push(
            s.spawn_run(json!({"language": language, "code": code, "enable_network": false})),
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut uids = run_uids(s.pid());
    // Exactly the two: the start's own probe runs (one per language) may still be ending.
    while uids.len() != 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        uids = run_uids(s.pid());
    }
    assert_eq!(uids.len(), 2, "the two runs never started");
    // As an OOM kill or a crash would: no shutdown, nothing cleaned up.
    common::nix_kill(s.pid(), "KILL").expect("kill -9");
    s.terminate();
    for r in runs {
        r.abort();
    }
    let next = Server::start(&env).await;
    for uid in uids {
        assert!(
            common::no_process_of(uid, Duration::from_secs(3)).await,
            "a run of the killed server (uid {uid}) still runs after the next start"
        );
    }
    drop(next);
}

/// SIGTERM or SIGHUP to `sandbox run` stops its run: killed, its stage and cgroup
/// removed, before the command exits with 128 + the signal. SIGINT (Ctrl-C) goes to the
/// snippet, which ends of it as python3 does (KeyboardInterrupt, 130), and the same is
/// cleaned up.
#[tokio::test]
async fn a_stopped_sandbox_run_takes_its_run_and_stage_along() {
    for (signal, name) in [(15, "TERM"), (2, "INT")] {
        let state = tempfile::tempdir().expect("tempdir");
        let mut cli = tokio::process::Command::new(common::bin())
            .args([
                "run",
                "--timeout",
                "30",
                "-l",
                "python3",
                "-e",
                "import os, time\nprint(os.getuid(), flush=True)\ntime.sleep(60)",
            ])
            .env("SANDBOX_STATE_DIR", state.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("sandbox run");
        let mut out = tokio::io::BufReader::new(cli.stdout.take().expect("stdout"));
        let mut line = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
            .await
            .expect("the run's first line");
        let uid: u32 = line.trim().parse().expect("the run's uid");
        let pid = cli.id().expect("pid");
        common::nix_kill(pid, name).expect("signal");
        let done = tokio::time::timeout(Duration::from_secs(10), cli.wait_with_output())
            .await
            .expect("sandbox run did not end after the signal")
            .expect("wait");
        assert_eq!(
            done.status.code(),
            Some(128 + signal),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
        let said = if name == "INT" {
            "KeyboardInterrupt"
        } else {
            "the run was killed"
        };
        assert!(
            String::from_utf8_lossy(&done.stderr).contains(said),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
        // Gone when the command is: no waiting.
        assert!(
            common::no_process_of(uid, Duration::ZERO).await,
            "SIG{name}: the run (uid {uid}) outlived `sandbox run`"
        );
        let stages: Vec<_> = std::fs::read_dir(state.path().join("runs"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(stages.is_empty(), "SIG{name}: stages left: {stages:?}");
        assert!(
            common::run_cgroups_of(pid).is_empty(),
            "SIG{name}: run cgroups left"
        );
    }
}
