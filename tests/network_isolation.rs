//! Networked runs in networks of their own, tried as an attacker would, as root on the
//! real kernel: a run reaches a stand-in external host (by name, TCP and UDP) and
//! nothing of the host it runs on (any of its addresses, loopback, metadata, its abstract
//! Unix sockets, its sockets in /proc/net), nor another run, nor a private range unless
//! `network_allow` opens it; the configured proxies stay reachable, on a private address
//! too; no other server's runs nor the host reach into a run or a kept namespace, and a
//! kept namespace that changed anyway is not handed out; when the plumbing cannot be
//! made, networked runs are refused and nothing is left behind; a server's network goes
//! with it, even when it is killed.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::net::{IpAddr, Ipv4Addr, TcpListener, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::netlab::{self, EXT, TCP_PORT, UDP_PORT};
use common::{Server, nix_kill};
use serde_json::{Value, json};

/// The tests take turns: some count the host's interfaces, tables and connections, which
/// every server's warm workers change.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn lab_server(extra: &[(&str, &str)]) -> Server {
    netlab::lab();
    let mut env = vec![("NETWORK_DNS", "198.51.100.2")];
    env.extend_from_slice(extra);
    Server::start(&env).await
}

async fn networked(s: &Server, language: &str, code: &str) -> Value {
    let (status, body) = s
        .run_json(json!({"language": language, "code": code, "enable_network": true}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["code"], 0, "{body}");
    body["data"].clone()
}

fn out(d: &Value) -> String {
    d["stdout"].as_str().unwrap_or_default().to_string()
}

/// Python that tries each `(host, port, proto[, source])` and prints one line each:
/// `ok <reply>` or `err <errno>`.
const TRY: &str = r#"
import socket, sys
def attempt(host, port, proto, source=None):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    try:
        s = socket.socket(family, kind)
        s.settimeout(2)
        if source:
            s.bind((source, 0))
        s.connect((host, port))
        s.send(b"probe")
        return "ok " + s.recv(100).decode(errors="replace")
    except OSError as e:
        return "err %s" % (e.errno if e.errno is not None else type(e).__name__)
for t in TARGETS:
    print(*t[:3], attempt(*t))
"#;

fn try_code(targets: &[(String, u16, &str, Option<&str>)]) -> String {
    let list: Vec<String> = targets
        .iter()
        .map(|(h, p, proto, src)| match src {
            Some(s) => format!("({h:?}, {p}, {proto:?}, {s:?})"),
            None => format!("({h:?}, {p}, {proto:?})"),
        })
        .collect();
    format!("TARGETS = [{}]\n{TRY}", list.join(", "))
}

/// Every address of this host, from the kernel's own lists.
fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let trie = std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
    let lines: Vec<&str> = trie.lines().collect();
    for w in lines.windows(2) {
        if w[1].contains("/32 host LOCAL")
            && let Ok(a) = w[0]
                .trim()
                .trim_start_matches("|--")
                .trim()
                .parse::<Ipv4Addr>()
        {
            out.push(IpAddr::V4(a));
        }
    }
    for line in std::fs::read_to_string("/proc/net/if_inet6")
        .unwrap_or_default()
        .lines()
    {
        let hex = line.split_whitespace().next().unwrap_or("");
        if hex.len() == 32 {
            let bytes: Vec<u8> = (0..16)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0))
                .collect();
            let arr: [u8; 16] = bytes.try_into().unwrap_or([0; 16]);
            out.push(IpAddr::V6(arr.into()));
        }
    }
    out.sort();
    out.dedup();
    out
}

