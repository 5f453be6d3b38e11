//! The Python fork server, for real: runs are forked from one interpreter that has
//! imported Dify's modules, each becoming a fresh sandbox before it reads its snippet.
//! What decides whether that is safe, tried: fresh randomness per run, nothing of the
//! fork server or of an earlier run left in a run, no way to signal or trace the fork
//! server or a sibling, a fork server that dies is replaced, and one that cannot be
//! trusted (a module started a thread) never serves.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::time::Duration;

use common::Server;
use serde_json::json;

fn out(d: &serde_json::Value) -> String {
    d["stdout"].as_str().unwrap_or_default().to_string()
}

/// The fork server of the server with process id `server`: its child whose command line
/// carries the fork server's code.
fn fork_server_of(server: u32) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if ppid == Some(server)
            && String::from_utf8_lossy(&cmdline).contains("The Python fork server")
        {
            return Some(pid);
        }
    }
    None
}

#[tokio::test]
async fn runs_come_from_a_fork_server_with_difys_modules_imported() {
    let s = Server::start(&[]).await;
    // The fork server's imports are frozen out of the collector (see zygote.py).
    let probe = "import gc, sys, os\nprint('jinja2' in sys.modules, 'base64' in sys.modules, os.getpid(), gc.get_freeze_count() > 0)";
    // pid 2: the run is the child of its init (pid 1 of its namespace).
    assert_eq!(out(&s.python(probe).await), "True True 2 True\n");
    assert!(fork_server_of(s.pid()).is_some(), "no fork server process");
    drop(s);
    let plain = Server::start(&[("PYTHON_FORK_SERVER", "false")]).await;
    assert_eq!(out(&plain.python(probe).await), "False False 2 False\n");
    assert!(fork_server_of(plain.pid()).is_none());
}

#[tokio::test]
async fn every_run_gets_fresh_randomness() {
    let s = Server::start(&[]).await;
    let code = "import random, uuid, secrets, os\nprint(random.random(), random.getrandbits(64), uuid.uuid4(), secrets.token_hex(8), os.urandom(8).hex())";
    let mut seen = Vec::new();
    for _ in 0..6 {
        let line = out(&s.python(code).await);
        for value in line.split_whitespace() {
            assert!(!seen.contains(&value.to_string()), "repeated {value}");
            seen.push(value.to_string());
        }
    }
    assert_eq!(seen.len(), 30);
}

#[tokio::test]
async fn nothing_of_the_fork_server_or_an_earlier_run_remains() {
    let s = Server::start(&[("HTTP_PROXY", "http://proxy.invalid:3128")]).await;
    let first = r#"
import json, os, sys
json.left_behind = "by the first run"
sys.modules["planted"] = json
open("/tmp/left", "w").write("x")
os.environ["PLANTED"] = "1"
print("done")
"#;
    assert_eq!(out(&s.python(first).await), "done\n");
    let second = r#"
import json, os, sys
fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
print(hasattr(json, "left_behind"), "planted" in sys.modules, os.path.exists("/tmp/left"))
print(sorted(os.environ))
print(fds[:3], len(fds), fds[-1], os.readlink("/proc/self/fd/%d" % fds[-1]).split(":")[0])
"#;
    let text = out(&s.python(second).await);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "False False False", "{text}");
    // The run's own environment, nothing of the fork server's (the proxy is for
    // networked runs only).
    assert_eq!(lines[1], "['HOME', 'LANG', 'PATH', 'TMPDIR']", "{text}");
    // 0, 1, 2, the directory being listed (the snippet's 3 is closed once read) and the
    // run's own end of its channel, kept on the highest descriptor it may have to
    // announce its end.
    assert_eq!(lines[2], "[0, 1, 2] 5 255 socket", "{text}");
}

