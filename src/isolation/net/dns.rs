//! The DNS relay: runs ask their gateway, the isolated ruleset translates that to this
//! relay on the host's 127.0.0.1, and the relay passes each query unchanged to the
//! host's resolvers and the answer back. Runs thereby resolve names even where the
//! host's resolver is a loopback stub they cannot reach (systemd-resolved's 127.0.0.53,
//! Docker's 127.0.0.11), without ever being let into the host's loopback themselves.
//! It reads nothing of the messages but a query's header and question, to refuse it.
//!
//! The relay is shared by all runs, so each run has a quota of it: queries in flight
//! over UDP and connections over TCP. The translation keeps a query's source, so the
//! relay sees the run's own address (its /30 is its identity: nothing else routes
//! there, and the ruleset drops any other source). A query over its run's quota is
//! answered REFUSED at once (the client gives up in a round trip; a dropped query would
//! make it wait its 5 s timeout), a connection over quota is closed at once. The quotas
//! and the upstream deadline make the relay's whole capacity more than its runs can
//! hold: one run cannot starve another.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use nix::sys::socket::{setsockopt, sockopt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

/// How long the upstreams have to answer a query, all together: past it the query is
/// given up and no longer counts against its run (the runs' resolver waits 5 s).
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// UDP queries one run may have in flight at once.
pub const RUN_QUERIES: usize = 32;
/// TCP connections one run may have open to the relay at once.
pub const RUN_CONNECTIONS: usize = 8;
/// A TCP connection with no query (or no whole query) coming for this long is closed;
/// so is one whose answer the client does not take within it.
pub const TCP_IDLE: Duration = Duration::from_secs(2);
/// The relay's capacity in all is at least this, and at least twice what its runs can
/// hold at once: runs that just ended may still hold theirs for `UPSTREAM_TIMEOUT`.
const MIN_QUERIES: usize = 256;
const MIN_CONNECTIONS: usize = 64;
/// The UDP socket's receive buffer: a few thousand queries.
const RECEIVE_BUFFER: usize = 1 << 20;
/// How often refusals are logged at most.
const REPORT_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot open the DNS relay on 127.0.0.1: {0}")]
    Bind(#[source] std::io::Error),
    #[error(
        "no resolver to relay runs' DNS queries to: /etc/resolv.conf names none; set network_dns (NETWORK_DNS)"
    )]
    NoUpstream,
}

/// The running relay; dropping it stops it.
pub struct DnsRelay {
    port: u16,
    upstreams: Vec<SocketAddr>,
    stop: CancellationToken,
}

impl DnsRelay {
    /// Listen on 127.0.0.1 (UDP and TCP on one port) and relay to `upstreams` (port 53)
    /// for up to `runs` runs at once (the server's `max_workers`). Must run inside a
    /// tokio runtime.
    pub async fn start(upstreams: &[IpAddr], runs: usize) -> Result<Self, DnsError> {
        if upstreams.is_empty() {
            return Err(DnsError::NoUpstream);
        }
        let upstreams: Vec<SocketAddr> = upstreams
            .iter()
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect();
        let (udp, tcp) = bind_pair().await.map_err(DnsError::Bind)?;
        let port = udp.local_addr().map_err(DnsError::Bind)?.port();
        // Room for bursts from every run while the relay is not scheduled; the ruleset
        // bounds each run's rate. Beyond `rmem_max` as root (SO_RCVBUFFORCE).
        if setsockopt(&udp, sockopt::RcvBufForce, &RECEIVE_BUFFER)
            .or_else(|_| setsockopt(&udp, sockopt::RcvBuf, &RECEIVE_BUFFER))
            .is_err()
        {
            tracing::debug!("DNS relay: the receive buffer keeps its default size");
        }
        let stop = CancellationToken::new();
        let up = Arc::new(upstreams.clone());
        tokio::spawn(serve_udp(
            Arc::new(udp),
            up.clone(),
            Quota::new("queries", RUN_QUERIES, MIN_QUERIES, runs),
            stop.clone(),
        ));
        tokio::spawn(serve_tcp(
            tcp,
            up,
            Quota::new("connections", RUN_CONNECTIONS, MIN_CONNECTIONS, runs),
            stop.clone(),
        ));
        Ok(Self {
            port,
            upstreams,
            stop,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }
}

impl Drop for DnsRelay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A UDP and a TCP socket on the same free port of 127.0.0.1.
async fn bind_pair() -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..32 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let port = udp.local_addr()?.port();
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free port")))
}

/// The run a peer address belongs to: its /30 for IPv4 (a run's block holds its
/// address and its gateway), the address itself otherwise.
fn run_of(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & !3)),
        v6 => v6,
    }
}