#[tokio::test]
async fn a_networked_run_reaches_an_external_host_by_name_both_ways() {
    let _turn = SERIAL.lock().await;
    let s = lab_server(&[]).await;
    let code = format!(
        "import socket\naddr = socket.gethostbyname('{}')\nprint(addr)\n{}",
        netlab::NAME,
        try_code(&[
            (netlab::NAME.into(), TCP_PORT, "tcp", None),
            (EXT.to_string(), UDP_PORT, "udp", None),
        ])
    );
    let d = networked(&s, "python3", &code).await;
    assert_eq!(
        out(&d),
        format!(
            "198.51.100.2\n{} {TCP_PORT} tcp ok pong:probe\n198.51.100.2 {UDP_PORT} udp ok echo:probe\n",
            netlab::NAME
        ),
        "{d}"
    );
    // Node resolves and connects the same way.
    let node = format!(
        "const net = require('net');\nconst c = net.connect({TCP_PORT}, '{}', () => c.write('node'));\nc.on('data', d => {{ console.log(d.toString()); c.end(); }});\nc.on('error', e => console.log('error', e.code));",
        netlab::NAME
    );
    let d = networked(&s, "nodejs", &node).await;
    assert_eq!(out(&d), "pong:node\n", "{d}");
}

#[tokio::test]
async fn a_networked_run_reaches_nothing_of_the_host() {
    let _turn = SERIAL.lock().await;
    let s = lab_server(&[]).await;
    // Listeners on every address of the host, TCP and UDP, IPv4 and IPv6.
    let tcp4 = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = tcp4.local_addr().unwrap().port();
    let tcp6 = TcpListener::bind(("::", port)).ok();
    let udp4 = UdpSocket::bind(("0.0.0.0", port)).unwrap();
    udp4.set_nonblocking(true).unwrap();
    let mut targets: Vec<(String, u16, &str, Option<&str>)> = Vec::new();
    let addresses = host_addresses();
    assert!(addresses.iter().any(|a| !a.is_loopback()), "{addresses:?}");
    for a in &addresses {
        targets.push((a.to_string(), port, "tcp", None));
        targets.push((a.to_string(), port, "udp", None));
    }
    // Its loopback by name, a loopback source on the way to its address, the metadata
    // address, the broadcast address.
    let host_v4 = common::host_address().to_string();
    targets.push(("localhost".into(), port, "tcp", None));
    targets.push((host_v4.clone(), port, "tcp", Some("127.0.0.1")));
    targets.push(("169.254.169.254".into(), 80, "tcp", None));
    targets.push(("255.255.255.255".into(), port, "udp", None));
    let d = networked(&s, "python3", &try_code(&targets)).await;
    let lines = out(&d);
    assert_eq!(lines.lines().count(), targets.len(), "{d}");
    for line in lines.lines() {
        assert!(
            line.contains(" err ") && !line.contains(" ok "),
            "reached: {line}\n{lines}"
        );
    }
    // Nothing arrived, by UDP either.
    std::thread::sleep(Duration::from_millis(300));
    let mut buf = [0u8; 64];
    assert!(udp4.recv_from(&mut buf).is_err(), "a datagram arrived");
    drop((tcp4, tcp6));
}

#[tokio::test]
async fn concurrent_runs_cannot_reach_each_other() {
    let _turn = SERIAL.lock().await;
    let s = lab_server(&[("WARM_WORKERS", "0")]).await;
    // The listener reports whether anyone reached it while it waited.
    let listener = r#"
import socket, select
t = socket.socket(); t.bind(("0.0.0.0", 9000)); t.listen()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 9001))
r, _, _ = select.select([t, u], [], [], 4)
print("reached" if r else "alone")
"#;
    let waiting =
        s.spawn_run(json!({"language": "python3", "code": listener, "enable_network": true}));
    // Give it time to start; then try every run address and gateway there is.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut targets = Vec::new();
    for a in run_addresses("sbx") {
        for host in [a.0, a.1] {
            targets.push((host.to_string(), 9000, "tcp", None));
            targets.push((host.to_string(), 9001, "udp", None));
        }
    }
    assert!(!targets.is_empty(), "no run interface was found");
    let d = networked(&s, "python3", &try_code(&targets)).await;
    for line in out(&d).lines() {
        assert!(line.contains(" err "), "reached another run: {line}");
    }
    let first = waiting.await.unwrap();
    assert_eq!(first["data"]["stdout"], "alone\n", "{first}");
}