#[tokio::test]
async fn a_run_cannot_reach_the_fork_server_or_its_siblings() {
    let s = Server::start(&[]).await;
    let zygote = fork_server_of(s.pid()).expect("a fork server");
    let waiting = s.spawn_run(json!({"language": "python3",
        "code": "import time\ntime.sleep(2)\nprint('finished')"}));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let code = format!(
        r#"
import os, signal, ctypes
for pid in ({zygote}, 1, 3):
    try:
        os.kill(pid, 0)
        print(pid, "visible")
    except OSError as e:
        print(pid, e.errno)
libc = ctypes.CDLL(None, use_errno=True)
print("ptrace", libc.ptrace(16, {zygote}, 0, 0), ctypes.get_errno())
print(sorted(p for p in os.listdir("/proc") if p.isdigit()))
os.kill(-1, signal.SIGKILL)
"#
    );
    let d = s.python(&code).await;
    let text = out(&d);
    assert!(text.contains(&format!("{zygote} 3\n")), "{d}");
    // Pid 1 is the run's init, root: out of the run's reach; nothing else is there.
    assert!(text.contains("1 1\n") && text.contains("3 3\n"), "{d}");
    assert!(text.contains("ptrace -1 1\n"), "{d}");
    assert!(text.contains("['1', '2']"), "{d}");
    let sibling = waiting.await.unwrap();
    assert_eq!(sibling["data"]["stdout"], "finished\n", "{sibling}");
    assert_eq!(
        fork_server_of(s.pid()),
        Some(zygote),
        "the fork server lives on"
    );
}

