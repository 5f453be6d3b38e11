//! The DNS relay: runs ask their gateway, the isolated ruleset translates that to this
//! relay on the host's 127.0.0.1, and the relay passes each query unchanged to the
//! host's resolvers and the answer back. Runs thereby resolve names even where the
//! host's resolver is a loopback stub they cannot reach (systemd-resolved's 127.0.0.53,
//! Docker's 127.0.0.11), without ever being let into the host's loopback themselves.
//! It reads nothing of the messages but their header, to pass on queries only (QR 0,
//! opcode QUERY: an UPDATE, a NOTIFY, an answer or bytes that are no DNS would reach
//! the resolver from the host's own address, which it may trust), and a query's
//! question, to refuse it.
//!
//! The relay is shared by all runs, so each run has a quota of it: queries in flight
//! over UDP and connections over TCP. The translation keeps a query's source, so the
//! relay sees the run's own address, which is its identity: the ruleset drops what
//! comes from a run's veth with another run's source or one outside the runs' block.
//! Only that exact address is the run:
//! the host end of its veth (its gateway, in the same /30) is the host's, and a host
//! process that binds it gets nothing. A query over its run's quota is
//! answered REFUSED at once (the client gives up in a round trip; a dropped query would
//! make it wait its 5 s timeout), a connection over quota is closed at once.
//!
//! The relay serves a run from the moment its network is prepared to the moment it is
//! released (`Runs::admit`, `Admission`): its queries and connections still in flight
//! then are dropped with everything they hold, since their answers have nobody to go
//! to, and stop counting at once. What the relay holds is thereby only what its live
//! runs hold, at most their quotas: one run, live or ended, cannot starve another. A
//! source that is no live run's (an ended run's query still queued, a process on the
//! host's loopback) gets nothing.

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
    runs: Runs,
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
        let book = Runs::new(runs);
        tokio::spawn(serve_udp(
            Arc::new(udp),
            up.clone(),
            book.clone(),
            stop.clone(),
        ));
        tokio::spawn(serve_tcp(tcp, up, book.clone(), stop.clone()));
        Ok(Self {
            port,
            upstreams,
            runs: book,
            stop,
        })
    }

    /// The runs this relay serves: each is admitted with its network.
    pub fn runs(&self) -> Runs {
        self.runs.clone()
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

/// The length of a DNS message's header.
const HEADER: usize = 12;

/// Whether `message` is a query the relay passes on: a whole header, QR 0 (no answer)
/// and opcode QUERY (no UPDATE, NOTIFY, ...). The rest goes as it is.
fn is_query(message: &[u8]) -> bool {
    // Byte 2: QR (1 bit), opcode (4 bits), AA, TC, RD.
    message.len() >= HEADER && message[2] & 0xf8 == 0
}

/// One of the relay's resources a run holds a share of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource {
    /// UDP queries in flight.
    Queries,
    /// TCP connections open.
    Connections,
}

impl Resource {
    const ALL: [Resource; 2] = [Resource::Queries, Resource::Connections];

    fn index(self) -> usize {
        self as usize
    }

    fn per_run(self) -> usize {
        match self {
            Self::Queries => RUN_QUERIES,
            Self::Connections => RUN_CONNECTIONS,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Queries => "queries",
            Self::Connections => "connections",
        }
    }
}

/// The runs the relay serves and what each holds of it. One lock for all: a run's end
/// and a new query of that run never cross.
#[derive(Clone)]
pub struct Runs(Arc<Book>);

struct Book {
    /// What the relay holds in all, per resource: what `max_workers` live runs can
    /// hold (ended runs hold nothing), so never reached while each keeps to its quota;
    /// it bounds the relay's sockets should that ever not hold.
    total: [usize; 2],
    ledger: Mutex<Ledger>,
}

#[derive(Default)]
struct Ledger {
    /// Live runs, by their own address (not their gateway's).
    runs: HashMap<IpAddr, Run>,
    held: [usize; 2],
    /// Tells a run from an earlier one at the same address.
    admitted: u64,
    /// Refusals not yet logged, and when they last were.
    refused: [u64; 2],
    reported: [Option<Instant>; 2],
}

/// A live run's holdings.
struct Run {
    epoch: u64,
    held: [usize; 2],
    /// Cancelled when the run ends: its queries and connections are dropped.
    ended: CancellationToken,
}