/// What runs hold of one of the relay's resources: so many per run, so many in all.
struct Quota {
    what: &'static str,
    per_run: usize,
    total: usize,
    state: Mutex<Holdings>,
}

#[derive(Default)]
struct Holdings {
    total: usize,
    by_run: HashMap<IpAddr, usize>,
    /// Refusals not yet logged, and when they last were.
    refused: u64,
    reported: Option<Instant>,
}

/// One unit of a run's quota, given back when dropped.
struct Held {
    quota: Arc<Quota>,
    run: IpAddr,
}

impl Quota {
    fn new(what: &'static str, per_run: usize, floor: usize, runs: usize) -> Arc<Self> {
        Arc::new(Self {
            what,
            per_run,
            total: floor.max(per_run.saturating_mul(runs).saturating_mul(2)),
            state: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Holdings> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One unit for `peer`'s run, unless it holds its share already or the relay is
    /// full; a refusal is counted and logged at most once a second.
    fn take(self: &Arc<Self>, peer: IpAddr) -> Option<Held> {
        let run = run_of(peer);
        let mut h = self.lock();
        let mine = h.by_run.get(&run).copied().unwrap_or(0);
        if mine < self.per_run && h.total < self.total {
            h.total += 1;
            *h.by_run.entry(run).or_default() += 1;
            return Some(Held {
                quota: self.clone(),
                run,
            });
        }
        h.refused += 1;
        let now = Instant::now();
        if h.reported.is_none_or(|t| now - t >= REPORT_EVERY) {
            tracing::warn!(
                refused = h.refused,
                latest = %peer,
                "DNS relay: {} refused over runs' quotas ({} per run, {} in all) since the last report; the latest run held {mine}",
                self.what,
                self.per_run,
                self.total,
            );
            h.refused = 0;
            h.reported = Some(now);
        }
        None
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut h = self.quota.lock();
        h.total = h.total.saturating_sub(1);
        if let Entry::Occupied(mut e) = h.by_run.entry(self.run) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// The REFUSED answer to `query`: its header (id, opcode, RD) as an answer with RCODE 5,
/// and its question section, which resolvers check against what they asked. `None`
/// for what is no query (too short, an answer, a question that does not parse): dropped.
fn refusal(query: &[u8]) -> Option<Vec<u8>> {
    const HEADER: usize = 12;
    if query.len() < HEADER || query[2] & 0x80 != 0 {
        return None;
    }
    let questions = u16::from_be_bytes([query[4], query[5]]);
    let mut end = HEADER;
    for _ in 0..questions {
        // A name: labels up to the root's empty one, or up to a compression pointer.
        loop {
            let len = *query.get(end)?;
            match len & 0xc0 {
                0x00 if len == 0 => {
                    end += 1;
                    break;
                }
                0x00 => end += 1 + usize::from(len),
                0xc0 => {
                    end += 2;
                    break;
                }
                _ => return None,
            }
        }
        // Its type and class.
        end += 4;
        if end > query.len() {
            return None;
        }
    }
    let mut answer = query[..end].to_vec();
    answer[2] = 0x80 | (query[2] & 0x79);
    answer[3] = 5;
    answer[6..HEADER].fill(0);
    Some(answer)
}

async fn serve_udp(
    socket: Arc<UdpSocket>,
    upstreams: Arc<Vec<SocketAddr>>,
    quota: Arc<Quota>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, client) = tokio::select! {
            _ = stop.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(_) => continue,
            },
        };
        let Some(held) = quota.take(client.ip()) else {
            // Never waits: a refusal the socket has no room for is dropped instead.
            if let Some(answer) = refusal(&buf[..n]) {
                let _ = socket.try_send_to(&answer, client);
            }
            continue;
        };
        let query = buf[..n].to_vec();
        let (socket, upstreams) = (socket.clone(), upstreams.clone());
        tokio::spawn(async move {
            if let Some(answer) = first_answer(&upstreams, |up| ask_udp(up, &query)).await {
                let _ = socket.send_to(&answer, client).await;
            }
            drop(held);
        });
    }
}

/// The first answer of any upstream within `UPSTREAM_TIMEOUT`: they are asked in
/// order, the next one when the previous has failed or has had its share of the time
/// (the earlier ones are still listened to).
async fn first_answer<'a, F, Fut>(upstreams: &'a [SocketAddr], ask: F) -> Option<Vec<u8>>
where
    F: Fn(&'a SocketAddr) -> Fut,
    Fut: Future<Output = Option<Vec<u8>>>,
{
    let n = u32::try_from(upstreams.len()).ok().filter(|n| *n > 0)?;
    let turn = UPSTREAM_TIMEOUT / n;
    let race = async {
        let mut waiting = upstreams.iter();
        let mut asking = FuturesUnordered::new();
        let mut next = true;
        loop {
            if next && let Some(up) = waiting.next() {
                asking.push(ask(up));
            }
            if asking.is_empty() {
                return None;
            }
            let more = waiting.len() > 0;
            tokio::select! {
                answer = asking.next() => match answer {
                    Some(Some(answer)) => return Some(answer),
                    _ => next = true,
                },
                () = tokio::time::sleep(turn), if more => next = true,
            }
        }
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, race)
        .await
        .ok()
        .flatten()
}

/// One upstream's answer over UDP; `None` once it cannot be asked or refuses (ICMP).
async fn ask_udp(upstream: &SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let bind: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(bind).await.ok()?;
    socket.connect(upstream).await.ok()?;
    socket.send(query).await.ok()?;
    // The buffer for the largest answer is made once there is one: a query nobody
    // answers holds a socket and nothing more.
    loop {
        socket.readable().await.ok()?;
        let mut answer = vec![0u8; 65535];
        match socket.try_recv(&mut answer) {
            Ok(n) => return Some(answer[..n].to_vec()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return None,
        }
    }
}

/// One upstream's answer over TCP.
async fn ask_tcp(upstream: &SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let mut server = TcpStream::connect(upstream).await.ok()?;
    let len = u16::try_from(query.len()).ok()?;
    server.write_u16(len).await.ok()?;
    server.write_all(query).await.ok()?;
    let answer_len = server.read_u16().await.ok()?;
    let mut answer = vec![0u8; usize::from(answer_len)];
    server.read_exact(&mut answer).await.ok()?;
    Some(answer)
}

async fn serve_tcp(
    listener: TcpListener,
    upstreams: Arc<Vec<SocketAddr>>,
    quota: Arc<Quota>,
    stop: CancellationToken,
) {
    loop {
        let (client, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(r) => r,
                // Out of descriptors, most likely: a pause instead of a busy loop.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        // Over quota: closed at once, so the client's read ends now.
        let Some(held) = quota.take(peer.ip()) else {
            continue;
        };
        let upstreams = upstreams.clone();
        tokio::spawn(async move {
            let _ = relay_tcp(client, &upstreams).await;
            drop(held);
        });
    }
}

/// Queries over TCP (each a two-byte length, then the message), one after the other,
/// and their answers, until the client closes, idles for `TCP_IDLE`, or a query gets
/// no answer.
async fn relay_tcp(mut client: TcpStream, upstreams: &[SocketAddr]) -> std::io::Result<()> {
    let idle = || std::io::Error::new(std::io::ErrorKind::TimedOut, "idle");
    loop {
        let query = tokio::time::timeout(TCP_IDLE, async {
            let len = client.read_u16().await?;
            let mut query = vec![0u8; usize::from(len)];
            client.read_exact(&mut query).await?;
            Ok::<_, std::io::Error>(query)
        })
        .await
        .map_err(|_| idle())?;
        let query = match query {
            Ok(q) => q,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let Some(answer) = first_answer(upstreams, |up| ask_tcp(up, &query)).await else {
            return Ok(());
        };
        let len = u16::try_from(answer.len()).map_err(std::io::Error::other)?;
        tokio::time::timeout(TCP_IDLE, async {
            client.write_u16(len).await?;
            client.write_all(&answer).await
        })
        .await
        .map_err(|_| idle())??;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name` (type A, RD set) with an EDNS OPT record after its question.
    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1]);
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        q
    }

    #[test]
    fn a_refusal_answers_the_query_with_its_id_and_question_only() {
        let q = query(0xbeef, "never.void.test");
        let a = refusal(&q).expect("a refusal");
        assert_eq!(&a[..2], &[0xbe, 0xef], "its id");
        assert_eq!(a[2], 0x81, "an answer, RD kept");
        assert_eq!(a[3] & 0x0f, 5, "REFUSED");
        assert_eq!(
            &a[4..12],
            &[0, 1, 0, 0, 0, 0, 0, 0],
            "one question, nothing else"
        );
        let question_end = 12 + "never.void.test".len() + 2 + 4;
        assert_eq!(a.len(), question_end, "the OPT record is left out");
        assert_eq!(&a[12..], &q[12..question_end]);

        // What is no query is dropped, not answered.
        assert_eq!(refusal(&q[..11]), None, "too short");
        assert_eq!(refusal(&q[..20]), None, "a question cut short");
        assert_eq!(refusal(&a), None, "an answer");
        let mut bad = q.clone();
        bad[12] = 0x80;
        assert_eq!(refusal(&bad), None, "a label type that does not exist");
    }

    #[test]
    fn a_run_holds_its_share_and_no_more_and_gives_it_back() {
        let quota = Quota::new("queries", 3, 7, 1);
        assert_eq!(quota.total, 7, "the floor, above 2 x 3 x 1");
        assert_eq!(Quota::new("queries", 3, 7, 4).total, 24);
        let run: IpAddr = "10.213.0.2".parse().unwrap();
        let held: Vec<Held> = (0..3).filter_map(|_| quota.take(run)).collect();
        assert_eq!(held.len(), 3);
        assert!(quota.take(run).is_none(), "over its share");
        // Its whole /30 is the run: another address of its block changes nothing.
        assert!(quota.take("10.213.0.3".parse().unwrap()).is_none());
        // Another run still gets its own, up to the relay's total.
        let other: IpAddr = "10.213.0.6".parse().unwrap();
        let others: Vec<Held> = (0..3).filter_map(|_| quota.take(other)).collect();
        assert_eq!(others.len(), 3);
        let third = quota.take("10.213.0.10".parse().unwrap());
        assert!(third.is_some());
        assert!(
            quota.take("10.213.0.14".parse().unwrap()).is_none(),
            "the relay is full"
        );
        drop(held);
        assert!(quota.take(run).is_some(), "given back");
        drop((others, third));
        assert_eq!(quota.lock().total, 0);
        assert!(quota.lock().by_run.is_empty(), "no run is remembered");
    }

    #[tokio::test]
    async fn queries_and_answers_pass_unchanged_over_udp_and_tcp() {
        // A stand-in resolver on 127.0.0.1:53 is not available to tests; one on another
        // loopback port is reached by giving the relay a custom upstream list.
        let resolver = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let resolver_addr = resolver.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = resolver.recv_from(&mut buf).await {
                let mut answer = b"answer:".to_vec();
                answer.extend_from_slice(&buf[..n]);
                let _ = resolver.send_to(&answer, from).await;
            }
        });
        let answer = first_answer(&[resolver_addr], |up| ask_udp(up, b"query")).await;
        assert_eq!(answer.as_deref(), Some(&b"answer:query"[..]));

        // Over TCP, several queries on one connection, each answered in turn.
        let tcp_resolver = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_addr = tcp_resolver.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp_resolver.accept().await {
                let n = s.read_u16().await.unwrap();
                let mut q = vec![0; n as usize];
                s.read_exact(&mut q).await.unwrap();
                q.reverse();
                s.write_u16(n).await.unwrap();
                s.write_all(&q).await.unwrap();
            }
        });
        let (mut client, server) = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            (c, l.accept().await.unwrap().0)
        };
        let relay = tokio::spawn(async move { relay_tcp(server, &[tcp_addr]).await });
        for (q, a) in [(b"abc", b"cba"), (b"xyz", b"zyx")] {
            client.write_u16(3).await.unwrap();
            client.write_all(q).await.unwrap();
            assert_eq!(client.read_u16().await.unwrap(), 3);
            let mut back = [0u8; 3];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, a);
        }
        drop(client);
        relay.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_upstream_that_does_not_answer_is_skipped() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let answering = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (silent_addr, answering_addr) = (
            silent.local_addr().unwrap(),
            answering.local_addr().unwrap(),
        );
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            if let Ok((n, from)) = answering.recv_from(&mut buf).await {
                let _ = answering.send_to(&buf[..n], from).await;
            }
        });
        tokio::time::pause();
        let start = tokio::time::Instant::now();
        let answer = first_answer(&[silent_addr, answering_addr], |up| ask_udp(up, b"q")).await;
        assert_eq!(answer.as_deref(), Some(&b"q"[..]));
        assert!(
            start.elapsed() < UPSTREAM_TIMEOUT,
            "asked within the deadline"
        );
        drop(silent);
    }

    #[tokio::test]
    async fn a_query_nobody_answers_is_given_up_at_the_deadline() {
        let silent: Vec<UdpSocket> = vec![
            UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        ];
        let addrs: Vec<SocketAddr> = silent.iter().map(|s| s.local_addr().unwrap()).collect();
        tokio::time::pause();
        let start = tokio::time::Instant::now();
        assert_eq!(first_answer(&addrs, |up| ask_udp(up, b"q")).await, None);
        // The timer wheel rounds up to the millisecond.
        let took = start.elapsed();
        assert!(
            took >= UPSTREAM_TIMEOUT && took < UPSTREAM_TIMEOUT + Duration::from_millis(10),
            "all upstreams together: {took:?}"
        );
        // Both were asked.
        for s in &silent {
            let mut buf = [0u8; 8];
            assert_eq!(s.try_recv_from(&mut buf).unwrap().0, 1);
        }
    }

    #[tokio::test]
    async fn an_idle_tcp_connection_is_closed() {
        let (mut client, server) = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            (c, l.accept().await.unwrap().0)
        };
        tokio::time::pause();
        let start = tokio::time::Instant::now();
        let upstream: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let e = relay_tcp(server, &[upstream]).await.expect_err("closed");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        let took = start.elapsed();
        assert!(
            took >= TCP_IDLE && took < TCP_IDLE + Duration::from_millis(10),
            "{took:?}"
        );
        let mut buf = [0u8; 1];
        assert_eq!(
            client.read(&mut buf).await.unwrap(),
            0,
            "the client sees the end"
        );
    }

    #[tokio::test]
    async fn no_resolver_is_an_error_that_names_the_setting() {
        let e = DnsRelay::start(&[], 4).await.err().expect("refused");
        assert!(e.to_string().contains("network_dns"), "{e}");
    }
}
