//! One client connection: hyper reads HTTP/1, the router answers. Kept here: the
//! deadlines a client must meet (its headers, its next request on a kept-alive
//! connection) and a close that lets a client read a refusal.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::Service;

/// The most a connection buffers: a request's headers must fit.
const READ_BUFFER_MAX: usize = 32 * 1024;

/// How long a closing connection reads and discards what its client still sends.
const LINGER: Duration = Duration::from_secs(2);

/// How long a connection may take over a request's headers, and wait idle for the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// From connecting, or from the first byte after an idle wait.
    pub header_read: Duration,
    /// Zero: one request per connection.
    pub keepalive: Duration,
}

/// Where a connection is between requests, which decides its deadline.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// A request's headers are arriving, since the connection opened or since the first
    /// byte after an idle wait: `header_read_timeout` applies.
    Head(Instant),
    /// Kept alive, waiting for the next request: `keepalive_timeout` applies.
    Idle(Instant),
    /// A request is being answered: the run has its own limits.
    Busy,
}

struct Clock {
    phase: Mutex<Phase>,
    changed: Notify,
}

impl Clock {
    fn set(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = phase;
        self.changed.notify_one();
    }

    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes came in: on an idle connection, a request has begun.
    fn bytes_arrived(&self) {
        let mut phase = self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Head(Instant::now());
            drop(phase);
            self.changed.notify_one();
        }
    }

    fn deadline(&self, limits: &Deadlines) -> Option<Instant> {
        match self.phase() {
            Phase::Head(since) => Some(since + limits.header_read),
            Phase::Idle(since) => Some(since + limits.keepalive),
            Phase::Busy => None,
        }
    }
}

/// The socket, telling the clock when bytes arrive.
struct Watched {
    stream: TcpStream,
    clock: Arc<Clock>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.clock.bytes_arrived();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Marks the connection idle when dropped: hyper drops an answer's body once it is sent.
struct AnswerSent(Arc<Clock>);

impl Drop for AnswerSent {
    fn drop(&mut self) {
        self.0.set(Phase::Idle(Instant::now()));
    }
}

/// An answer's body, carrying the mark that it has been sent.
struct Answer {
    body: Body,
    _sent: AnswerSent,
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

type Answering = Pin<Box<dyn Future<Output = Result<hyper::Response<Answer>, Infallible>> + Send>>;

/// Serve one connection until the client leaves, misses a deadline, or the server stops.
/// `_slot` is its place under `max_connections`, given back when the socket is closed.
pub(super) async fn serve(
    stream: TcpStream,
    router: Router,
    limits: Deadlines,
    stop: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    // Answers are written whole; waiting to batch them only adds latency.
    let _ = stream.set_nodelay(true);
    let clock = Arc::new(Clock {
        phase: Mutex::new(Phase::Head(Instant::now())),
        changed: Notify::new(),
    });
    let io = TokioIo::new(Watched {
        stream,
        clock: clock.clone(),
    });
    let service_clock = clock.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        service_clock.set(Phase::Busy);
        let sent = AnswerSent(service_clock.clone());
        let mut router = router.clone();
        Box::pin(async move {
            let response = match router.call(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok(response.map(|body| Answer { body, _sent: sent }))
        }) as Answering
    });
    let mut conn = hyper::server::conn::http1::Builder::new()
        // The deadlines are kept here, by phase: hyper's own header timer also runs while
        // a kept-alive connection waits, which would cut keep-alive to the header timeout.
        .header_read_timeout(None)
        .keep_alive(!limits.keepalive.is_zero())
        // Headers beyond this get HTTP 431. Dify's are a few hundred bytes; hyper's
        // default (~400 KiB) would let each open connection hold that much.
        .max_buf_size(READ_BUFFER_MAX)
        .serve_connection(io, service);
    let mut stopping = false;
    let finished = loop {
        let deadline = clock.deadline(&limits);
        tokio::select! {
            done = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break done,
            () = clock.changed.notified() => {}
            () = sleep_until(deadline) => {
                // The phase may have moved on since the deadline was read.
                if clock.deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                    return;
                }
            }
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                // Nothing is being answered: nothing to wait for.
                if !matches!(clock.phase(), Phase::Busy) {
                    return;
                }
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    match finished {
        Ok(()) => linger(conn.into_parts().io.into_inner().stream, &stop).await,
        Err(e) => tracing::debug!(error = %e, "connection closed on an error"),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Close after an answer. A refusal (too many requests, a body too large) is sent
/// before the request body is read, and closing a socket with unread data resets the
/// connection, which can destroy the answer before the client reads it. So: end our
/// side, then read and discard what the client still sends, for a moment at most.
async fn linger(mut stream: TcpStream, stop: &CancellationToken) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut sink = [0u8; 8192];
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::select! {
        () = drain => {}
        () = tokio::time::sleep(LINGER) => {}
        () = stop.cancelled() => {}
    }
}