/// Why the relay does not serve a query or a connection.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    /// Its run holds its quota already (or the relay is full): refused in words.
    OverQuota,
    /// It comes from no live run: dropped.
    NoRun,
}

/// A run the relay serves, until this is dropped: the run's network is released.
#[must_use = "the run is served only while its admission is held"]
pub struct Admission {
    book: Arc<Book>,
    run: IpAddr,
    epoch: u64,
}

/// One unit of a live run's quota, given back when dropped.
struct Held {
    book: Arc<Book>,
    resource: Resource,
    run: IpAddr,
    epoch: u64,
    /// Cancelled when the run ends.
    ended: CancellationToken,
}

impl Runs {
    /// The book of a relay for `runs` live runs at most (the server's `max_workers`).
    pub fn new(runs: usize) -> Self {
        let total = Resource::ALL.map(|r| r.per_run().saturating_mul(runs.max(1)));
        Self(Arc::new(Book {
            total,
            ledger: Mutex::default(),
        }))
    }

    /// Serve the run at `address` until the admission is dropped, holding nothing yet:
    /// an earlier run at this address has nothing left with the relay.
    pub fn admit(&self, address: Ipv4Addr) -> Admission {
        let run = IpAddr::V4(address);
        let mut l = self.0.lock();
        l.admitted += 1;
        let epoch = l.admitted;
        let earlier = l.runs.insert(
            run,
            Run {
                epoch,
                held: [0; 2],
                ended: CancellationToken::new(),
            },
        );
        if let Some(earlier) = earlier {
            l.forget(earlier);
        }
        Admission {
            book: self.0.clone(),
            run,
            epoch,
        }
    }

    /// One unit of `resource` for `peer`'s run, unless it is no live run's, holds its
    /// share already, or the relay is full; a refusal is counted and logged at most
    /// once a second.
    fn take(&self, resource: Resource, peer: IpAddr) -> Result<Held, Refused> {
        let run = peer;
        let i = resource.index();
        let mut l = self.0.lock();
        let full = l.held[i] >= self.0.total[i];
        let Some(r) = l.runs.get_mut(&run) else {
            return Err(Refused::NoRun);
        };
        let mine = r.held[i];
        if mine < resource.per_run() && !full {
            r.held[i] += 1;
            let (epoch, ended) = (r.epoch, r.ended.clone());
            l.held[i] += 1;
            return Ok(Held {
                book: self.0.clone(),
                resource,
                run,
                epoch,
                ended,
            });
        }
        l.refused[i] += 1;
        let now = Instant::now();
        if l.reported[i].is_none_or(|t| now - t >= REPORT_EVERY) {
            tracing::warn!(
                refused = l.refused[i],
                latest = %peer,
                "DNS relay: {} refused over runs' quotas ({} per run, {} in all) since the last report; the latest run held {mine}",
                resource.name(),
                resource.per_run(),
                self.0.total[i],
            );
            l.refused[i] = 0;
            l.reported[i] = Some(now);
        }
        Err(Refused::OverQuota)
    }
}

