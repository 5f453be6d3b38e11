//! HTTP/1.1 over a socket of the test's own, for clients that must control every byte
//! they send (or do not send).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One answer as read off the socket.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    /// From the first byte sent to the last byte of the answer read.
    pub elapsed: Duration,
}

/// Read one answer: its head, then `content-length` bytes of body.
pub async fn read_answer(stream: &mut (impl AsyncRead + Unpin)) -> std::io::Result<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"));
    let length: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
    Ok((status, body))
}

/// Send `head` (ending in the blank line) and then `body` on a new connection, reading
/// the answer while the body is still being written: the server may answer first.
pub async fn exchange(addr: &str, head: String, body: Arc<Vec<u8>>) -> std::io::Result<Answer> {
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await?;
    let (mut reader, mut writer) = stream.into_split();
    let sending = tokio::spawn(async move {
        // A refused body is not read: the write may fail, which is the server's right.
        if writer.write_all(head.as_bytes()).await.is_ok() {
            let _ = writer.write_all(&body).await;
        }
        writer
    });
    let (status, body) = read_answer(&mut reader).await?;
    let elapsed = started.elapsed();
    sending.abort();
    Ok(Answer {
        status,
        body,
        elapsed,
    })
}

/// A `POST /v1/sandbox/run` head with the key and a declared length.
pub fn run_head(content_type: &str, length: usize) -> String {
    format!(
        "POST /v1/sandbox/run HTTP/1.1\r\nHost: x\r\nX-Api-Key: {}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n",
        super::KEY
    )
}

/// How long until the server closes `stream` (end of file or reset), at most `limit`.
pub async fn closed_after(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut chunk = [0u8; 1024];
    let closed = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, closed)
        .await
        .ok()
        .map(|()| started.elapsed())
}