/// (gateway, run address) of every run interface on the host whose name starts with
/// `prefix`.
fn run_addresses(prefix: &str) -> Vec<(Ipv4Addr, Ipv4Addr)> {
    let o = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|n| n.starts_with(prefix))
        })
        .filter_map(|l| {
            let cidr = l.split_whitespace().nth(3)?;
            let gw: Ipv4Addr = cidr.split('/').next()?.parse().ok()?;
            Some((gw, Ipv4Addr::from(u32::from(gw) + 1)))
        })
        .collect()
}

#[tokio::test]
async fn the_hosts_abstract_unix_sockets_and_proc_net_are_out_of_sight() {
    let _turn = SERIAL.lock().await;
    let s = lab_server(&[]).await;
    let name = format!("sandbox-test-{}", std::process::id());
    let host_socket = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        UnixDatagram::bind_addr(&addr).unwrap()
    };
    host_socket.set_nonblocking(true).unwrap();
    let tcp = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let code = format!(
        r#"
import socket
name = b"\0{name}"
for how in ("socket", "socketpair"):
    try:
        if how == "socket":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        else:
            s, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.sendto(b"hello", name)
        print(how, "sent")
    except OSError as e:
        print(how, "err", e.errno)
own = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); own.bind(b"\0own-{name}"); own.listen()
tcp = open("/proc/net/tcp").read() + open("/proc/net/tcp6").read()
unix = open("/proc/net/unix").read()
print("host port seen" if ":%04X" % {port} in tcp else "host port unseen")
print("own name seen" if "own-{name}" in unix else "own name unseen")
print("host name seen" if "@{name}\n" in unix else "host name unseen")
"#
    );
    for network in [true, false] {
        let (status, body) = s
            .run_json(json!({"language": "python3", "code": code, "enable_network": network}))
            .await;
        assert_eq!(status, 200, "{body}");
        let text = body["data"]["stdout"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        // Sending may "succeed" into the run's own empty namespace (ECONNREFUSED there):
        // what matters is that nothing reaches the host's socket.
        assert!(
            text.contains("host port unseen"),
            "network={network}: {body}"
        );
        assert!(text.contains("own name seen"), "network={network}: {body}");
        assert!(
            text.contains("host name unseen"),
            "network={network}: {body}"
        );
    }
    let mut buf = [0u8; 64];
    assert!(
        host_socket.recv(&mut buf).is_err(),
        "the host's abstract socket got a message"
    );
    drop(tcp);
}

#[tokio::test]
async fn proxies_on_host_local_addresses_stay_reachable() {
    let _turn = SERIAL.lock().await;
    let host_v4 = common::host_address();
    let loopback = TcpListener::bind("127.0.0.1:0").unwrap();
    let local = TcpListener::bind((host_v4, 0)).unwrap();
    let (lp, hp) = (
        loopback.local_addr().unwrap().port(),
        local.local_addr().unwrap().port(),
    );
    for l in [loopback, local] {
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let mut c = c;
                let mut buf = [0u8; 64];
                let _ = std::io::Read::read(&mut c, &mut buf);
                let _ = std::io::Write::write_all(&mut c, b"proxied");
            }
        });
    }
    let http = format!("http://user:secret@127.0.0.1:{lp}");
    let https = format!("http://{host_v4}:{hp}");
    let s = lab_server(&[("HTTP_PROXY", &http), ("HTTPS_PROXY", &https)]).await;
    let code = r#"
import os, socket
from urllib.parse import urlsplit
for var in ("HTTP_PROXY", "HTTPS_PROXY"):
    u = urlsplit(os.environ[var])
    for port in (u.port, u.port + 1):
        try:
            c = socket.create_connection((u.hostname, port), timeout=2)
            c.send(b"CONNECT"); print(var, port == u.port, c.recv(20).decode())
        except OSError as e:
            print(var, port == u.port, "err", e.errno)
