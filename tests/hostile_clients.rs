//! Clients that hold connections without finishing their requests, or flood the server
//! with large bodies: a real `sandbox serve`, real sockets, and a keyed run must still be
//! answered.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::{self, closed_after, read_answer};
use common::{KEY, Server};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// These tests open thousands of sockets or send a gigabyte: one at a time, so that
/// their timings do not disturb each other.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A request that never finishes its headers.
const PARTIAL: &[u8] = b"POST /v1/sandbox/run HTTP/1.1\r\nHost: x\r\n";
const HALF_OPEN: usize = 1500;

/// This process needs more than 1 024 descriptors for its own sockets; returns the hard
/// limit, the most a server started from here can be given (raising a hard limit needs
/// CAP_SYS_RESOURCE, which a container may not have even as root).
fn raise_own_descriptor_limit() -> u64 {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        hard >= 2 * HALF_OPEN as u64,
        "the test needs a hard descriptor limit of {} (ulimit -Hn), it is {hard}",
        2 * HALF_OPEN
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    hard
}

async fn half_open(addr: &str, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        // A connection the server shed may already be closed: not an error here.
        let _ = s.write_all(PARTIAL).await;
        held.push(s);
    }
    held
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// "Max open files  <soft>  <hard>  files" from /proc/<pid>/limits.
fn descriptor_limit(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

/// A keyed run on a new connection, retried while the server sheds connections;
/// returns how long until it was answered and after how many attempts.
async fn keyed_run_answered(s: &Server, give_up: Duration) -> (Duration, u32) {
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        // No pool: a connection kept from before would not show whether new ones get in.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        let sent = client
            .post(format!("{}/v1/sandbox/run", s.base))
            .header("X-Api-Key", KEY)
            .timeout(Duration::from_secs(5))
            .json(&json!({"language": "python3", "code": "print(1)"}))
            .send()
            .await;
        match sent {
            Ok(r) => {
                assert_eq!(r.status(), 200);
                let v: Value = r.json().await.expect("JSON");
                assert_eq!(v["code"], 0, "{v}");
                assert_eq!(v["data"]["stdout"], "1\n", "{v}");
                return (started.elapsed(), attempts);
            }
            Err(e) => assert!(
                started.elapsed() < give_up,
                "no answer within {give_up:?} ({attempts} attempts): {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn half_open_requests_under_a_low_soft_limit_leave_runs_answered() {
    let _heavy = HEAVY.lock().await;
    let hard = raise_own_descriptor_limit();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let s = Server::start_with_nofile(&[], (1024, hard), &log).await;
    assert_eq!(
        descriptor_limit(s.pid()),
        (hard, hard),
        "the server raises its soft limit to the hard one"
    );
    let held = half_open(s.addr(), HALF_OPEN).await;
    // Every one of them is held open: more than the 1 024 the server was started with.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_descriptors(s.pid()) < HALF_OPEN && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(open_descriptors(s.pid()) >= HALF_OPEN);
    let (took, attempts) = keyed_run_answered(&s, Duration::from_secs(5)).await;
    eprintln!("keyed run beside {HALF_OPEN} half-open requests: {took:?}, {attempts} attempt(s)");
    assert_eq!(attempts, 1, "nothing was shed");
    drop(held);
}

#[tokio::test]
async fn half_open_requests_at_a_hard_limit_of_1024_are_shed_and_runs_still_answered() {
    let _heavy = HEAVY.lock().await;
    raise_own_descriptor_limit();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let header_timeout = 2;
    let s = Server::start_with_nofile(
        &[("HEADER_READ_TIMEOUT", &header_timeout.to_string())],
        (1024, 1024),
        &log,
    )
    .await;
    let held = half_open(s.addr(), HALF_OPEN).await;
    let mut fds = 0;
    for _ in 0..10 {
        fds = fds.max(open_descriptors(s.pid()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        fds < 1024 - 64,
        "the connection cap leaves descriptors for runs: {fds} open"
    );
    let (took, attempts) = keyed_run_answered(&s, Duration::from_secs(header_timeout + 6)).await;
    eprintln!(
        "keyed run beside {HALF_OPEN} half-open requests at 1024 descriptors: {took:?}, {attempts} attempt(s), {fds} descriptors open"
    );
    drop(held);
    let text = std::fs::read_to_string(&log).unwrap();
    let shed: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("shedding connections"))
        .collect();
    assert!(!shed.is_empty(), "no shedding line in:\n{text}");
    assert!(
        shed[0].contains("closed at once") && shed[0].contains("max_connections"),
        "{}",
        shed[0]
    );
    // Rate-limited: one line a second at most, not one per connection.
    assert!(shed.len() <= 10, "{} shedding lines", shed.len());
    assert!(
        !text.contains("cannot accept") && !text.contains("Too many open files"),
        "{text}"
    );
}

#[tokio::test]
async fn half_sent_headers_are_closed_within_the_header_timeout() {
    let s = Server::start(&[("HEADER_READ_TIMEOUT", "2"), ("KEEPALIVE_TIMEOUT", "30")]).await;
    let fresh = async {
        let mut c = TcpStream::connect(s.addr()).await.unwrap();
        c.write_all(PARTIAL).await.unwrap();
        closed_after(&mut c, Duration::from_secs(10)).await
    };
    // On a kept-alive connection the header timeout runs from the next request's first
    // byte, not the keep-alive timeout.
    let reused = async {
        let mut c = TcpStream::connect(s.addr()).await.unwrap();
        c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (status, body) = read_answer(&mut c).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "\"ok\""));
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.write_all(PARTIAL).await.unwrap();
        closed_after(&mut c, Duration::from_secs(10)).await
    };
    let (fresh, reused) = tokio::join!(fresh, reused);
    for (what, closed) in [("fresh", fresh), ("kept alive", reused)] {
        let after = closed.unwrap_or_else(|| panic!("{what}: still open after 10 s"));
        eprintln!("{what}: closed {after:?} after the partial head");
        assert!(
            after >= Duration::from_millis(1500) && after <= Duration::from_millis(4500),
            "{what}: closed after {after:?}, the header timeout is 2 s"
        );
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout() {
    let s = Server::start(&[("HEADER_READ_TIMEOUT", "1"), ("KEEPALIVE_TIMEOUT", "3")]).await;
    let health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    let idle = async {
        let mut c = TcpStream::connect(s.addr()).await.unwrap();
        c.write_all(health).await.unwrap();
        assert_eq!(read_answer(&mut c).await.unwrap().0, 200);
        closed_after(&mut c, Duration::from_secs(20)).await
    };
    // Idle past the header timeout but within keep-alive: the connection still serves.
    let reused = async {
        let mut c = TcpStream::connect(s.addr()).await.unwrap();
        c.write_all(health).await.unwrap();
        assert_eq!(read_answer(&mut c).await.unwrap().0, 200);
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.write_all(health).await.unwrap();
        read_answer(&mut c).await
    };
    let (idle, reused) = tokio::join!(idle, reused);
    let after = idle.expect("still open after 20 s");
    eprintln!("idle connection closed {after:?} after its answer");
    assert!(
        after >= Duration::from_millis(2500) && after <= Duration::from_secs(6),
        "closed after {after:?}, the keep-alive timeout is 3 s"
    );
    let (status, body) = reused.expect("the kept-alive connection answers again");
    assert_eq!((status, body.as_str()), (200, "\"ok\""));
}

/// VmHWM (peak resident set) or VmRSS of `pid`, in bytes.
fn memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"));
    kb * 1024
}

#[tokio::test]
async fn large_bodies_beyond_max_requests_are_refused_before_they_are_read() {
    let _heavy = HEAVY.lock().await;
    let s = Server::start(&[("MAX_WORKERS", "1"), ("MAX_REQUESTS", "2")]).await;
    let pid = s.pid();
    let before = memory(pid, "VmHWM:");
    // A valid run padded with whitespace to the 16 MiB limit; the admitted ones run 1 s.
    let limit = 16usize << 20;
    let mut body =
        br#"{"language":"python3","code":"import time; time.sleep(1); print(1)"}"#.to_vec();
    body.resize(limit, b' ');
    let body = Arc::new(body);
    let clients = 60;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (addr, body) = (s.addr().to_string(), body.clone());
            tokio::spawn(async move {
                raw::exchange(&addr, raw::run_head("application/json", limit), body).await
            })
        })
        .collect();
    let mut refused = Vec::new();
    let mut ran = 0;
    for t in tasks {
        let a = t.await.unwrap().expect("an answer");
        let v: Value = serde_json::from_str(&a.body).unwrap_or(Value::Null);
        match a.status {
            503 => {
                assert_eq!(
                    v,
                    json!({"code": -503, "message": "Too many requests", "data": null})
                );
                refused.push(a.elapsed);
            }
            200 => {
                assert_eq!(v["data"]["stdout"], "1\n", "{v}");
                ran += 1;
            }
            other => panic!("HTTP {other}: {}", a.body),
        }
    }
    let peak = memory(pid, "VmHWM:");
    let slowest = refused.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{clients} x 16 MiB: {ran} ran, {} refused (slowest refusal {slowest:?}); server peak RSS {} MiB (before {} MiB, now {} MiB)",
        refused.len(),
        peak >> 20,
        before >> 20,
        memory(pid, "VmRSS:") >> 20
    );
    assert!(ran >= 1, "the admitted runs are answered");
    assert!(refused.len() >= clients - 10, "{} refused", refused.len());
    assert!(
        slowest < Duration::from_secs(5),
        "refusals wait for nothing: {slowest:?}"
    );
    // Two admitted bodies at a time, not sixty.
    assert!(
        peak < 200 << 20,
        "peak RSS {} MiB with {clients} bodies of 16 MiB",
        peak >> 20
    );
    assert_eq!(s.python("print('after')").await["stdout"], "after\n");
}
