//! The network guard, for real: with network, runs still cannot reach the host's own
//! services on loopback nor the cloud metadata address, while the same connection
//! succeeds once the guard is turned off; the nftables table lives exactly as long as
//! the server.

mod common;

use std::net::TcpListener;
use std::process::Command;

use common::{Server, sandbox, stderr, stdout};
use serde_json::json;

/// Every server's table applies to every sandbox uid on the host (the union of their
/// lists), so the tests of this file take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A snippet that tries `addrs` and prints one line each: `ok` or the errno.
fn connect_code(addrs: &[(&str, u16)]) -> String {
    let list: Vec<String> = addrs.iter().map(|(h, p)| format!("({h:?}, {p})")).collect();
    format!(
        "import socket\nfor a in [{}]:\n    try:\n        socket.create_connection(a, timeout=3).close()\n        print(a[0], 'ok')\n    except OSError as e:\n        print(a[0], e.errno)\n",
        list.join(", ")
    )
}

/// The table prefix of servers in this pid namespace (`sandbox_guard_<inode>_`).
fn own_prefix() -> String {
    let ns = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata("/proc/self/ns/pid").unwrap());
    format!("sandbox_guard_{ns}_")
}

fn table_exists(name: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

async fn networked(s: &Server, code: &str) -> String {
    let (status, body) = s
        .run_json(json!({"language": "python3", "code": code, "enable_network": true}))
        .await;
    assert_eq!(status, 200, "{body}");
    body["data"]["stdout"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn networked_runs_cannot_reach_loopback_or_metadata_unless_allowed() {
    let _turn = SERIAL.lock().await;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let code = connect_code(&[("127.0.0.1", port), ("169.254.169.254", 80)]);

    let guarded = Server::start(&[]).await;
    let out = networked(&guarded, &code).await;
    // 111: ECONNREFUSED, the guard's reject.
    assert_eq!(out, "127.0.0.1 111\n169.254.169.254 111\n");
    let table = format!("{}{}", own_prefix(), guarded.pid());
    assert!(table_exists(&table), "{table} while serving");
    guarded.terminate();
    assert!(!table_exists(&table), "{table} after the server stopped");

    // The same connection with the guard off: it was the guard that refused it.
    let open = Server::start(&[("NETWORK_DENY", "")]).await;
    let out = networked(&open, &code).await;
    assert!(out.starts_with("127.0.0.1 ok\n"), "{out}");
    drop(listener);
}

#[tokio::test]
async fn network_deny_takes_the_operators_list() {
    let _turn = SERIAL.lock().await;
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.2:0").unwrap();
    let (pa, pb) = (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    );
    let s = Server::start(&[("NETWORK_DENY", "127.0.0.2/32")]).await;
    let out = networked(&s, &connect_code(&[("127.0.0.1", pa), ("127.0.0.2", pb)])).await;
    assert_eq!(out, "127.0.0.1 ok\n127.0.0.2 111\n");
}

#[tokio::test]
async fn a_table_left_by_a_dead_server_is_removed_at_start() {
    let _turn = SERIAL.lock().await;
    // No process has this pid: the kernel's pid_max is at most 2^22.
    let stale = format!("{}4194305", own_prefix());
    // Another pid namespace's table: its server may be alive, out of our sight.
    let foreign = "sandbox_guard_1_4194305";
    for name in [stale.as_str(), foreign] {
        let created = Command::new("nft")
            .args(["add", "table", "inet", name])
            .status()
            .unwrap();
        assert!(created.success());
    }
    let _s = Server::start(&[]).await;
    assert!(!table_exists(&stale));
    assert!(table_exists(foreign));
    Command::new("nft")
        .args(["delete", "table", "inet", foreign])
        .status()
        .unwrap();
}

#[test]
fn sandbox_run_with_network_is_guarded_too() {
    let _turn = SERIAL.blocking_lock();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let code = connect_code(&[("127.0.0.1", port)]);
    let o = sandbox(&["run", "--network", "-l", "python3", "-e", &code], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "127.0.0.1 111\n");
}