print(urlsplit(os.environ["HTTP_PROXY"]).username)
"#;
    let d = networked(&s, "python3", code).await;
    let text = out(&d);
    assert!(text.contains("HTTP_PROXY True proxied"), "{d}");
    assert!(text.contains("HTTPS_PROXY True proxied"), "{d}");
    // The proxy's port only, not its neighbours.
    assert!(text.contains("HTTP_PROXY False err"), "{d}");
    assert!(text.contains("HTTPS_PROXY False err"), "{d}");
    assert!(
        text.ends_with("user\n"),
        "the credentials stay in the URL: {d}"
    );
}

fn table_of(pid: u32) -> bool {
    let ns = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata("/proc/self/ns/pid").unwrap());
    let o = Command::new("nft")
        .args(["list", "tables", "inet"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).contains(&format!("sandbox_net_{ns}_{pid}"))
}

/// The interface names of the runs of the server with process id `pid` start with this
/// (its tag is its pid's last three hex digits, when no other server holds them).
fn interface_prefix(pid: u32) -> String {
    format!("sbx{:03x}", pid % 4096)
}

fn run_interfaces(pid: u32) -> usize {
    let prefix = interface_prefix(pid);
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .count()
}

/// Conntrack entries of runs to the lab.
fn lab_connections() -> usize {
    let o = Command::new("conntrack")
        .args(["-L", "-d", &EXT.to_string()])
        .output();
    let Ok(o) = o else { return 0 };
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.contains("src=10.213."))
        .count()
}