#[tokio::test]
async fn a_fork_server_that_dies_is_replaced_and_runs_go_on() {
    let s = Server::start(&[]).await;
    let first = fork_server_of(s.pid()).expect("a fork server");
    let _ = common::nix_kill(first, "KILL");
    // Runs meanwhile are still answered (by a fresh interpreter if need be).
    for _ in 0..3 {
        assert_eq!(out(&s.python("print(6 * 7)").await), "42\n");
    }
    let mut next = None;
    for _ in 0..100 {
        next = fork_server_of(s.pid()).filter(|p| *p != first);
        if next.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(next.is_some(), "no new fork server");
    // And it serves again.
    let probe = "import sys, os\nprint('jinja2' in sys.modules, os.getpid())";
    let mut served = false;
    for _ in 0..20 {
        if out(&s.python(probe).await) == "True 2\n" {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served, "the new fork server does not serve");
}

#[tokio::test]
async fn a_module_that_starts_a_thread_keeps_the_fork_server_from_serving() {
    // A package directory with a module that starts a thread when imported, set up as
    // the live generation of extra packages.
    let state = tempfile::tempdir().unwrap();
    let packages = state.path().join("python-packages");
    let generation = packages.join("gen-test");
    std::fs::create_dir_all(&generation).unwrap();
    std::fs::write(
        generation.join("starts_a_thread.py"),
        "import threading, time\nthreading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n",
    )
    .unwrap();
    std::fs::write(generation.join(".requirements"), "").unwrap();
    std::os::unix::fs::symlink("gen-test", packages.join("current")).unwrap();
    let missing = state.path().join("no-requirements.txt");
    let s = Server::start(&[
        ("SANDBOX_STATE_DIR", state.path().to_str().unwrap()),
        ("DEPENDENCIES_PATH", missing.to_str().unwrap()),
        ("PYTHON_PRELOAD_MODULES", "json,starts_a_thread"),
    ])
    .await;
    assert!(
        fork_server_of(s.pid()).is_none(),
        "a fork server with a thread serves"
    );
    let d = s
        .python("import sys\nprint('starts_a_thread' in sys.modules)\nimport starts_a_thread\nprint('imported')")
        .await;
    assert_eq!(out(&d), "False\nimported\n", "{d}");
}

#[tokio::test]
async fn a_forked_run_ends_as_a_fresh_interpreter_would() {
    // Each ending a snippet can have, answered by a forked run and by a plain worker: the
    // answers must be the same.
    let endings = [
        "import threading, time\ndef late():\n    time.sleep(0.2)\n    print('thread done')\nthreading.Thread(target=late).start()\nprint('main done')",
        "import atexit\natexit.register(print, 'bye')\nprint('hi')",
        "import sys\nsys.stdout.write('unflushed')\nsys.exit('a message')",
        "import sys\nprint('three')\nsys.exit(3)",
        "import sys\nsys.exit(None)",
        "def f():\n    raise ValueError('broken')\nf()",
        "import atexit, sys\natexit.register(lambda: sys.stderr.write('late words\\n'))\nraise SystemExit(0)",
        // Fd 3 is closed once the snippet is read, in both.
        "import os\nos.write(3, b'=7')",
    ];
    let forked = Server::start(&[]).await;
    let plain = Server::start(&[("PYTHON_FORK_SERVER", "false")]).await;
    for code in endings {
        let a = forked.python(code).await;
        let b = plain.python(code).await;
        assert_eq!(a, b, "forked and plain runs of {code:?} differ");
    }
    assert_eq!(
        out(&forked.python(endings[0]).await),
        "main done\nthread done\n"
    );
    assert_eq!(out(&forked.python(endings[1]).await), "hi\nbye\n");
}

#[tokio::test]
async fn a_fork_server_is_replaced_after_its_share_of_runs_with_a_new_layout() {
    // Runs of one fork server share its address-space layout and hash seed: a preloaded
    // module sits at the same address in each. After 500 runs a new one takes over.
    let s = Server::start(&[("MAX_WORKERS", "4")]).await;
    let layout = "import json\nprint(hex(id(json)), hash('seed'))";
    let first = out(&s.python(layout).await);
    assert_eq!(
        out(&s.python(layout).await),
        first,
        "one fork server, one layout"
    );
    let original = fork_server_of(s.pid()).expect("a fork server");
    let mut runs = Vec::new();
    for _ in 0..520 {
        runs.push(s.spawn_run(serde_json::json!({"language": "python3", "code": "print(1)", "preload": "", "enable_network": false})));
        if runs.len() == 8 {
            for r in runs.drain(..) {
                assert_eq!(r.await.unwrap()["data"]["stdout"], "1\n");
            }
        }
    }
    for r in runs {
        assert_eq!(r.await.unwrap()["data"]["stdout"], "1\n");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let replacement = loop {
        match fork_server_of(s.pid()) {
            Some(pid) if pid != original => break pid,
            _ if std::time::Instant::now() > deadline => panic!("the fork server was not replaced"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    // The old one serves until its replacement is ready, and workers forked before may
    // still wait in the pool.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while out(&s.python(layout).await) == first {
        assert!(
            std::time::Instant::now() < deadline,
            "runs still have the old layout; the replacement {replacement} never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_run_can_announce_only_an_end_it_could_have_made() {
    // A forked run announces its exit status on a descriptor it keeps (the highest it may
    // have), so the answer need not wait for its teardown. The snippet can write there too.
    let s = Server::start(&[("WORKER_TIMEOUT", "20")]).await;
    let end = "max(int(f) for f in os.listdir('/proc/self/fd'))";
    // A false announcement followed by a real end: the real end counts.
    for (lie, truth) in [
        (
            "os.write(END, b'=5')\nimport sys\nsys.exit(0)",
            "import sys\nsys.exit(0)",
        ),
        (
            "os.write(END, b'=0')\nimport sys\nsys.exit(3)",
            "import sys\nsys.exit(3)",
        ),
        (
            "os.write(END, b'garbage')\nraise ValueError('x')",
            "raise ValueError('x')",
        ),
        ("os.write(END, b'=0' * 100)\nprint('on')", "print('on')"),
    ] {
        let code = format!("import os\nEND = {end}\n{lie}");
        // The same lines but the write, so tracebacks name the same line.
        let truth = format!("import os\nEND = 0\npass\n{truth}");
        let (a, b) = (s.python(&code).await, s.python(&truth).await);
        assert_eq!(
            (&a["error"], &a["stdout"]),
            (&b["error"], &b["stdout"]),
            "{lie:?}"
        );
    }

    // Announcing an end and going on: the answer comes, and the run is stopped.
    let started = std::time::Instant::now();
    let code = format!(
        "import os\nprint(os.getuid(), flush=True)\nEND = {end}\nos.write(END, b'=0')\nos.close(END)\nos.close(1)\nos.close(2)\nwhile True:\n    pass"
    );
    let d = s.python(&code).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the answer waited for the timeout: {d}"
    );
    let uid: u32 = out(&d).trim().parse().expect("the run's uid");
    assert!(
        common::no_process_of(uid, Duration::from_secs(3)).await,
        "a run that announced a false end still runs as uid {uid}"
    );
    assert_eq!(out(&s.python("print('next')").await), "next\n");
}
