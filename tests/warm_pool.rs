//! Warm workers: started and jailed before a request comes, used once, replaced.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::Server;

/// Pids of the interpreters (server -> helper -> the run's init -> interpreter) of `server`.
fn interpreters_of(server: u32) -> Vec<u32> {
    let parent_of = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after = &stat[stat.rfind(')')? + 2..];
        after.split_whitespace().nth(1)?.parse().ok()
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some(init) = parent_of(pid)
            && let Some(helper) = parent_of(init)
            && parent_of(helper) == Some(server)
        {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            if !exe.to_string_lossy().contains("sandbox") {
                out.push(pid);
            }
        }
    }
    out
}

async fn wait_for_interpreters(server: u32, at_least: usize, not_in: &HashSet<u32>) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now: Vec<u32> = interpreters_of(server)
            .into_iter()
            .filter(|p| !not_in.contains(p))
            .collect();
        if now.len() >= at_least {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the pool did not refill: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_worker_is_never_reused_and_sees_no_trace_of_the_previous_run() {
    let s = Server::start(&[("WARM_WORKERS", "2")]).await;
    let code = "import builtins, os\nprint(getattr(builtins, 'mark', None), os.environ.get('MARK'), sorted(os.listdir('/tmp')))\nbuiltins.mark = 1\nos.environ['MARK'] = '1'\nopen('/tmp/trace', 'w').write('x')";
    for _ in 0..6 {
        let data = s.python(code).await;
        assert_eq!(data["stdout"], "None None []\n", "{data}");
    }
    let js = "console.log(String(globalThis.__mark), JSON.stringify(require('fs').readdirSync('/tmp')));\nglobalThis.__mark = 1;\nrequire('fs').writeFileSync('/tmp/trace', 'x');";
    for _ in 0..4 {
        let data = s.run("nodejs", js).await;
        assert_eq!(data["stdout"], "undefined []\n", "{data}");
    }
}

#[tokio::test]
async fn concurrent_runs_get_different_uids() {
    let s = Server::start(&[("WARM_WORKERS", "2"), ("MAX_WORKERS", "8")]).await;
    let code = "import os, time\ntime.sleep(0.5)\nprint(os.getuid())";
    let runs: Vec<_> = (0..8).map(|_| s.python(code)).collect();
    let uids: Vec<String> = futures::future::join_all(runs)
        .await
        .iter()
        .map(|d| d["stdout"].as_str().unwrap().trim().to_string())
        .collect();
    let distinct: HashSet<&String> = uids.iter().collect();
    assert_eq!(distinct.len(), 8, "{uids:?}");
}

#[tokio::test]
async fn a_pool_whose_interpreters_are_killed_refills_itself() {
    let s = Server::start(&[("WARM_WORKERS", "2"), ("ENABLE_NETWORK", "false")]).await;
    // Python and Node, two each.
    let before: HashSet<u32> = wait_for_interpreters(s.pid(), 4, &HashSet::new())
        .await
        .into_iter()
        .collect();
    for pid in &before {
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
    }
    // A request right away still succeeds (a dead worker is never handed out, or its
    // snippet is run on a fresh one).
    let data = s.python("print('after the kill')").await;
    assert_eq!(data["stdout"], "after the kill\n", "{data}");
    let after = wait_for_interpreters(s.pid(), 4, &before).await;
    assert!(after.iter().all(|p| !before.contains(p)));
    assert_eq!(
        s.run("nodejs", "console.log(6 * 7)").await["stdout"],
        "42\n"
    );
    assert!(s.healthy().await);
}

#[tokio::test]
async fn the_pool_can_be_disabled() {
    let s = Server::start(&[("WARM_WORKERS", "0")]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(interpreters_of(s.pid()).is_empty());
    assert_eq!(s.python("print(1)").await["stdout"], "1\n");
}
