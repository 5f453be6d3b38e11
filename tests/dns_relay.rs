//! The DNS relay under a flood, as root on the real kernel through a real `sandbox
//! serve`: one run sending hundreds of queries nobody answers (in a burst, or as fast
//! as it can for seconds), or holding hundreds of TCP connections to its gateway's
//! port 53, gets refusals beyond its quota, and another run's lookups keep their
//! latency (measured against a baseline taken in the same test); so do runs that
//! filled their quotas and ended, their queries dropped with them. It passes on queries
//! only, and serves runs only, not a host process bound to a run's gateway address.
//! The upstream is a stand-in resolver in this test process on a loopback
//! address of its own: it answers every name at once except those under `void.test`,
//! which it never answers. No query leaves this machine.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Server;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// The relay's quotas, as README documents them.
const RUN_QUERIES: usize = 32;
const RUN_CONNECTIONS: usize = 8;
/// How long the relay waits for the upstream before a query stops counting.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// What every known name resolves to (TEST-NET-1: only ever a string here).
const KNOWN: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
/// What `poll-*.signal.test` resolves to once the test has said stop.
const STOP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 8);

/// The tests take turns: each measures latency, which the other's flood would disturb.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A query the stand-in resolver received: its name, over TCP or not, and when.
#[derive(Clone, Debug)]
struct Seen {
    name: String,
    tcp: bool,
    at: Instant,
}

/// What the stand-in resolver was asked, and whether runs that poll it should stop.
#[derive(Clone, Default)]
struct Log {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Every message received, whatever it is, with its header's byte 2 (QR, opcode).
    raw: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Log {
    fn received(&self, m: &[u8], tcp: bool) {
        self.raw.lock().unwrap().push(format!(
            "{} bytes over {}, byte 2 {:?}: {:?}",
            m.len(),
            if tcp { "TCP" } else { "UDP" },
            m.get(2),
            String::from_utf8_lossy(m)
        ));
    }

    fn raw(&self) -> Vec<String> {
        self.raw.lock().unwrap().clone()
    }

    fn push(&self, name: String, tcp: bool) {
        self.seen.lock().unwrap().push(Seen {
            name,
            tcp,
            at: Instant::now(),
        });
    }

    fn matching(&self, f: impl Fn(&Seen) -> bool) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| f(s))
            .cloned()
            .collect()
    }

    /// The first query whose name starts with `prefix`, waited for up to `within`.
    async fn wait_for(&self, prefix: &str, within: Duration) -> Seen {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.matching(|s| s.name.starts_with(prefix)).pop() {
                return s;
            }
            assert!(Instant::now() < deadline, "no query for {prefix}* arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The question's name of a DNS query, lowercased; `None` when it does not parse.
fn question_name(q: &[u8]) -> Option<(String, usize)> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*q.get(i)?);
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i + 1..i + 1 + len)?).to_lowercase());
        i += 1 + len;
    }
    // The name, its root label, type and class.
    Some((labels.join("."), i + 5))
}

/// The answer to `q`: an A record for any name but those under `void.test`, which
/// get none at all; `poll-*.signal.test` resolves to `STOP` once `stop` is set.
fn answer(q: &[u8], stop: bool) -> Option<(String, Option<Vec<u8>>)> {
    let (name, end) = question_name(q)?;
    if name.ends_with(".void.test") {
        return Some((name, None));
    }
    let address = if stop && name.starts_with("poll-") {
        STOP
    } else {
        KNOWN
    };
    let mut a = q[..2].to_vec();
    a.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
    a.extend_from_slice(q.get(12..end)?);
    a.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    a.extend_from_slice(&address.octets());
    Some((name, Some(a)))
}

