//! A run's output streams, read as they come: each kept up to its cap and passed on to a
//! sink (a terminal, for `sandbox run`); a stream past its cap stops the run.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Notify;

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Receives output as it is produced (used by `sandbox run` to stream to a terminal).
pub type Sink = Arc<dyn Fn(Stream, &[u8]) + Send + Sync>;

/// How long the output readers may take to drain once the process tree is gone.
pub const DRAIN: Duration = Duration::from_secs(5);

/// How long a run that announced its end (see `isolation::snippet::ENDED`) may take to
/// close its output and be gone; one that takes longer is killed.
pub const EXIT_GRACE: Duration = Duration::from_millis(500);

/// Read a stream up to `cap` bytes; on overflow, tell the run to stop.
pub async fn read_capped<R: AsyncRead + Unpin>(
    mut r: R,
    cap: usize,
    stream: Stream,
    sink: Option<Sink>,
    overflow: Arc<Notify>,
) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return (buf, false),
            Ok(n) => {
                let room = cap.saturating_sub(buf.len());
                let take = n.min(room);
                buf.extend_from_slice(&chunk[..take]);
                if let Some(s) = &sink {
                    s(stream, &chunk[..take]);
                }
                if n > room {
                    overflow.notify_one();
                    return (buf, true);
                }
            }
        }
    }
}

pub async fn join_reader(h: Option<tokio::task::JoinHandle<(Vec<u8>, bool)>>) -> (Vec<u8>, bool) {
    let Some(h) = h else {
        return (Vec::new(), false);
    };
    match tokio::time::timeout(DRAIN, h).await {
        Ok(Ok(v)) => v,
        _ => (Vec::new(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_past_its_cap_is_cut_and_reported() {
        let overflow = Arc::new(Notify::new());
        let data: &[u8] = &[b'x'; 100];
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink: Sink = {
            let seen = seen.clone();
            Arc::new(move |_, bytes: &[u8]| seen.lock().unwrap().extend_from_slice(bytes))
        };
        let (kept, over) =
            read_capped(data, 60, Stream::Stdout, Some(sink), overflow.clone()).await;
        assert_eq!((kept.len(), over), (60, true));
        assert_eq!(seen.lock().unwrap().len(), 60, "the sink sees what is kept");
        // notify_one stored a permit for the next waiter.
        tokio::time::timeout(Duration::from_millis(100), overflow.notified())
            .await
            .expect("the overflow was signalled");
        let (kept, over) = read_capped(&data[..10], 60, Stream::Stderr, None, overflow).await;
        assert_eq!((kept.len(), over), (10, false));
    }
}
