//! Sandbox uids are leased host-wide, whatever each server's state directory: two
//! servers never run snippets as the same uid, a third party holding leases (another
//! server sweeping the range) is respected, and a uid some live process already runs as
//! is never handed out.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::process::Command;

use common::Server;
use nix::fcntl::{Flock, FlockArg};
use serde_json::json;

const LEASES: &str = "/run/sandbox/uids";
/// Uids left to the two servers: their four runs, one uid a process squats, and room for
/// uids other processes of the host may happen to run as.
const FREE: usize = 7;

#[tokio::test]
async fn servers_with_different_state_directories_never_share_a_uid() {
    std::fs::create_dir_all(LEASES).unwrap();
    // Hold every lease but five, as a server sweeping the range would (leases another
    // live server holds stay its own).
    let mut free = BTreeSet::new();
    let mut held = Vec::new();
    for uid in (10000..11000u32).rev() {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(format!("{LEASES}/{uid}"))
            .unwrap();
        let Ok(lock) = Flock::lock(f, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        if free.len() < FREE {
            free.insert(uid);
        } else {
            held.push(lock);
        }
    }
    assert_eq!(free.len(), FREE, "free uids to hand out");
    let squatted = *free.iter().nth(1).unwrap();
    // A process already running as one of the free uids: it must be skipped too.
    let squatter = Command::new("sleep")
        .arg("60")
        .uid(squatted)
        .gid(squatted)
        .spawn()
        .unwrap();
    let (a_state, b_state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let env = |dir: &tempfile::TempDir| {
        vec![
            (
                "SANDBOX_STATE_DIR",
                dir.path().to_str().unwrap().to_string(),
            ),
            ("WARM_WORKERS", "0".to_string()),
        ]
    };
    let (ea, eb) = (env(&a_state), env(&b_state));
    let a = Server::start(&ea.iter().map(|(k, v)| (*k, v.as_str())).collect::<Vec<_>>()).await;
    let b = Server::start(&eb.iter().map(|(k, v)| (*k, v.as_str())).collect::<Vec<_>>()).await;
    let code = "import os, time\nprint(os.getuid())\ntime.sleep(1.5)";
    let body = json!({"language": "python3", "code": code});
    // Two at once on each server: all four overlap in time.
    let runs = [
        a.spawn_run(body.clone()),
        a.spawn_run(body.clone()),
        b.spawn_run(body.clone()),
        b.spawn_run(body.clone()),
    ];
    let mut uids = Vec::new();
    for r in runs {
        let v = r.await.unwrap();
        let uid: u32 = v["data"]["stdout"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"))
            .trim()
            .parse()
            .unwrap();
        uids.push(uid);
    }
    let distinct: BTreeSet<u32> = uids.iter().copied().collect();
    assert_eq!(distinct.len(), 4, "a uid was shared: {uids:?}");
    assert!(distinct.is_subset(&free), "{uids:?} outside {free:?}");
    assert!(
        !distinct.contains(&squatted),
        "a live process's uid was handed out: {uids:?}"
    );
    let mut squatter = squatter;
    let _ = squatter.kill();
    let _ = squatter.wait();
    drop(held);
}