impl Book {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Ledger {
    /// An ended run: what it held stops counting, and its queries and connections are
    /// dropped (their tasks see `ended` and return).
    fn forget(&mut self, run: Run) {
        for (total, held) in self.held.iter_mut().zip(run.held) {
            *total = total.saturating_sub(held);
        }
        run.ended.cancel();
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut l = self.book.lock();
        if let Entry::Occupied(e) = l.runs.entry(self.run)
            && e.get().epoch == self.epoch
        {
            let run = e.remove();
            l.forget(run);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut l = self.book.lock();
        let i = self.resource.index();
        // A unit of an ended run was counted off with it.
        if let Some(r) = l.runs.get_mut(&self.run)
            && r.epoch == self.epoch
        {
            r.held[i] = r.held[i].saturating_sub(1);
            l.held[i] = l.held[i].saturating_sub(1);
        }
    }
}

/// The REFUSED answer to `query`: its header (id, opcode, RD) as an answer with RCODE 5,
/// and its question section, which resolvers check against what they asked. `None`
/// for what is no query (see `is_query`) or whose question does not parse: dropped.
fn refusal(query: &[u8]) -> Option<Vec<u8>> {
    if !is_query(query) {
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
    runs: Runs,
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
        // What is no query is dropped unanswered, before it counts against anything.
        if !is_query(&buf[..n]) {
            continue;
        }
        let held = match runs.take(Resource::Queries, client.ip()) {
            Ok(held) => held,
            Err(Refused::OverQuota) => {
                // Never waits: a refusal the socket has no room for is dropped instead.
                if let Some(answer) = refusal(&buf[..n]) {
                    let _ = socket.try_send_to(&answer, client);
                }
                continue;
            }
            Err(Refused::NoRun) => continue,
        };
        let query = buf[..n].to_vec();
        let (socket, upstreams) = (socket.clone(), upstreams.clone());
        tokio::spawn(async move {
            // The run's end drops the query and its upstream sockets.
            tokio::select! {
                () = held.ended.cancelled() => {}
                answer = first_answer(&upstreams, |up| ask_udp(up, &query)) => {
                    if let Some(answer) = answer {
                        let _ = socket.send_to(&answer, client).await;
                    }
                }
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
    runs: Runs,
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
        // Over quota, or no live run's: closed at once, so the client's read ends now.
        let Ok(held) = runs.take(Resource::Connections, peer.ip()) else {
            continue;
        };
        let upstreams = upstreams.clone();
        tokio::spawn(async move {
            // The run's end closes the connection and its query's upstream one.
            tokio::select! {
                () = held.ended.cancelled() => {}
                _ = relay_tcp(client, &upstreams) => {}
            }
            drop(held);
        });
    }
}

/// Queries over TCP (each a two-byte length, then the message), one after the other,
/// and their answers, until the client closes, idles for `TCP_IDLE`, sends what is no
/// query (closed unanswered: nothing of it is passed on), or a query gets no answer.
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
        if !is_query(&query) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a DNS query",
            ));
        }
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// What the book counts for `run` (none: not a live run) and in all.
    fn counted(runs: &Runs, resource: Resource, run: &str) -> (Option<usize>, usize) {
        let l = runs.0.lock();
        let i = resource.index();
        (l.runs.get(&ip(run)).map(|r| r.held[i]), l.held[i])
    }

    #[test]
    fn a_run_holds_its_share_and_no_more_and_gives_it_back() {
        let runs = Runs::new(3);
        assert_eq!(runs.0.total, [3 * RUN_QUERIES, 3 * RUN_CONNECTIONS]);
        let _a = runs.admit(v4("10.213.0.2"));
        let _b = runs.admit(v4("10.213.0.6"));
        let take = |peer: &str, n: usize| -> Vec<Held> {
            (0..n)
                .map(|_| runs.take(Resource::Queries, ip(peer)).expect("within"))
                .collect()
        };
        let held = take("10.213.0.2", RUN_QUERIES);
        assert_eq!(
            runs.take(Resource::Queries, ip("10.213.0.2")).err(),
            Some(Refused::OverQuota)
        );
        // Its gateway's address, the host's end of its /30, is no run.
        assert_eq!(
            runs.take(Resource::Queries, ip("10.213.0.1")).err(),
            Some(Refused::NoRun)
        );
        // Its connections are a quota of their own.
        let conn = runs.take(Resource::Connections, ip("10.213.0.2"));
        assert!(conn.is_ok());
        // Another run still gets its own.
        let others = take("10.213.0.6", RUN_QUERIES);
        assert_eq!(
            counted(&runs, Resource::Queries, "10.213.0.6"),
            (Some(RUN_QUERIES), 2 * RUN_QUERIES)
        );
        drop(held);
        assert_eq!(
            counted(&runs, Resource::Queries, "10.213.0.2"),
            (Some(0), RUN_QUERIES),
            "given back"
        );
        assert!(runs.take(Resource::Queries, ip("10.213.0.2")).is_ok());
        drop((others, conn));
        assert_eq!(runs.0.lock().held, [0, 0]);
    }

