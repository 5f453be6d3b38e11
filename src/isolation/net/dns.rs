//! The DNS relay: runs ask their gateway, the isolated ruleset translates that to this
//! relay on the host's 127.0.0.1, and the relay passes each query unchanged to the
//! host's resolvers and the answer back. Runs thereby resolve names even where the
//! host's resolver is a loopback stub they cannot reach (systemd-resolved's 127.0.0.53,
//! Docker's 127.0.0.11), without ever being let into the host's loopback themselves.
//! It reads nothing of the messages: a query goes out as it came in.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How long one upstream may take to answer before the next is asked.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Queries in flight at once; beyond, new ones are dropped (the client retries).
const MAX_IN_FLIGHT: usize = 256;
/// A TCP exchange (a query and its answer) may take this long.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Listen on 127.0.0.1 (UDP and TCP on one port) and relay to `upstreams` (port 53).
    /// Must run inside a tokio runtime.
    pub async fn start(upstreams: &[IpAddr]) -> Result<Self, DnsError> {
        if upstreams.is_empty() {
            return Err(DnsError::NoUpstream);
        }
        let upstreams: Vec<SocketAddr> = upstreams
            .iter()
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect();
        let (udp, tcp) = bind_pair().await.map_err(DnsError::Bind)?;
        let port = udp.local_addr().map_err(DnsError::Bind)?.port();
        let stop = CancellationToken::new();
        let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let up = Arc::new(upstreams.clone());
        tokio::spawn(serve_udp(
            Arc::new(udp),
            up.clone(),
            limit.clone(),
            stop.clone(),
        ));
        tokio::spawn(serve_tcp(tcp, up, limit, stop.clone()));
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

async fn serve_udp(
    socket: Arc<UdpSocket>,
    upstreams: Arc<Vec<SocketAddr>>,
    limit: Arc<Semaphore>,
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
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue;
        };
        let query = buf[..n].to_vec();
        let (socket, upstreams) = (socket.clone(), upstreams.clone());
        tokio::spawn(async move {
            if let Some(answer) = ask_udp(&upstreams, &query).await {
                let _ = socket.send_to(&answer, client).await;
            }
            drop(permit);
        });
    }
}

/// The first answer any upstream gives, trying them in order.
async fn ask_udp(upstreams: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    for upstream in upstreams {
        let bind: SocketAddr = match upstream {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let Ok(socket) = UdpSocket::bind(bind).await else {
            continue;
        };
        if socket.connect(upstream).await.is_err() || socket.send(query).await.is_err() {
            continue;
        }
        let mut answer = vec![0u8; 65535];
        if let Ok(Ok(n)) = tokio::time::timeout(UPSTREAM_TIMEOUT, socket.recv(&mut answer)).await {
            answer.truncate(n);
            return Some(answer);
        }
    }
    None
}

async fn serve_tcp(
    listener: TcpListener,
    upstreams: Arc<Vec<SocketAddr>>,
    limit: Arc<Semaphore>,
    stop: CancellationToken,
) {
    loop {
        let (client, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(_) => continue,
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue;
        };
        let upstreams = upstreams.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(TCP_TIMEOUT, relay_tcp(client, &upstreams)).await;
            drop(permit);
        });
    }
}

/// One query over TCP (two-byte length, then the message) and its answer.
async fn relay_tcp(mut client: TcpStream, upstreams: &[SocketAddr]) -> std::io::Result<()> {
    let len = client.read_u16().await?;
    let mut query = vec![0u8; usize::from(len)];
    client.read_exact(&mut query).await?;
    for upstream in upstreams {
        let Ok(Ok(mut server)) =
            tokio::time::timeout(UPSTREAM_TIMEOUT, TcpStream::connect(upstream)).await
        else {
            continue;
        };
        server.write_u16(len).await?;
        server.write_all(&query).await?;
        let answer_len = server.read_u16().await?;
        let mut answer = vec![0u8; usize::from(answer_len)];
        server.read_exact(&mut answer).await?;
        client.write_u16(answer_len).await?;
        client.write_all(&answer).await?;
        return Ok(());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let answer = ask_udp(&[resolver_addr], b"query").await;
        assert_eq!(answer.as_deref(), Some(&b"answer:query"[..]));

        let tcp_resolver = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_addr = tcp_resolver.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = tcp_resolver.accept().await.unwrap();
            let n = s.read_u16().await.unwrap();
            let mut q = vec![0; n as usize];
            s.read_exact(&mut q).await.unwrap();
            q.reverse();
            s.write_u16(n).await.unwrap();
            s.write_all(&q).await.unwrap();
        });
        let (mut client, server) = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            (c, l.accept().await.unwrap().0)
        };
        let relay = tokio::spawn(async move { relay_tcp(server, &[tcp_addr]).await });
        client.write_u16(3).await.unwrap();
        client.write_all(b"abc").await.unwrap();
        assert_eq!(client.read_u16().await.unwrap(), 3);
        let mut back = [0u8; 3];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"cba");
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
        let answer = ask_udp(&[silent_addr, answering_addr], b"q").await;
        assert_eq!(answer.as_deref(), Some(&b"q"[..]));
        drop(silent);
    }

    #[tokio::test]
    async fn no_resolver_is_an_error_that_names_the_setting() {
        let e = DnsRelay::start(&[]).await.err().expect("refused");
        assert!(e.to_string().contains("network_dns"), "{e}");
    }
}
