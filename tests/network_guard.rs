//! Runs that share the host's network (the chroot level, which cannot make namespaces,
//! and `network_isolation: shared`, asked for explicitly) are kept off the host by the
//! uid guard: every address of the host, loopback and metadata refused, the outside
//! reachable, `network_deny` honoured, private ranges refused unless `network_allow`
//! opens them (a proxy there stays reachable); the guard's table lives exactly as long
//! as its server.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::net::TcpListener;
use std::process::Command;

use common::netlab::{self, EXT, TCP_PORT};
use common::{Server, sandbox, stderr, stdout};
use serde_json::json;

/// Every guard applies to every sandbox uid of the host: the tests take turns.
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
    assert_eq!(body["code"], 0, "{body}");
    body["data"]["stdout"].as_str().unwrap().to_string()
}

/// A listener on all of the host's addresses, and the lines a guarded run prints for it.
fn host_targets() -> (TcpListener, String, String) {
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let host = common::host_address().to_string();
    let ext = EXT.to_string();
    let code = connect_code(&[
        (&ext, TCP_PORT),
        (&host, port),
        ("127.0.0.1", port),
        ("169.254.169.254", 80),
    ]);
    // 111: ECONNREFUSED, the guard's reset.
    let expected = format!("{ext} ok\n{host} 111\n127.0.0.1 111\n169.254.169.254 111\n");
    (listener, code, expected)
}

#[tokio::test]
async fn the_chroot_level_reaches_the_outside_and_nothing_of_the_host() {
    let _turn = SERIAL.lock().await;
    netlab::lab();
    let state = tempfile::Builder::new()
        .prefix("sandbox-guard-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let s = Server::start(&[
        ("SANDBOX_ISOLATION", "chroot"),
        ("SANDBOX_STATE_DIR", state.path().to_str().unwrap()),
    ])
    .await;
    let (_listener, code, expected) = host_targets();
    assert_eq!(networked(&s, &code).await, expected);
    let table = format!("{}{}", own_prefix(), s.pid());
    assert!(table_exists(&table), "{table} while serving");
    s.terminate();
    assert!(!table_exists(&table), "{table} after the server stopped");
}

#[tokio::test]
async fn shared_by_request_is_guarded_the_same_and_takes_network_deny() {
    let _turn = SERIAL.lock().await;
    netlab::lab();
    let s = Server::start(&[("NETWORK_ISOLATION", "shared")]).await;
    let (_listener, code, expected) = host_targets();
    assert_eq!(networked(&s, &code).await, expected);
    drop(s);
    let ext = EXT.to_string();
    let s = Server::start(&[("NETWORK_ISOLATION", "shared"), ("NETWORK_DENY", &ext)]).await;
    let out = networked(&s, &connect_code(&[(&ext, TCP_PORT)])).await;
    assert_eq!(out, format!("{ext} 111\n"));
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
fn sandbox_run_with_network_reaches_the_outside_and_not_the_host() {
    let _turn = SERIAL.blocking_lock();
    netlab::lab();
    let (_listener, code, expected) = host_targets();
    let o = sandbox(&["run", "--network", "-l", "python3", "-e", &code], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), expected);
}

#[tokio::test]
async fn shared_runs_reach_a_private_range_only_where_allowed_or_proxied() {
    let _turn = SERIAL.lock().await;
    let private = netlab::lab().private_addresses().to_vec();
    let (proxy, opened) = (private[0].to_string(), private[1].to_string());
    let ext = EXT.to_string();
    let mut targets: Vec<(String, u16)> =
        private.iter().map(|a| (a.to_string(), TCP_PORT)).collect();
    targets.push((ext.clone(), TCP_PORT));
    let list: Vec<(&str, u16)> = targets.iter().map(|(h, p)| (h.as_str(), *p)).collect();
    let code = connect_code(&list);
    // 111: ECONNREFUSED, the guard's reset.
    let expect = |reached: &[bool]| -> String {
        targets
            .iter()
            .zip(reached)
            .map(|((h, _), ok)| format!("{h} {}\n", if *ok { "ok" } else { "111" }))
            .collect()
    };
    let http = format!("http://{proxy}:{TCP_PORT}");
    let s = Server::start(&[("NETWORK_ISOLATION", "shared"), ("HTTP_PROXY", &http)]).await;
    assert_eq!(
        networked(&s, &code).await,
        expect(&[true, false, false, false, true])
    );
    drop(s);
    let allow = format!("0.0.0.0/0,{opened}:{TCP_PORT}");
    let s = Server::start(&[("NETWORK_ISOLATION", "shared"), ("NETWORK_ALLOW", &allow)]).await;
    assert_eq!(
        networked(&s, &code).await,
        expect(&[false, true, false, false, true])
    );
}