    #[test]
    fn only_live_runs_are_served() {
        let runs = Runs::new(4);
        // Never admitted: a process on the host's loopback, say.
        assert_eq!(
            runs.take(Resource::Queries, ip("127.0.0.1")).err(),
            Some(Refused::NoRun)
        );
        let admission = runs.admit(v4("10.213.0.2"));
        assert!(runs.take(Resource::Connections, ip("10.213.0.2")).is_ok());
        drop(admission);
        // Ended: a query of it still queued in the relay's socket gets nothing.
        assert_eq!(
            runs.take(Resource::Queries, ip("10.213.0.2")).err(),
            Some(Refused::NoRun)
        );
        assert_eq!(
            runs.take(Resource::Connections, ip("10.213.0.2")).err(),
            Some(Refused::NoRun)
        );
        assert!(runs.0.lock().runs.is_empty(), "no run is remembered");
    }

    #[test]
    fn an_ended_runs_holdings_stop_counting_at_once_and_the_next_run_starts_at_zero() {
        // One worker: the ended run's holdings are all the relay holds.
        let runs = Runs::new(1);
        let first = runs.admit(v4("10.213.0.2"));
        let queries: Vec<Held> = (0..RUN_QUERIES)
            .map(|_| runs.take(Resource::Queries, ip("10.213.0.2")).unwrap())
            .collect();
        let conns: Vec<Held> = (0..RUN_CONNECTIONS)
            .map(|_| runs.take(Resource::Connections, ip("10.213.0.2")).unwrap())
            .collect();
        let other = runs.admit(v4("10.213.0.6"));
        assert_eq!(
            runs.take(Resource::Queries, ip("10.213.0.6")).err(),
            Some(Refused::OverQuota),
            "the relay is full"
        );
        assert!(
            queries
                .iter()
                .chain(&conns)
                .all(|h| !h.ended.is_cancelled())
        );

        drop(first);
        // Every task of the run is told to drop its query or connection.
        assert!(queries.iter().chain(&conns).all(|h| h.ended.is_cancelled()));
        assert_eq!(runs.0.lock().held, [0, 0], "nothing counts any more");
        let mine = runs.take(Resource::Queries, ip("10.213.0.6"));
        assert!(mine.is_ok(), "another run is served at once");
        drop((mine, other));

        // The namespace, and its address, handed to the next run: it starts at zero,
        // and the ended run's units, dropped late, are not taken off its count.
        let next = runs.admit(v4("10.213.0.2"));
        let held: Vec<Held> = (0..RUN_QUERIES)
            .map(|_| {
                runs.take(Resource::Queries, ip("10.213.0.2"))
                    .expect("a whole quota")
            })
            .collect();
        drop((queries, conns));
        assert_eq!(
            counted(&runs, Resource::Queries, "10.213.0.2"),
            (Some(RUN_QUERIES), RUN_QUERIES)
        );
        assert_eq!(
            counted(&runs, Resource::Connections, "10.213.0.2"),
            (Some(0), 0)
        );
        assert!(held.iter().all(|h| !h.ended.is_cancelled()));
        drop(held);
        drop(next);
        assert!(runs.0.lock().runs.is_empty());
    }

    #[test]
    fn an_admission_for_an_address_in_use_ends_the_earlier_run() {
        // Not expected (an address is one uid's, and a uid one run's), but exact if so.
        let runs = Runs::new(2);
        let earlier = runs.admit(v4("10.213.0.2"));
        let held = runs.take(Resource::Queries, ip("10.213.0.2")).unwrap();
        let later = runs.admit(v4("10.213.0.2"));
        assert!(held.ended.is_cancelled());
        assert_eq!(
            counted(&runs, Resource::Queries, "10.213.0.2"),
            (Some(0), 0)
        );
        // The earlier admission's end leaves the later run alone.
        drop((earlier, held));
        assert!(runs.take(Resource::Queries, ip("10.213.0.2")).is_ok());
        drop(later);
    }