/// The stand-in resolver on `addr`:53, UDP and TCP, logging what it is asked.
async fn stand_in(addr: Ipv4Addr, log: Log) {
    let udp = UdpSocket::bind((addr, 53))
        .await
        .expect("bind the stand-in");
    let tcp = TcpListener::bind((addr, 53))
        .await
        .expect("bind the stand-in");
    let udp_log = log.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            udp_log.received(&buf[..n], false);
            if let Some((name, reply)) = answer(&buf[..n], udp_log.stop.load(Ordering::SeqCst)) {
                udp_log.push(name, false);
                if let Some(reply) = reply {
                    let _ = udp.send_to(&reply, from).await;
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = tcp.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                while let Ok(len) = conn.read_u16().await {
                    let mut q = vec![0u8; usize::from(len)];
                    if conn.read_exact(&mut q).await.is_err() {
                        return;
                    }
                    log.received(&q, true);
                    let Some((name, reply)) = answer(&q, log.stop.load(Ordering::SeqCst)) else {
                        return;
                    };
                    log.push(name, true);
                    let Some(reply) = reply else {
                        // Never answered: held until the relay gives up.
                        let _ = conn.read_u8().await;
                        return;
                    };
                    let len = u16::try_from(reply.len()).unwrap();
                    if conn.write_u16(len).await.is_err() || conn.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// A loopback address of test `test`'s own in this process, so that no two tests
/// (here or in parallel test processes) share a resolver.
fn stand_in_address(test: u8) -> Ipv4Addr {
    let pid = std::process::id();
    Ipv4Addr::new(127, 53 + test, (pid >> 8) as u8, pid as u8)
}

/// A server relaying to a stand-in resolver of test `test`'s own.
async fn lab(test: u8) -> (Server, Log) {
    lab_with(test, &[]).await
}

/// `lab` with more of the server's settings.
async fn lab_with(test: u8, env: &[(&str, &str)]) -> (Server, Log) {
    let log = Log::default();
    let addr = stand_in_address(test);
    stand_in(addr, log.clone()).await;
    let dns = addr.to_string();
    let mut env = env.to_vec();
    env.extend([("NETWORK_DNS", dns.as_str()), ("WORKER_TIMEOUT", "20")]);
    let server = Server::start(&env).await;
    (server, log)
}

async fn networked(s: &Server, code: &str) -> String {
    let (status, body) = s
        .run_json(json!({"language": "python3", "code": code, "enable_network": true}))
        .await;
    output(status, &body)
}

fn output(status: u16, body: &Value) -> String {
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["code"], 0, "{body}");
    assert_eq!(body["data"]["error"], "", "{body}");
    body["data"]["stdout"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// What every run's code starts with: its gateway (its only nameserver), a DNS query
/// by hand, a UDP socket to the gateway, and `signal(name)`, a query the test waits for
/// (it returns the address the name resolved to).
const PRELUDE: &str = r#"
import socket, struct, time
gw = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
def query(i, name):
    header = struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return header + labels + b"\0\0\1\0\1"
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.connect((gw, 53))
def signal(name):
    udp.send(query(1, name))
    udp.settimeout(2)
    return socket.inet_ntoa(udp.recv(512)[-4:])
def refusals(within):
    n = 0
    udp.settimeout(within)
    try:
        while True:
            if udp.recv(512)[3] & 15 == 5:
                n += 1
    except socket.timeout:
        return n
"#;

/// The victim: the worst of five lookups through the system's resolver (glibc, UDP)
/// and of five by hand over TCP, in milliseconds, with what the names resolved to.
const LOOKUPS: &str = r#"
def recv_all(c, n):
    b = b""
    while len(b) < n:
        chunk = c.recv(n - len(b))
        if not chunk:
            raise OSError("closed")
        b += chunk
    return b
def by_tcp(i, name):
    with socket.create_connection((gw, 53), timeout=5) as c:
        m = query(i, name)
        c.sendall(struct.pack(">H", len(m)) + m)
        a = recv_all(c, struct.unpack(">H", recv_all(c, 2))[0])
        return socket.inet_ntoa(a[-4:]) if a[3] & 15 == 0 and a[7] == 1 else "rcode %d" % (a[3] & 15)
worst_udp = worst_tcp = 0
addresses = set()
for i in range(5):
    t = time.perf_counter()
    addresses.add(socket.gethostbyname("udp%d-%s.ok.test" % (i, TAG)))
    worst_udp = max(worst_udp, time.perf_counter() - t)
    t = time.perf_counter()
    addresses.add(by_tcp(i, "tcp%d-%s.ok.test" % (i, TAG)))
    worst_tcp = max(worst_tcp, time.perf_counter() - t)
print(",".join(sorted(addresses)), round(worst_udp * 1000, 2), round(worst_tcp * 1000, 2))
"#;

/// The victim's worst UDP and TCP lookup times, checking every name resolved.
async fn victim(s: &Server, tag: &str) -> (f64, f64) {
    let out = networked(s, &format!("TAG = {tag:?}\n{PRELUDE}\n{LOOKUPS}")).await;
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{out}");
    assert_eq!(fields[0], KNOWN.to_string(), "every lookup answered: {out}");
    (fields[1].parse().unwrap(), fields[2].parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flood_by_one_run_leaves_another_runs_lookups_their_latency() {
    let _turn = SERIAL.lock().await;
    let (s, log) = lab(0).await;
    let baseline = victim(&s, "before").await;

    // 300 queries nobody answers, as fast as the run can send them; then it counts the
    // refusals that come back, times its own lookup (over its quota) until it fails,
    // and ends (its queries then stop counting: see `ended_runs_leave_the_relay_to_the_next`).
    let flood = format!(
        "{PRELUDE}
for i in range(300):
    udp.send(query(i, 'n%d.flood.void.test' % i))
refused = refusals(0.3)
t = time.perf_counter()
try:
    socket.getaddrinfo('own.ok.test', 80, socket.AF_INET)
    failed = 'resolved'
except socket.gaierror as e:
    failed = str(e.errno)
own = (time.perf_counter() - t) * 1000
print(refused, failed, round(own, 2))
"
    );
    let out = networked(&s, &flood).await;
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{out}");
    let refused: usize = fields[0].parse().unwrap();
    let (failed, own): (&str, f64) = (fields[1], fields[2].parse().unwrap());
    let during = victim(&s, "during").await;

    let admitted = log.matching(|q| q.name.ends_with(".flood.void.test"));
    let victims = log.matching(|q| q.name.contains("-during.ok.test"));
    let flood_at = admitted.iter().map(|q| q.at).min().unwrap();
    let victim_at = victims.iter().map(|q| q.at);
    println!(
        "flood: {} queries passed to the upstream, {refused} refused, the flooder's own lookup failed ({failed}) in {own} ms; the victim asked {:?} to {:?} after the flood; its worst lookup (UDP, TCP): before {baseline:?} ms, during {during:?} ms",
        admitted.len(),
        victim_at.clone().min().unwrap() - flood_at,
        victim_at.max().unwrap() - flood_at,
    );
    assert!(during.0 < 100.0 && during.1 < 100.0, "{during:?} ms");
    assert_eq!(admitted.len(), RUN_QUERIES, "the run's quota and no more");
    // Over its quota, the run's own resolver gives up at once: EAI_AGAIN ("Temporary
    // failure in name resolution") after the refusals, not after its 5 s timeout.
    assert_eq!(failed, "-3", "{out}");
    assert!(own < 100.0, "{own} ms");
    assert!(
        (200..=300 - RUN_QUERIES).contains(&refused),
        "the rest refused, not dropped: {refused}"
    );
    // The victim ran while the flood's queries would still be held, had they not ended
    // with their run.
    let last = victims.iter().map(|q| q.at).max().unwrap();
    assert!(
        last < flood_at + UPSTREAM_TIMEOUT,
        "the victim came too late to meet the flood"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_unanswered_queries_count_against_it_only_until_the_upstream_deadline() {
    let _turn = SERIAL.lock().await;
    let (s, log) = lab(1).await;
    // 40 queries nobody answers; once the relay has given them up, 40 more.
    let code = format!(
        "{PRELUDE}
for i in range(40):
    udp.send(query(i, 'first%d.void.test' % i))
first = refusals(0.3)
time.sleep({wait})
for i in range(40):
    udp.send(query(i, 'second%d.void.test' % i))
print(first, refusals(0.3))
",
        wait = UPSTREAM_TIMEOUT.as_secs_f64() + 0.2
    );
    let out = networked(&s, &code).await;
    let first = log.matching(|q| q.name.starts_with("first"));
    let second = log.matching(|q| q.name.starts_with("second"));
    let expected = format!("{0} {0}\n", 40 - RUN_QUERIES);
    assert_eq!(out, expected, "refused, each time beyond the quota");
    assert_eq!(
        (first.len(), second.len()),
        (RUN_QUERIES, RUN_QUERIES),
        "the quota is whole again after the deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_holding_tcp_connections_keep_their_quota_and_others_their_latency() {
    let _turn = SERIAL.lock().await;
    let (s, log) = lab(2).await;
    let baseline = victim(&s, "before").await;

    // Two runs, each with as many connections to its gateway's port 53 as its
    // descriptors allow (together more than the relay's capacity), none sending a byte;
    // refilled every 200 ms as the relay closes them, until the test says stop. Each
    // round, each reports how many stayed open: `poll-<run>-<round>-<open>`.
    let holders: Vec<_> = ["one", "two"]
        .into_iter()
        .map(|name| {
            let code = format!(
                "NAME = {name:?}
{PRELUDE}
def opened():
    try:
        c = socket.socket()
        c.settimeout(0.1)
        c.connect((gw, 53))
        c.setblocking(False)
        return c
    except OSError:
        return None
def alive(c):
    try:
        return c.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b''
    except BlockingIOError:
        return True
    except OSError:
        return False
conns, rounds = [], []
end = time.time() + 15
while time.time() < end:
    conns = [c for c in conns if alive(c) or c.close()]
    rounds.append(len(conns))
    if signal('poll-%s-%d-%d.signal.test' % (NAME, len(rounds), len(conns))) == '{STOP}':
        break
    while len(conns) < 230:
        c = opened()
        if c is None:
            break
        conns.append(c)
    time.sleep(0.2)
print(' '.join(map(str, rounds[1:])))
"
            );
            s.spawn_run(json!({"language": "python3", "code": code, "enable_network": true}))
        })
        .collect();
    // Both have filled their connections once.
    let mut held_from = None;
    for name in ["one", "two"] {
        let signal = log
            .wait_for(&format!("poll-{name}-2-"), Duration::from_secs(20))
            .await;
        held_from = held_from.max(Some(signal.at));
    }
    let during = victim(&s, "during").await;
    let stop_at = Instant::now();
    log.stop.store(true, Ordering::SeqCst);
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    for holding in holders {
        rounds.push(
            output(200, &holding.await.unwrap())
                .split_whitespace()
                .map(|n| n.parse().unwrap())
                .collect(),
        );
    }

    let victims = log.matching(|q| q.tcp && q.name.contains("-during.ok.test"));
    println!(
        "holders' open connections at each round: {rounds:?}; victim's worst lookup (UDP, TCP): before {baseline:?} ms, during {during:?} ms"
    );
    assert!(during.0 < 100.0 && during.1 < 100.0, "{during:?} ms");
    for r in &rounds {
        assert!(
            r.iter().all(|&n| n <= RUN_CONNECTIONS),
            "never more than its quota: {r:?}"
        );
        assert!(r.contains(&RUN_CONNECTIONS), "its quota, held: {r:?}");
    }
    assert_eq!(
        victims.len(),
        5,
        "the victim's TCP queries reached the upstream"
    );
    assert!(
        victims
            .iter()
            .all(|q| Some(q.at) > held_from && q.at < stop_at),
        "asked while both held their connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sustained_udp_flood_by_one_run_leaves_another_runs_lookups_their_latency() {
    let _turn = SERIAL.lock().await;
    let (s, log) = lab(3).await;
    let baseline = victim(&s, "before").await;
    // As many queries as the run can send, for FLOOD seconds, the refusals read and
    // thrown away: far more than the relay's socket could buffer, were they not
    // dropped beyond the run's rate before they reach it.
    const FLOOD: Duration = Duration::from_secs(4);
    let code = format!(
        "{PRELUDE}
udp.setblocking(False)
sent = 0
end = time.time() + {flood}
while time.time() < end:
    for i in range(100):
        try:
            udp.send(query(i, 'n%d.sustained.void.test' % i))
            sent += 1
        except OSError:
            pass
    try:
        while True:
            udp.recv(512)
    except OSError:
        pass
print(sent)
",
        flood = FLOOD.as_secs_f64()
    );
    let flooding =
        s.spawn_run(json!({"language": "python3", "code": code, "enable_network": true}));
    let started = log
        .wait_for("n0.sustained.void.test", Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = victim(&s, "during").await;
    let sent = output(200, &flooding.await.unwrap());
    let victims = log.matching(|q| q.name.contains("-during.ok.test"));
    let admitted = log.matching(|q| q.name.ends_with(".sustained.void.test"));
    println!(
        "sustained flood: {} queries sent in {FLOOD:?}, {} passed to the upstream; victim's worst lookup (UDP, TCP): before {baseline:?} ms, during {during:?} ms",
        sent.trim(),
        admitted.len()
    );
    assert!(during.0 < 100.0 && during.1 < 100.0, "{during:?} ms");
    // Its quota, given back once (after UPSTREAM_TIMEOUT) within the flood.
    assert!(
        admitted.len() >= RUN_QUERIES && admitted.len() <= 2 * RUN_QUERIES,
        "{}",
        admitted.len()
    );
    assert!(
        victims.iter().all(|q| q.at < started.at + FLOOD),
        "the victim ran during the flood"
    );
}

/// Eight runs, two at a time, each fill their quota with queries nobody answers (over
/// UDP, or over TCP to a resolver that takes them and never answers) and end: more
/// than the relay holds in all for a server of 4 workers. Their queries stop counting
/// as their runs end, so the next run's lookups keep their latency.
async fn ended_runs_leave_the_relay_to_the_next(test: u8, tcp: bool) {
    let _turn = SERIAL.lock().await;
    let (s, log) = lab_with(test, &[("MAX_WORKERS", "4")]).await;
    let baseline = victim(&s, "before").await;
    const RUNS: usize = 8;
    let each = if tcp { RUN_CONNECTIONS } else { RUN_QUERIES };
    // Each reports what the relay turned away: refusals over UDP, or connections
    // closed on it over TCP; none, so the relay held all of them when the run ended.
    let code = |run: usize| {
        format!(
            "{PRELUDE}
RUN, N, TCP = {run}, {each}, {tcp}
def name(i):
    return 'n%d-r%d.ended.void.test' % (i, RUN)
if TCP:
    conns = []
    for i in range(N):
        c = socket.create_connection((gw, 53), timeout=2)
        m = query(i, name(i))
        c.sendall(struct.pack('>H', len(m)) + m)
        conns.append(c)
    time.sleep(0.05)
    closed = 0
    for c in conns:
        c.setblocking(False)
        try:
            closed += c.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b''
        except BlockingIOError:
            pass
    print(closed)
else:
    for i in range(N):
        udp.send(query(i, name(i)))
    print(refusals(0.05))
",
            tcp = if tcp { "True" } else { "False" }
        )
    };
    let started = Instant::now();
    for pair in 0..RUNS / 2 {
        let runs: Vec<_> = (0..2)
            .map(|i| {
                let body = json!({"language": "python3", "code": code(2 * pair + i), "enable_network": true});
                s.spawn_run(body)
            })
            .collect();
        for run in runs {
            assert_eq!(
                output(200, &run.await.unwrap()),
                "0\n",
                "the relay held them all"
            );
        }
    }
    let flooded = started.elapsed();
    let ended = || log.matching(|q| q.tcp == tcp && q.name.ends_with(".ended.void.test"));
    let deadline = Instant::now() + Duration::from_secs(2);
    while ended().len() < RUNS * each && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ended = ended();
    let during = victim(&s, "after").await;
    let first = ended.iter().map(|q| q.at).min().unwrap();
    let victims = log.matching(|q| q.name.contains("-after.ok.test"));
    let last = victims.iter().map(|q| q.at).max().unwrap();
    println!(
        "{RUNS} runs left {} {} nobody answers in {flooded:?}; the victim asked up to {:?} after the first; its worst lookup (UDP, TCP): before {baseline:?} ms, after {during:?} ms",
        ended.len(),
        if tcp { "TCP queries" } else { "UDP queries" },
        last - first,
    );
    assert_eq!(
        ended.len(),
        RUNS * each,
        "every run's quota reached the upstream"
    );
    assert!(during.0 < 100.0 && during.1 < 100.0, "{during:?} ms");
    // The victim asked while the ended runs' queries would still count, had they not
    // stopped with their runs.
    assert!(
        last < first + UPSTREAM_TIMEOUT,
        "the victim came too late to meet the ended runs' queries"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_runs_unanswered_udp_queries_stop_counting_with_them() {
    ended_runs_leave_the_relay_to_the_next(4, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_runs_unanswered_tcp_queries_stop_counting_with_them() {
    ended_runs_leave_the_relay_to_the_next(5, true).await;
}

/// The network namespace a run is in: its `SO_NETNS_COOKIE` (a socket made, nothing sent).
const COOKIE: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), "little")
s.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_namespace_is_served_afresh_for_its_next_run() {
    let _turn = SERIAL.lock().await;
    // No warm workers: the next run takes the namespace the previous one left.
    let (s, log) = lab_with(6, &[("WARM_WORKERS", "0")]).await;
    let first = networked(&s, &format!("{COOKIE}\nprint(cookie)")).await;
    s.settled().await;
    // Its address was released with the run that sent nothing, and is served again:
    // names resolve, and the whole quota is there.
    let code = format!(
        "{COOKIE}
{PRELUDE}
name = socket.gethostbyname('kept.ok.test')
for i in range({n}):
    udp.send(query(i, 'n%d.kept.void.test' % i))
print(cookie, name, refusals(0.3))
",
        n = RUN_QUERIES + 1
    );
    let out = networked(&s, &code).await;
    assert_eq!(
        out,
        format!("{} {KNOWN} 1\n", first.trim()),
        "the same namespace; resolved; one query over the quota refused"
    );
    let admitted = log.matching(|q| q.name.ends_with(".kept.void.test"));
    assert_eq!(admitted.len(), RUN_QUERIES);
}

/// What a run sends its gateway's port 53 that is no query: an UPDATE (opcode 5) of zone
/// `update.ok.test`, a NOTIFY (opcode 4), a message flagged as an answer (QR 1), and
/// an HTTP request line; `tcp_closed(m)` sends one over a TCP connection of its own and
/// says whether the relay closed it unanswered.
const NOT_QUERIES: &str = r#"
def with_flags(flags, name):
    m = bytearray(query(7, name))
    m[2:4] = struct.pack(">H", flags)
    return bytes(m)
not_queries = [
    with_flags(0x2800, "update.ok.test"),
    with_flags(0x2400, "notify.ok.test"),
    with_flags(0x8180, "answer.ok.test"),
    b"GET / HTTP/1.0\r\n\r\n",
]
def tcp_closed(m):
    with socket.create_connection((gw, 53), timeout=5) as c:
        c.sendall(struct.pack(">H", len(m)) + m)
        try:
            return c.recv(512) == b""
        except ConnectionResetError:
            return True
"#;

/// The relay passes on queries only: what a run sends to its gateway's port 53 that is
/// no query (an UPDATE a resolver trusting its host would apply, an answer, bytes that
/// are no DNS) reaches the upstream from nowhere, over UDP or TCP; the queries sent
/// around them do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dns_relay_passes_on_queries_only() {
    let _turn = SERIAL.lock().await;
    let (s, log) = lab(7).await;
    let code = format!(
        "{PRELUDE}
{NOT_QUERIES}
before = signal('before.ok.test')
for m in not_queries:
    udp.send(m)
# Sent after them over the same socket: answered, so they were read and dropped.
after = signal('after.ok.test')
closed = [tcp_closed(m) for m in not_queries]
print(before, after, closed)
"
    );
    let out = networked(&s, &code).await;
    assert_eq!(
        out,
        format!("{KNOWN} {KNOWN} [True, True, True, True]\n"),
        "queries answered, each TCP connection with no query closed"
    );
    // The stand-in saw the two queries and nothing else, by UDP or TCP.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let raw = log.raw();
    assert_eq!(raw.len(), 2, "passed to the upstream: {raw:?}");
    let names: Vec<String> = log.matching(|_| true).into_iter().map(|q| q.name).collect();
    assert_eq!(names, ["before.ok.test", "after.ok.test"], "{raw:?}");
}

/// The server's relay port and the host ends (gateways) of its runs' veth pairs, read
/// from its nftables table and the host's addresses.
fn relay_and_gateways(server: u32) -> (u16, Vec<Ipv4Addr>) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let table = run(&["nft", "list", "tables"])
        .lines()
        .filter_map(|l| l.strip_prefix("table inet "))
        .find(|t| t.starts_with("sandbox_net_") && t.ends_with(&format!("_{server}")))
        .expect("the server's table")
        .to_string();
    let rules = run(&["nft", "list", "table", "inet", &table]);
    let port: u16 = rules
        .split("dnat ip to 127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("the relay's port in the table");
    let prefix = rules
        .split("iifname \"")
        .nth(1)
        .and_then(|r| r.split('*').next())
        .expect("the runs' interface prefix")
        .to_string();
    let gateways = run(&["ip", "-4", "-o", "addr", "show"])
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|i| i.starts_with(&prefix))
        })
        .filter_map(|l| l.split_whitespace().nth(3)?.split('/').next()?.parse().ok())
        .collect();
    (port, gateways)
}

/// A host process that binds a run's gateway address (the host end of its veth, in the
/// run's /30: any user may bind it) and asks the relay on 127.0.0.1 is no run: it gets
/// nothing, not even a refusal, nothing is passed on, and it spends no run's quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_process_is_not_served_as_a_run_by_the_dns_relay() {
    let _turn = SERIAL.lock().await;
    // Warm networked workers: their runs are admitted with their namespaces, before
    // any request.
    let (s, log) = lab_with(8, &[("MAX_WORKERS", "2")]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let (port, gateways) = loop {
        let (port, gateways) = relay_and_gateways(s.pid());
        if !gateways.is_empty() || Instant::now() > deadline {
            break (port, gateways);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!gateways.is_empty(), "no run's veth pair on the host");
    let mut sockets = Vec::new();
    for gateway in &gateways {
        let socket = UdpSocket::bind((*gateway, 0)).await.unwrap();
        socket.connect((Ipv4Addr::LOCALHOST, port)).await.unwrap();
        // One over a run's quota, of names never answered: they would hold it all.
        for i in 0..=RUN_QUERIES {
            let q = dns_query(i as u16, &format!("host{i}.void.test"));
            socket.send(&q).await.unwrap();
        }
        let q = dns_query(99, "host.ok.test");
        socket.send(&q).await.unwrap();
        sockets.push(socket);
    }
    for (socket, gateway) in sockets.iter().zip(&gateways) {
        let mut buf = [0u8; 512];
        let answered = tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf));
        assert!(
            answered.await.is_err(),
            "a host process bound to the gateway address {gateway} was answered by the relay on 127.0.0.1:{port}"
        );
    }
    let passed = log.matching(|q| q.name.starts_with("host"));
    assert!(passed.is_empty(), "passed to the upstream: {passed:?}");

    // A run meanwhile has its whole quota: one query over it refused, no more.
    let code = format!(
        "{PRELUDE}
name = socket.gethostbyname('run.ok.test')
for i in range({n}):
    udp.send(query(i, 'n%d.run.void.test' % i))
print(name, refusals(0.3))
",
        n = RUN_QUERIES + 1
    );
    let out = networked(&s, &code).await;
    // One refused; two when the resolver's own lookup (its A and AAAA pair) still held a
    // query as the burst began. Had the host process's queries counted against the run,
    // the whole burst would be.
    let (name, refused) = out.trim().split_once(' ').expect("name and refusals");
    assert_eq!(name, KNOWN.to_string(), "{out}");
    let refused: u32 = refused.parse().expect("a count");
    assert!((1..=2).contains(&refused), "{out}");
}

/// A DNS query for `name`, type A, RD set.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}
