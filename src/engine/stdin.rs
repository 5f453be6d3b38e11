//! A run's stdin. Every worker has a pipe for it, whose read end is the interpreter's
//! fd 0 and whose write end the engine keeps: a run without stdin (every Dify run) has
//! it closed at once, so it reads end of input as it did from /dev/null, and a warm
//! worker waits with it as with anything else; a run with a source (`sandbox run`) has
//! it copied in on a thread of its own while it runs, up to a limit, then closed.
//!
//! A plain thread, not the async runtime: the source may be a terminal or a pipe that
//! never ends, and a blocked read must hold up nothing (the process may exit under it).

use std::io::Read;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::RunError;
use crate::protocol::copy_bounded;

/// Where a run's stdin comes from, and how much of it may pass.
pub struct StdinFeed {
    source: Mutex<Option<Box<dyn Read + Send>>>,
    limit: u64,
    report: Arc<FeedReport>,
}

/// What became of a feed, readable once the run has ended.
#[derive(Debug, Default)]
pub struct FeedReport {
    cut: AtomicBool,
}

impl FeedReport {
    /// Whether the source had more than the limit: the run saw end of input there.
    pub fn cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }
}

impl StdinFeed {
    pub fn new(source: Box<dyn Read + Send>, limit: u64) -> Self {
        Self {
            source: Mutex::new(Some(source)),
            limit,
            report: Arc::default(),
        }
    }

    pub fn report(&self) -> Arc<FeedReport> {
        self.report.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Box<dyn Read + Send>>> {
        self.source.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the source was handed to a run already (it cannot be read twice).
    pub fn started(&self) -> bool {
        self.lock().is_none()
    }

    /// Copy the source into `pipe` (a run's stdin) on a thread of its own. The pipe is
    /// closed when the source ends, when the limit is reached, or when the run is gone.
    /// A source already handed out leaves `pipe` closed at once.
    pub fn start(&self, pipe: OwnedFd) -> std::io::Result<()> {
        let Some(source) = self.lock().take() else {
            return Ok(());
        };
        let (limit, report) = (self.limit, self.report.clone());
        std::thread::Builder::new()
            .name("run-stdin".into())
            .spawn(move || {
                let mut pipe = std::fs::File::from(pipe);
                let (_, cut) = copy_bounded(source, &mut pipe, limit);
                report.cut.store(cut, Ordering::Release);
            })
            .map(drop)
    }
}

/// A run's stdin pipe: (read end, write end), both close-on-exec (the read end is moved
/// to the interpreter's fd 0 by whoever starts it).
pub fn pipe() -> Result<(OwnedFd, OwnedFd), RunError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| RunError::Spawn(std::io::Error::from(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_that_went_away_stops_the_copy() {
        let (read, write) = nix::unistd::pipe().expect("pipe");
        drop(read);
        let mut pipe = std::fs::File::from(write);
        let (passed, cut) = copy_bounded(&[1u8; 10][..], &mut pipe, 100);
        assert_eq!((passed, cut), (0, false));
    }

    #[test]
    fn a_feed_is_handed_out_once_and_reports_what_passed() {
        let feed = StdinFeed::new(Box::new(std::io::Cursor::new(b"abc".to_vec())), 2);
        let report = feed.report();
        let (read, write) = nix::unistd::pipe().expect("pipe");
        feed.start(write).expect("start");
        assert!(feed.started());
        let mut got = Vec::new();
        std::fs::File::from(read)
            .read_to_end(&mut got)
            .expect("read");
        assert_eq!(got, b"ab");
        assert!(report.cut());
        // A second run of the same request reads end of input at once.
        let (read, write) = nix::unistd::pipe().expect("pipe");
        feed.start(write).expect("start again");
        let mut got = Vec::new();
        std::fs::File::from(read)
            .read_to_end(&mut got)
            .expect("read");
        assert!(got.is_empty());
    }
}