#[tokio::test]
async fn when_the_plumbing_cannot_be_made_networked_runs_are_refused_and_nothing_leaks() {
    let _turn = SERIAL.lock().await;
    // A subnet that overlaps the lab's route.
    let s = lab_server(&[("NETWORK_SUBNET", "198.51.96.0/20")]).await;
    let (status, body) = s
        .run_json(json!({"language": "python3", "code": "print(1)", "enable_network": true}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["code"], -500, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("network_subnet")
            && message.contains("overlaps")
            && message.contains("NETWORK_SUBNET"),
        "{message}"
    );
    let offline = s.python("print('offline still works')").await;
    assert_eq!(offline["stdout"], "offline still works\n");
    assert!(!table_of(s.pid()));
    assert_eq!(run_interfaces(s.pid()), 0);
    drop(s);

    // IPv4 forwarding off, and not switchable: a private mount of a file saying 0.
    let fake = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(fake.path(), "0\n").unwrap();
    let port = common::free_port();
    let script = format!(
        "mount --bind -o ro {} /proc/sys/net/ipv4/ip_forward && exec {} serve",
        fake.path().display(),
        common::bin()
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("SANDBOX_PORT", port.to_string())
        .env("SANDBOX_LOG", "error")
        .current_dir(std::env::temp_dir())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/sandbox/run");
    let mut answer = Value::Null;
    for _ in 0..100 {
        if let Ok(r) = client
            .post(&url)
            .header("X-Api-Key", common::KEY)
            .json(&json!({"language": "python3", "code": "print(1)", "enable_network": true}))
            .send()
            .await
        {
            answer = r.json().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let message = answer["message"].as_str().unwrap_or_default().to_string();
    assert!(
        message.contains("ip_forward") && message.contains("sysctl"),
        "{answer}"
    );
    assert!(
        !table_of(child.id()),
        "no table for a network that was refused"
    );
    assert_eq!(run_interfaces(child.id()), 0);
    let _ = nix_kill(child.id(), "TERM");
    let _ = child.wait();
}

#[tokio::test]
async fn a_servers_network_goes_with_it_even_when_it_is_killed() {
    let _turn = SERIAL.lock().await;
    let connect = try_code(&[(EXT.to_string(), TCP_PORT, "tcp", None)]);
    let s = lab_server(&[("WARM_WORKERS", "1")]).await;
    let d = networked(&s, "python3", &connect).await;
    assert!(out(&d).contains("ok pong:probe"), "{d}");
    // A finished run's connections are forgotten once it is released.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        lab_connections(),
        0,
        "a finished run's conntrack entries remain"
    );
    assert!(table_of(s.pid()));
    assert!(
        run_interfaces(s.pid()) > 0,
        "the warm networked workers' interfaces"
    );
    let pid = s.pid();
    s.terminate();
    assert!(!table_of(pid), "the table outlived its server");
    assert_eq!(run_interfaces(pid), 0, "interfaces outlived their server");

    // Killed mid-run, with a connection open: the next server clears it all.
    let s = lab_server(&[("WARM_WORKERS", "1")]).await;
    let hold = format!(
        "import socket, time\nc = socket.create_connection(('{EXT}', {TCP_PORT}))\nprint('open', flush=True)\ntime.sleep(30)"
    );
    let pending = s.spawn_run(json!({"language": "python3", "code": hold, "enable_network": true}));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(lab_connections() > 0, "the held connection is tracked");
    let killed = s.pid();
    let _ = nix_kill(killed, "KILL");
    drop(s);
    let _ = pending.await;
    let next = lab_server(&[("WARM_WORKERS", "0")]).await;
    assert!(
        !table_of(killed),
        "the killed server's table is removed at the next start"
    );
    assert_eq!(
        run_interfaces(killed),
        0,
        "the killed server's interfaces are removed"
    );
    assert_eq!(
        lab_connections(),
        0,
        "the killed server's connections are forgotten"
    );
    drop(next);
}

#[tokio::test]
async fn offline_runs_keep_an_empty_network_and_pairs_of_sockets() {
    let _turn = SERIAL.lock().await;
    let s = lab_server(&[]).await;
    let code = r#"
import asyncio, socket
print([l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:]])
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
a.send(b"self")
print(b.recv(10))
c, d = socket.socketpair()
c.sendall(b"stream"); print(d.recv(10))
async def main():
    await asyncio.sleep(0)
    return "asyncio ok"
print(asyncio.run(main()))
try:
    socket.create_connection((%r, %d), timeout=2)
    print("reached")
except OSError as e:
    print("offline", e.errno)
"#
    .replace("%r", &format!("'{EXT}'"))
    .replace("%d", &TCP_PORT.to_string());
    let d = s.python(&code).await;
    assert_eq!(
        out(&d),
        "['lo']\nb'self'\nb'stream'\nasyncio ok\noffline 1\n",
        "{d}"
    );
}

#[tokio::test]
async fn many_networked_runs_leave_no_interface_or_connection_behind() {
    let _turn = SERIAL.lock().await;
    let connect = try_code(&[(EXT.to_string(), TCP_PORT, "tcp", None)]);
    // No warm workers: every interface of this server belongs to a run in progress.
    let s = lab_server(&[("WARM_WORKERS", "0"), ("WORKER_TIMEOUT", "2")]).await;
    for _ in 0..3 {
        let mut batch = Vec::new();
        for i in 0..8 {
            // Some runs are killed by the timeout with their connection still open.
            let code = if i % 4 == 0 {
                format!(
                    "{connect}\nimport time\ns = __import__('socket').create_connection(('{EXT}', {TCP_PORT}))\ntime.sleep(10)"
                )
            } else {
                connect.clone()
            };
            batch.push(
                s.spawn_run(json!({"language": "python3", "code": code, "enable_network": true})),
            );
        }
        for run in batch {
            let body = run.await.unwrap();
            assert_eq!(body["code"], 0, "{body}");
            assert!(out(&body["data"]).contains("ok pong:probe"), "{body}");
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while (run_interfaces(s.pid()) > 0 || lab_connections() > 0)
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        run_interfaces(s.pid()),
        0,
        "finished runs' interfaces remain"
    );
    assert_eq!(lab_connections(), 0, "finished runs' connections remain");
}

/// Prints the run's network namespace cookie (never reused, unlike its inode number) and
/// a digest of what a run can read about its namespace, then runs `LEAVE`. Sockstat's
/// orphan, alloc and mem fields count every namespace of the host, so they are left out.
const NAMESPACE_PROBE: &str = r#"
import array, hashlib, re, socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), "little")  # SO_NETNS_COOKIE
s.close()
seen = "".join(open("/proc/net/" + f).read() for f in ("snmp", "sockstat", "tcp", "udp", "unix"))
seen = re.sub(r" (orphan|alloc|mem) \d+", "", seen)
print(cookie, hashlib.sha256(seen.encode()).hexdigest()[:16], flush=True)
"#;

async fn namespace_probe(s: &Server, leave: &str) -> (String, String) {
    // The previous run's namespace is kept (or not) once its run is released, after
    // its answer.
    s.settled().await;
    let d = networked(s, "python3", &format!("{NAMESPACE_PROBE}{leave}")).await;
    let text = out(&d);
    let mut words = text.split_whitespace().map(str::to_string);
    match (words.next(), words.next()) {
        (Some(cookie), Some(digest)) => (cookie, digest),
        _ => panic!("no probe line: {d}"),
    }
}

#[tokio::test]
async fn a_namespace_serves_the_next_run_only_when_its_run_left_nothing_in_it() {
    let _turn = SERIAL.lock().await;
    // No warm workers: each run takes the namespace the previous one left, if any.
    let s = lab_server(&[("WARM_WORKERS", "0"), ("WORKER_TIMEOUT", "2")]).await;
    let fresh = namespace_probe(&s, "").await;
    let kept = namespace_probe(&s, "").await;
    assert_eq!(
        kept.0, fresh.0,
        "an untouched namespace serves the next run"
    );
    assert_eq!(
        kept.1, fresh.1,
        "and looks to it as it did when it was made"
    );

    // Each trace a run can leave; `certain`: the trace outlives the run for sure (a
    // cycle of unix sockets in flight may be collected before the check).
    let traces = [
        (
            "a UDP datagram",
            "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))",
            true,
        ),
        (
            "a TCP connection in TIME_WAIT",
            "l = socket.create_server(('127.0.0.1', 0))\nc = socket.create_connection(l.getsockname())\na, _ = l.accept()\nc.close()\ntime.sleep(0.1)",
            true,
        ),
        (
            "a packet to the outside",
            &format!(
                "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('{EXT}', {UDP_PORT}))"
            ),
            true,
        ),
        ("a run killed by the timeout", "time.sleep(30)", true),
        (
            "a multicast group, whose reports the kernel sends later",
            "try:\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton('239.1.1.1') + socket.inet_aton('0.0.0.0'))\nexcept OSError:\n    pass",
            false,
        ),
        (
            "unix sockets in flight",
            "a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)\na.sendmsg([b'x'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [a.fileno(), b.fileno()]))])",
            false,
        ),
    ];
    for (what, leave, certain) in traces {
        // Start from a kept namespace, so a discarded one shows as a new cookie.
        let start = namespace_probe(&s, "").await;
        let traced = namespace_probe(&s, leave).await;
        assert_eq!(traced.0, start.0, "{what}: runs in the kept namespace");
        // Past the kernel's timers (multicast reports go out within about a second).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let next = namespace_probe(&s, "").await;
        if certain {
            assert_ne!(
                next.0, traced.0,
                "{what}: a namespace with a trace was reused"
            );
        }
        assert_eq!(
            next.1, fresh.1,
            "{what}: the next run sees something of the one before"
        );
    }
    let pid = s.pid();
    assert!(run_interfaces(pid) > 0, "the kept namespace's veth pair");
    s.terminate();
    assert_eq!(
        run_interfaces(pid),
        0,
        "kept namespaces outlived their server"
    );
}

#[tokio::test]
async fn a_run_has_no_ipv6_and_joins_no_multicast_group() {
    let _turn = SERIAL.lock().await;
    let s = lab_server(&[]).await;
    let code = r#"
import socket
try:
    socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    print("ipv6 socket")
except OSError as e:
    print(e.errno)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for group in ("239.1.1.1", "224.0.0.251"):
    try:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + socket.inet_aton("0.0.0.0"))
        print("joined", group)
    except OSError as e:
        print(e.errno)
"#;
    let d = networked(&s, "python3", code).await;
    // EAFNOSUPPORT, as on a kernel without IPv6; ENOBUFS: no group may be joined.
    assert_eq!(
        out(&d),
        format!(
            "{}\n{}\n{}\n",
            libc::EAFNOSUPPORT,
            libc::ENOBUFS,
            libc::ENOBUFS
        ),
        "{d}"
    );
}

