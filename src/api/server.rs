//! The listener: an accept loop over hyper's HTTP/1 connections with what `axum::serve`
//! does not offer (a cap on open connections, header and idle deadlines, see `conn`),
//! and a stop that lets answers in progress finish.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::conn;
use crate::config::Config;
use crate::runtime::Language;

/// How many connections may be open, and each one's deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub deadlines: conn::Deadlines,
    pub max_connections: usize,
}

/// Descriptors kept back from connections: the listener, the log files, the state
/// directory, the runtime's own.
const BASE_RESERVE: u64 = 64;
/// Per worker: its socket pair, output and stdin pipes, and the ends that exist while it
/// starts.
const PER_WORKER: u64 = 10;
/// Below this the server would refuse nearly everything; a lower limit is the operator's
/// to fix, and the start-up warning says how.
const MIN_CONNECTIONS: u64 = 16;
/// Above this, idle connections cost more memory than any Dify deployment needs
/// connections (requests in flight are capped by max_requests, 50 by default).
const MAX_DERIVED_CONNECTIONS: u64 = 16384;

impl ConnLimits {
    /// The configured limits; `max_connections`, unless set, from the descriptor limit
    /// `nofile` less what the workers need.
    pub fn new(config: &Config, nofile: u64) -> Self {
        Self {
            deadlines: conn::Deadlines {
                header_read: config.header_read_timeout,
                keepalive: config.keepalive_timeout,
            },
            max_connections: config
                .max_connections
                .unwrap_or_else(|| derived_max_connections(nofile, workers(config))),
        }
    }
}

/// Helper processes alive at once: those running snippets and the warm pool, one per
/// language and network setting.
fn workers(config: &Config) -> usize {
    config.max_workers + config.warm_workers * Language::ALL.len() * 2
}

fn derived_max_connections(nofile: u64, workers: usize) -> usize {
    let reserve = BASE_RESERVE + PER_WORKER * workers as u64;
    let n = nofile
        .saturating_sub(reserve)
        .clamp(MIN_CONNECTIONS, MAX_DERIVED_CONNECTIONS);
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Whether `max_connections` leaves the workers their descriptors under `nofile`.
pub fn fits_descriptor_limit(config: &Config, limits: &ConnLimits, nofile: u64) -> bool {
    limits.max_connections as u64 + BASE_RESERVE + PER_WORKER * workers(config) as u64 <= nofile
}

/// Raise the soft descriptor limit to the hard one (systemd starts services at 1 024,
/// which a few hundred idle clients exhaust); returns the soft limit now in force. The
/// helper sets its own, lower, limit for the snippet.
pub fn raise_descriptor_limit() -> Result<(u64, u64), nix::Error> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    getrlimit(Resource::RLIMIT_NOFILE)
}

/// Serve `router` on `listener` until `shutdown` resolves, then wait for the connections
/// to finish what they are answering.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let stop = CancellationToken::new();
    let mut shed = Tally::default();
    let mut accept_errors = Tally::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = tick.tick() => shed.report_if_due(|n| log_shed(n, limits.max_connections)),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        connections.spawn(conn::serve(stream, router.clone(), limits.deadlines, stop.clone(), slot));
                    }
                    // Closed at once: the client learns now, not after a timeout, and the
                    // descriptor is free again for a run.
                    Err(_) => {
                        drop(stream);
                        shed.add();
                        shed.report_if_due(|n| log_shed(n, limits.max_connections));
                    }
                },
                Err(e) => {
                    accept_errors.add();
                    accept_errors.report_if_due(|n| tracing::warn!(
                        error = %e,
                        failures = n,
                        "cannot accept connections; if this says too many open files, lower max_connections (MAX_CONNECTIONS) or raise the descriptor limit (LimitNOFILE= in the systemd unit, --ulimit nofile= for docker)"
                    ));
                    // The failure (a descriptor limit, most likely) lasts until something
                    // closes: retrying at once would only spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    shed.report_if_due(|n| log_shed(n, limits.max_connections));
    stop.cancel();
    connections.close();
    connections.wait().await;
}

fn log_shed(closed: u64, max_connections: usize) {
    tracing::warn!(
        closed,
        max_connections,
        "shedding connections: {closed} new connection(s) closed at once because {max_connections} are open; if these clients are legitimate, raise max_connections (MAX_CONNECTIONS) and the descriptor limit"
    );
}

/// Events counted between log lines, so a flood writes one line a second, not one per
/// event.
#[derive(Debug, Default)]
struct Tally {
    pending: u64,
    last: Option<Instant>,
}

impl Tally {
    const EVERY: Duration = Duration::from_secs(1);

    fn add(&mut self) {
        self.pending += 1;
    }

    fn report_if_due(&mut self, log: impl FnOnce(u64)) {
        let now = Instant::now();
        if self.pending == 0 || self.last.is_some_and(|t| now - t < Self::EVERY) {
            return;
        }
        log(self.pending);
        self.pending = 0;
        self.last = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_get_what_the_workers_leave() {
        // 4 running and 2 warm per language and network setting: 12 workers.
        assert_eq!(derived_max_connections(1024, 12), 1024 - 64 - 10 * 12);
        assert_eq!(derived_max_connections(100, 12), 16);
        assert_eq!(derived_max_connections(1 << 20, 12), 16384);
    }

    #[test]
    fn a_tally_logs_at_most_once_a_second_with_the_count() {
        let mut t = Tally::default();
        let mut lines = Vec::new();
        t.add();
        t.report_if_due(|n| lines.push(n));
        for _ in 0..5 {
            t.add();
            t.report_if_due(|n| lines.push(n));
        }
        assert_eq!(lines, vec![1], "the rest wait for the next second");
        t.last = t.last.map(|l| l - Duration::from_secs(2));
        t.report_if_due(|n| lines.push(n));
        assert_eq!(lines, vec![1, 5]);
        t.last = None;
        t.report_if_due(|n| lines.push(n));
        assert_eq!(lines, vec![1, 5], "nothing new, nothing logged");
    }
}