    /// The references to `runs`' book (the relay's loop, the test's, each admission's
    /// and each unit's, held by a task relaying a query or connection), once they are
    /// `want` or `within` has passed.
    async fn references(runs: &Runs, want: usize, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let n = Arc::strong_count(&runs.0);
            if n == want || tokio::time::Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn an_ended_runs_udp_queries_are_dropped_with_their_upstream_sockets() {
        // An upstream that never answers; the run is this test's 127.0.0.1.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let relay_addr = relay.local_addr().unwrap();
        let runs = Runs::new(1);
        let stop = CancellationToken::new();
        let _stop = stop.clone().drop_guard();
        let upstreams = Arc::new(vec![silent.local_addr().unwrap()]);
        tokio::spawn(serve_udp(relay, upstreams, runs.clone(), stop));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(relay_addr).await.unwrap();

        // Not admitted yet: neither passed on nor answered.
        client.send(&query(1, "early.void.test")).await.unwrap();
        let mut buf = [0u8; 512];
        let nothing = tokio::time::timeout(Duration::from_millis(100), client.recv(&mut buf)).await;
        assert!(nothing.is_err(), "no answer to what is no live run's");
        assert!(silent.try_recv_from(&mut buf).is_err(), "nothing passed on");

        let base = Arc::strong_count(&runs.0);
        let run = runs.admit(v4("127.0.0.1"));
        for i in 0..RUN_QUERIES as u16 + 1 {
            client.send(&query(i, "n.void.test")).await.unwrap();
        }
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(
            buf[3] & 0x0f,
            5,
            "the one over the quota refused: {:?}",
            &buf[..n]
        );
        let mut upstream_saw = 0;
        while upstream_saw < RUN_QUERIES {
            silent.recv_from(&mut buf).await.unwrap();
            upstream_saw += 1;
        }
        let holding = base + 1 + RUN_QUERIES;
        assert_eq!(
            references(&runs, holding, Duration::from_secs(1)).await,
            holding
        );

        // The run ends: every one of its queries is dropped now, not at the deadline.
        let ended = tokio::time::Instant::now();
        drop(run);
        assert_eq!(runs.0.lock().held, [0, 0]);
        let left = references(&runs, base, Duration::from_millis(500)).await;
        assert_eq!(
            left,
            base,
            "tasks still holding after {:?}",
            ended.elapsed()
        );
        assert!(ended.elapsed() < UPSTREAM_TIMEOUT / 10);

        // The same address for the next run: a whole quota again.
        let _next = runs.admit(v4("127.0.0.1"));
        for i in 0..RUN_QUERIES as u16 {
            client.send(&query(i, "m.void.test")).await.unwrap();
        }
        for _ in 0..RUN_QUERIES {
            silent.recv_from(&mut buf).await.unwrap();
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(100), client.recv(&mut buf))
                .await
                .is_err(),
            "none refused"
        );
    }