/// Every way into the runs of the server `pid` there is from beside it: runs of a server
/// sharing the host's network, of an isolated server on the same subnet and of one on
/// another subnet, each trying every address and gateway of those runs (TCP and UDP),
/// and each refused on its own side (a reset: ECONNREFUSED); then the host itself (this
/// test, as root, no sandbox uid) sending to the runs' addresses.
async fn reach_into_runs_of(pid: u32, attackers: &[&Server]) {
    let addresses = run_addresses(&interface_prefix(pid));
    assert!(!addresses.is_empty(), "no run interface of {pid}");
    let mut targets = Vec::new();
    for (gateway, address) in &addresses {
        for host in [gateway, address] {
            targets.push((host.to_string(), 9000, "tcp", None));
            targets.push((host.to_string(), 9001, "udp", None));
        }
    }
    let code = try_code(&targets);
    for attacker in attackers {
        let d = networked(attacker, "python3", &code).await;
        let lines = out(&d);
        assert_eq!(lines.lines().count(), targets.len(), "{d}");
        for line in lines.lines() {
            assert!(
                line.contains(" err "),
                "reached a run of another server: {line}"
            );
            if line.contains(" tcp ") {
                let refused = format!(" err {}", libc::ECONNREFUSED);
                assert!(line.ends_with(&refused), "not refused by its guard: {line}");
            }
        }
    }
    let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
    for (_, address) in &addresses {
        let _ = udp.send_to(b"x", (*address, 9001));
        let _ = std::net::TcpStream::connect_timeout(
            &(*address, 9000).into(),
            Duration::from_millis(300),
        );
    }
    // Anything that got through has arrived by now.
    tokio::time::sleep(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn other_servers_runs_and_the_host_reach_neither_a_run_nor_a_kept_namespace() {
    let _turn = SERIAL.lock().await;
    let s = lab_server(&[("WARM_WORKERS", "0"), ("WORKER_TIMEOUT", "20")]).await;
    // Their operators opened 10.0.0.0/8, where runs' subnets lie: runs stay out of it.
    let open = ("NETWORK_ALLOW", "0.0.0.0/0,10.0.0.0/8");
    let shared = lab_server(&[("WARM_WORKERS", "0"), ("NETWORK_ISOLATION", "shared"), open]).await;
    let same = lab_server(&[("WARM_WORKERS", "0"), open]).await;
    let other = lab_server(&[
        ("WARM_WORKERS", "0"),
        ("NETWORK_SUBNET", "10.214.0.0/20"),
        open,
    ])
    .await;
    let attackers = [&shared, &same, &other];

    // A kept namespace: had anything reached it, the next run would get a new one (the
    // handover check) or see what arrived.
    let kept = namespace_probe(&s, "").await;
    reach_into_runs_of(s.pid(), &attackers).await;
    let next = namespace_probe(&s, "").await;
    assert_eq!(next, kept, "the kept namespace was reached while it waited");

    // A run in progress, listening, which sends nothing itself: nothing arrives.
    let listener = r#"
import select, socket
def received():
    ip = [l.split() for l in open("/proc/net/snmp") if l.startswith("Ip:")]
    return dict(zip(ip[0], ip[1]))["InReceives"]
before = received()
t = socket.socket(); t.bind(("0.0.0.0", 9000)); t.listen()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 9001))
r, _, _ = select.select([t, u], [], [], 8)
print("reached" if r else "alone", before == received())
"#;
    s.settled().await;
    let waiting =
        s.spawn_run(json!({"language": "python3", "code": listener, "enable_network": true}));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    reach_into_runs_of(s.pid(), &attackers).await;
    let body = waiting.await.unwrap();
    assert_eq!(body["data"]["stdout"], "alone True\n", "{body}");
}

/// The paths of the network namespaces the process `pid` holds descriptors of, its own
/// (the host's) excepted.
fn namespace_descriptors(pid: u32) -> Vec<String> {
    let own = std::fs::read_link("/proc/self/ns/net").unwrap();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?;
            (target.to_string_lossy().starts_with("net:[") && target != own)
                .then(|| e.path().to_string_lossy().into_owned())
        })
        .collect()
}

#[tokio::test]
async fn a_kept_namespace_that_changed_while_it_waited_is_not_handed_out() {
    let _turn = SERIAL.lock().await;
    let s = lab_server(&[("WARM_WORKERS", "0")]).await;
    let fresh = namespace_probe(&s, "").await;
    let kept = namespace_probe(&s, "").await;
    assert_eq!(kept, fresh, "an untouched namespace is kept");
    s.settled().await;
    // Something moves its counters after it was parked: a datagram on its loopback,
    // sent from inside it through the server's own descriptor of it.
    let held = namespace_descriptors(s.pid());
    assert_eq!(held.len(), 1, "one kept namespace: {held:?}");
    let o = Command::new("nsenter")
        .arg(format!("--net={}", held[0]))
        .args([
            "python3",
            "-c",
            "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let next = namespace_probe(&s, "").await;
    assert_ne!(
        next.0, kept.0,
        "a namespace that changed while it was kept was handed out"
    );
    assert_eq!(next.1, fresh.1, "the next run's namespace reads as made");
    // And that one is kept in turn.
    let again = namespace_probe(&s, "").await;
    assert_eq!(again.0, next.0);
}

#[tokio::test]
async fn private_ranges_are_refused_unless_allowed_and_a_proxy_there_stays_reachable() {
    let _turn = SERIAL.lock().await;
    let private = netlab::lab().private_addresses().to_vec();
    let (proxy, opened) = (private[0], private[1]);
    let mut targets: Vec<(String, u16, &str, Option<&str>)> = private
        .iter()
        .map(|a| (a.to_string(), TCP_PORT, "tcp", None))
        .collect();
    targets.push((opened.to_string(), UDP_PORT, "udp", None));
    targets.push((EXT.to_string(), TCP_PORT, "tcp", None));
    let code = try_code(&targets);
    // What each target gave, in order.
    let results = |d: &Value| -> Vec<bool> {
        let lines = out(d);
        assert_eq!(lines.lines().count(), targets.len(), "{d}");
        lines.lines().map(|l| l.contains(" ok ")).collect()
    };
    let refused_at_once = |d: &Value, host: Ipv4Addr| {
        let line = format!("{host} {TCP_PORT} tcp err {}", libc::ECONNREFUSED);
        assert!(out(d).contains(&line), "{line}: {d}");
    };

    // By default none is reached but the proxy, configured on a private address.
    let http = format!("http://{proxy}:{TCP_PORT}");
    let s = lab_server(&[("HTTP_PROXY", &http), ("WARM_WORKERS", "0")]).await;
    let d = networked(&s, "python3", &code).await;
    assert_eq!(
        results(&d),
        [true, false, false, false, false, true],
        "proxy, the other private addresses, UDP, the outside: {d}"
    );
    refused_at_once(&d, opened);
    drop(s);

    // network_allow names one address and port: that opens, the rest of the private
    // ranges stays refused, and 0.0.0.0/0 keeps the outside reachable.
    let allow = format!("0.0.0.0/0,{opened}:{TCP_PORT}");
    let s = lab_server(&[("NETWORK_ALLOW", &allow), ("WARM_WORKERS", "0")]).await;
    let d = networked(&s, "python3", &code).await;
    assert_eq!(
        results(&d),
        [false, true, false, false, false, true],
        "not a proxy any more, the address opened, the others, another port, the outside: {d}"
    );
    refused_at_once(&d, proxy);
    drop(s);

    // Without 0.0.0.0/0 the list is an allow-list: the opened address only.
    let allow = format!("{opened}:{TCP_PORT}");
    let s = lab_server(&[("NETWORK_ALLOW", &allow), ("WARM_WORKERS", "0")]).await;
    let d = networked(&s, "python3", &code).await;
    assert_eq!(
        results(&d),
        [false, true, false, false, false, false],
        "{d}"
    );
}