    #[tokio::test]
    async fn an_ended_runs_tcp_connections_are_closed_both_ways() {
        // An upstream that takes a query and never answers.
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstreams = Arc::new(vec![upstream.local_addr().unwrap()]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_addr = listener.local_addr().unwrap();
        let runs = Runs::new(1);
        let stop = CancellationToken::new();
        let _stop = stop.clone().drop_guard();
        tokio::spawn(serve_tcp(listener, upstreams, runs.clone(), stop));

        let base = Arc::strong_count(&runs.0);
        // Not admitted: closed at once.
        let mut early = TcpStream::connect(relay_addr).await.unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(early.read(&mut byte).await.unwrap(), 0, "closed at once");

        let run = runs.admit(v4("127.0.0.1"));
        let mut client = TcpStream::connect(relay_addr).await.unwrap();
        let q = query(7, "held.void.test");
        client.write_u16(q.len() as u16).await.unwrap();
        client.write_all(&q).await.unwrap();
        let (mut asked, _) = upstream.accept().await.unwrap();
        let len = asked.read_u16().await.unwrap();
        let mut got = vec![0u8; usize::from(len)];
        asked.read_exact(&mut got).await.unwrap();
        assert_eq!(got, q);

        let ended = tokio::time::Instant::now();
        drop(run);
        let within = Duration::from_millis(500);
        let closed = tokio::time::timeout(within, client.read(&mut byte)).await;
        assert_eq!(closed.expect("the run's side closed").unwrap(), 0);
        let closed = tokio::time::timeout(within, asked.read(&mut byte)).await;
        assert_eq!(closed.expect("the upstream's side closed").unwrap(), 0);
        assert!(ended.elapsed() < TCP_IDLE / 4, "{:?}", ended.elapsed());
        assert_eq!(references(&runs, base, within).await, base);
        assert_eq!(runs.0.lock().held, [0, 0]);
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
        let (mut client, server) = tcp_pair().await;
        let relay = tokio::spawn(async move { relay_tcp(server, &[tcp_addr]).await });
        for q in [query(1, "a.void.test"), query(2, "b.void.test")] {
            client.write_u16(q.len() as u16).await.unwrap();
            client.write_all(&q).await.unwrap();
            assert_eq!(usize::from(client.read_u16().await.unwrap()), q.len());
            let mut back = vec![0u8; q.len()];
            client.read_exact(&mut back).await.unwrap();
            let mut reversed = q.clone();
            reversed.reverse();
            assert_eq!(back, reversed);
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

    /// A connected client and the relay's side of it.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    /// What is no query, each with why: an UPDATE, a NOTIFY, an answer, a header cut
    /// short, and bytes that are no DNS at all.
    fn not_queries() -> Vec<(&'static str, Vec<u8>)> {
        let with_byte2 = |b: u8| {
            let mut m = query(9, "zone.void.test");
            m[2] = b;
            m
        };
        vec![
            ("an UPDATE (opcode 5)", with_byte2(5 << 3)),
            ("a NOTIFY (opcode 4)", with_byte2((4 << 3) | 0x04)),
            ("an IQUERY (opcode 1)", with_byte2(1 << 3)),
            ("an answer (QR 1)", with_byte2(0x81)),
            (
                "a header cut short",
                query(9, "zone.void.test")[..11].to_vec(),
            ),
            ("an HTTP request line", b"GET / HTTP/1.0\r\n\r\n".to_vec()),
        ]
    }

    #[test]
    fn only_queries_are_queries() {
        assert!(is_query(&query(1, "a.void.test")));
        // RD, TC, AA and the header alone are still a query.
        let mut q = query(1, "a.void.test");
        q[2] = 0x07;
        assert!(is_query(&q));
        assert!(is_query(&q[..HEADER]));
        for (what, m) in not_queries() {
            assert!(!is_query(&m), "{what}");
            assert_eq!(refusal(&m), None, "{what} is not answered either");
        }
    }

    #[tokio::test]
    async fn the_udp_relay_passes_on_queries_only() {
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let relay_addr = relay.local_addr().unwrap();
        let runs = Runs::new(1);
        let stop = CancellationToken::new();
        let _stop = stop.clone().drop_guard();
        let upstreams = Arc::new(vec![upstream.local_addr().unwrap()]);
        tokio::spawn(serve_udp(relay, upstreams, runs.clone(), stop));
        let _run = runs.admit(v4("127.0.0.1"));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(relay_addr).await.unwrap();

        for (_, m) in not_queries() {
            client.send(&m).await.unwrap();
        }
        // A query sent after them reaches the upstream first: they were dropped.
        let q = query(3, "after.void.test");
        client.send(&q).await.unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), upstream.recv_from(&mut buf))
            .await
            .expect("the query passed on")
            .unwrap();
        assert_eq!(&buf[..n], &q[..], "the first the upstream saw is the query");
        let more = tokio::time::timeout(Duration::from_millis(100), upstream.recv_from(&mut buf));
        assert!(more.await.is_err(), "nothing else passed on");
        let answered = tokio::time::timeout(Duration::from_millis(100), client.recv(&mut buf));
        assert!(answered.await.is_err(), "what is no query is not answered");
        assert_eq!(runs.0.lock().held[Resource::Queries.index()], 1);
    }

    #[tokio::test]
    async fn the_tcp_relay_closes_a_connection_that_sends_no_query() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = [upstream.local_addr().unwrap()];
        for (what, m) in not_queries() {
            let (mut client, server) = tcp_pair().await;
            client.write_u16(m.len() as u16).await.unwrap();
            client.write_all(&m).await.unwrap();
            let e = tokio::time::timeout(Duration::from_secs(1), relay_tcp(server, &up))
                .await
                .expect("closed at once")
                .expect_err(what);
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{what}");
            let mut byte = [0u8; 1];
            assert_eq!(client.read(&mut byte).await.unwrap(), 0, "{what}: closed");
        }
        // Nothing reached the upstream, not even a connection.
        let accepted = tokio::time::timeout(Duration::from_millis(100), upstream.accept());
        assert!(accepted.await.is_err(), "nothing passed on");
    }

    #[tokio::test]
    async fn an_idle_tcp_connection_is_closed() {
        let (mut client, server) = tcp_pair().await;
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
