//! Soak test of one real `sandbox serve`: mixed load from several clients for a long
//! time (hello, Dify's payloads, memory, process, output and disk bombs, timeouts,
//! offline and networked runs), every answer checked against what its kind must get,
//! and what the server may leak counted before and after. Run by hand, not in CI.
//!
//!     cargo bench --bench soak                      # 30 minutes
//!     cargo bench --bench soak -- --minutes 1       # a smoke run
//!
//! Options: --minutes N (default 30), --clients N (default 6, a third of them sending
//! only bombs and refusals), --leases DIR (the uid lease files; default
//! /run/sandbox/uids where it exists, else /var/lib/sandbox/uids), --state-dir DIR
//! (given to the server, default /var/lib/sandbox).

#[path = "soak/census.rs"]
mod census;
#[path = "common/mod.rs"]
mod common;
#[path = "soak/kinds.rs"]
mod kinds;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use census::Census;
use common::server::{self, Server};
use common::{clip, percentile};
use kinds::{Kind, Limits};

/// Warm workers per (language, network): the soak uses all four keys.
const WARM_WORKERS: usize = 2;
const POOL_KEYS: usize = 4;
/// Bad answers quoted in full.
const QUOTED: usize = 8;

struct Args {
    minutes: f64,
    clients: usize,
    leases: PathBuf,
    state_dir: PathBuf,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        argv.iter().position(|a| a == flag).map(|i| {
            argv.get(i + 1)
                .unwrap_or_else(|| panic!("{flag} needs a value"))
        })
    };
    Args {
        minutes: value("--minutes").map_or(30.0, |v| v.parse().expect("--minutes N")),
        clients: value("--clients").map_or(6, |v| v.parse().expect("--clients N")),
        leases: value("--leases").map_or_else(default_leases, PathBuf::from),
        state_dir: value("--state-dir").map_or("/var/lib/sandbox".into(), PathBuf::from),
    }
}

/// Where root's servers lease uids: host-wide under /run since servers share leases,
/// below the state directory before.
fn default_leases() -> PathBuf {
    ["/run/sandbox/uids", "/var/lib/sandbox/uids"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_dir())
        .unwrap_or_else(|| "/var/lib/sandbox/uids".into())
}

#[derive(Default)]
struct KindTally {
    latencies: Vec<f64>,
    bad: usize,
    busy: usize,
}

#[derive(Default)]
struct Tally {
    kinds: BTreeMap<String, KindTally>,
    /// What the `error` of each HTTP 200 answer named.
    named: BTreeMap<&'static str, usize>,
    quoted: Vec<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        for (k, t) in other.kinds {
            let e = self.kinds.entry(k).or_default();
            e.latencies.extend(t.latencies);
            e.bad += t.bad;
            e.busy += t.busy;
        }
        for (k, n) in other.named {
            *self.named.entry(k).or_default() += n;
        }
        self.quoted.extend(other.quoted);
    }

    fn bad(&self) -> usize {
        self.kinds.values().map(|t| t.bad).sum()
    }
}

/// Live totals for the progress line.
#[derive(Default)]
struct Live {
    answers: AtomicUsize,
    bad: AtomicUsize,
    busy: AtomicUsize,
    /// Set when the server process has ended: the clients stop.
    server_gone: AtomicBool,
}

fn named(envelope: &Value) -> &'static str {
    let error = envelope["data"]["error"].as_str().unwrap_or_default();
    let phrases = [
        ("timeout", "timeout"),
        ("memory limit exceeded", "memory limit"),
        ("output limit exceeded", "output limit"),
        ("process limit reached", "process limit"),
        ("operation not permitted", "operation not permitted"),
        ("disk limit reached", "disk limit"),
        ("No space left on device", "no space left on device"),
        ("File too large", "file too large"),
        ("Connection refused", "connection refused"),
    ];
    if envelope["code"] != 0 {
        return "envelope code not 0";
    }
    if error.is_empty() {
        return "none (success)";
    }
    phrases
        .iter()
        .find(|(p, _)| error.contains(p))
        .map_or("other failure", |(_, name)| name)
}

async fn send(client: &reqwest::Client, base: &str, kind: &Kind, tally: &mut Tally, live: &Live) {
    let t = Instant::now();
    let got = server::run(client, base, &kind.body).await;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let entry = tally.kinds.entry(kind.name.clone()).or_default();
    let verdict = match got {
        Ok((503, _)) => {
            entry.busy += 1;
            live.busy.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Ok((200, envelope)) => {
            *tally.named.entry(named(&envelope)).or_default() += 1;
            kind.check(&envelope)
        }
        Ok((status, envelope)) => Err(format!(
            "HTTP {status}: {}",
            clip(&envelope.to_string(), 300)
        )),
        Err(e) => Err(e),
    };
    live.answers.fetch_add(1, Ordering::Relaxed);
    match verdict {
        Ok(()) => entry.latencies.push(ms),
        Err(e) => {
            entry.bad += 1;
            live.bad.fetch_add(1, Ordering::Relaxed);
            if tally.quoted.len() < QUOTED {
                tally.quoted.push(format!("{}: {e}", kind.name));
            }
        }
    }
}

/// One client with a connection of its own (closed when it ends, so that descriptors
/// counted after the load are the server's): the kinds in turn from `first`.
async fn lane(
    base: String,
    kinds: Arc<Vec<Kind>>,
    first: usize,
    deadline: Instant,
    live: Arc<Live>,
) -> Tally {
    let client = server::client(1);
    let mut tally = Tally::default();
    let mut i = first;
    while Instant::now() < deadline && !live.server_gone.load(Ordering::Relaxed) {
        send(&client, &base, &kinds[i % kinds.len()], &mut tally, &live).await;
        i += 1;
    }
    tally
}

/// The load: `ordinary` clients cycling through the ordinary kinds, `abusive` ones
/// through the bombs, each starting at a different place.
struct Mix {
    base: String,
    ordinary: Arc<Vec<Kind>>,
    abusive: Arc<Vec<Kind>>,
    lanes: (usize, usize),
    live: Arc<Live>,
}

impl Mix {
    async fn run(&self, deadline: Instant) -> Tally {
        let (ordinary, abusive) = self.lanes;
        let mut lanes = Vec::new();
        for i in 0..ordinary + abusive {
            let (set, first) = if i < ordinary {
                (&self.ordinary, i * self.ordinary.len() / ordinary)
            } else {
                (&self.abusive, (i - ordinary) * self.abusive.len() / abusive)
            };
            let run = lane(
                self.base.clone(),
                set.clone(),
                first,
                deadline,
                self.live.clone(),
            );
            lanes.push(tokio::spawn(run));
        }
        let mut tally = Tally::default();
        for l in lanes {
            tally.merge(l.await.expect("a soak client panicked"));
        }
        tally
    }
}

/// Prints a line of totals and the server's size every minute.
fn progress(pid: u32, live: Arc<Live>, started: Instant) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for _ in 0..120 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if !common::procfs::alive(pid) {
                    println!(
                        "[{:>5.1} min] the server process has ended",
                        started.elapsed().as_secs_f64() / 60.0
                    );
                    live.server_gone.store(true, Ordering::Relaxed);
                    return;
                }
            }
            let below = common::procfs::descendants_rss_kb(pid);
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |rd| rd.count());
            println!(
                "[{:>5.1} min] answers {}, bad {}, 503 {}; server RSS {:.1} MB, {fds} fds; below it {} processes, {:.1} MB",
                started.elapsed().as_secs_f64() / 60.0,
                live.answers.load(Ordering::Relaxed),
                live.bad.load(Ordering::Relaxed),
                live.busy.load(Ordering::Relaxed),
                common::procfs::status_kb(pid, "VmRSS:") as f64 / 1024.0,
                below.0,
                below.1 as f64 / 1024.0
            );
        }
    })
}

/// Warm workers ready, from the server's metrics.
async fn warm_ready(client: &reqwest::Client, base: &str) -> usize {
    let Ok(r) = client.get(format!("{base}/metrics")).send().await else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("sandbox_warm_workers{"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as usize
}

/// A few seconds of quiet, then up to 30 s more for the warm pool to fill.
async fn settle(client: &reqwest::Client, base: &str) -> usize {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let since = Instant::now();
    loop {
        let ready = warm_ready(client, base).await;
        if ready >= WARM_WORKERS * POOL_KEYS || since.elapsed() > Duration::from_secs(30) {
            return ready;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn print_kinds(tally: &Tally, secs: f64) {
    println!(
        "{:<18} {:>8} {:>9} {:>8} {:>8} {:>5} {:>5}",
        "kind", "answers", "answers/s", "p50 ms", "p99 ms", "bad", "503"
    );
    for (name, t) in &tally.kinds {
        let mut lat = t.latencies.clone();
        lat.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{name:<18} {:>8} {:>9.2} {:>8.1} {:>8.1} {:>5} {:>5}",
            lat.len() + t.bad,
            lat.len() as f64 / secs,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            t.bad,
            t.busy
        );
    }
}

#[tokio::main]
async fn main() {
    let args = args();
    let limits = Limits {
        memory_mb: 128,
        max_processes: 32,
        max_output_bytes: 1 << 20,
        tmp_size_mb: 16,
        timeout_s: 3,
    };
    let mut env = limits.env();
    env.extend([
        ("MAX_WORKERS", "4".to_string()),
        ("MAX_REQUESTS", "64".to_string()),
        ("ENABLE_PRELOAD", "true".to_string()),
        ("WARM_WORKERS", WARM_WORKERS.to_string()),
        ("SANDBOX_STATE_DIR", args.state_dir.display().to_string()),
    ]);
    let client = server::client(1);
    let mut server = Server::start(&env, &client).await;
    let (base, pid) = (server.base.clone(), server.pid());
    let host = kinds::host_address();
    let abusers = (args.clients / 3).max(1);
    let mix = Mix {
        base: base.clone(),
        ordinary: Arc::new(kinds::ordinary()),
        abusive: Arc::new(kinds::abusive(&limits, host, server.port)),
        lanes: (args.clients.saturating_sub(abusers).max(1), abusers),
        live: Arc::new(Live::default()),
    };
    println!(
        "soak: {} minutes, {} clients against pid {pid} ({}), {} kinds, uid leases in {}",
        args.minutes,
        args.clients,
        env.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        mix.ordinary.len() + mix.abusive.len(),
        args.leases.display()
    );

    // Every kind once, so that every warm pool exists; then the mix for a while, so
    // that the start census sees the server at its working size, not before.
    let mut warmup = Tally::default();
    for kind in mix.ordinary.iter().chain(mix.abusive.iter()) {
        send(&client, &base, kind, &mut warmup, &mix.live).await;
    }
    let warm_secs = (args.minutes * 6.0).clamp(10.0, 60.0);
    warmup.merge(
        mix.run(Instant::now() + Duration::from_secs_f64(warm_secs))
            .await,
    );
    let ready = settle(&client, &base).await;
    let start = Census::take(pid, ready, &args.leases, &args.state_dir);
    if start.leases_held.1 == 0 {
        println!(
            "warning: the server holds no lease in {}: give its lease directory with --leases",
            args.leases.display()
        );
    }

    for counter in [&mix.live.answers, &mix.live.bad, &mix.live.busy] {
        counter.store(0, Ordering::Relaxed);
    }
    let started = Instant::now();
    let progress = progress(pid, mix.live.clone(), started);
    let tally = mix
        .run(started + Duration::from_secs_f64(args.minutes * 60.0))
        .await;
    let secs = started.elapsed().as_secs_f64();
    progress.abort();
    let died = server.exited();
    if let Some(status) = died {
        println!("\nthe server ended during the load ({status}); what follows counts until then");
    }
    let ready = match died {
        Some(_) => 0,
        None => settle(&client, &base).await,
    };
    let end = Census::take(pid, ready, &args.leases, &args.state_dir);

    let total: usize = tally
        .kinds
        .values()
        .map(|t| t.latencies.len() + t.bad)
        .sum();
    println!(
        "\n{total} answers in {secs:.0} s ({:.1}/s) from {} ordinary and {} abusive clients, after a warm-up of {warm_secs:.0} s\n",
        total as f64 / secs,
        mix.lanes.0,
        mix.lanes.1
    );
    print_kinds(&tally, secs);
    println!("\nwhat `error` named (HTTP 200 answers):");
    for (name, n) in &tally.named {
        println!("  {name:<26} {n:>8}");
    }
    let bad = tally.bad() + warmup.bad();
    println!("\nbad answers: {bad} (warm-up {})", warmup.bad());
    for q in warmup.quoted.iter().chain(&tally.quoted).take(QUOTED) {
        println!("  {q}");
    }
    println!("\nafter warm-up and after the load (both settled, warm pool refilled):");
    census::print(&start, &end);
    let grew = census::grew(&start, &end);
    println!("tolerance: {}", census::TOLERANCE);
    if let Some(status) = died {
        println!(
            "VERDICT: NOT CLEAN: the server ended during the load ({status}); {bad} bad answers"
        );
    } else if grew.is_empty() && bad == 0 {
        println!("VERDICT: flat, and no bad answer");
    } else {
        let what = if grew.is_empty() {
            "nothing".to_string()
        } else {
            grew.join("; ")
        };
        println!("VERDICT: NOT CLEAN: {bad} bad answers; grew: {what}");
    }

    let t = Instant::now();
    let ending = match (died, server.stop(Duration::from_secs(30))) {
        (Some(_), _) => "had already ended",
        (None, true) => "exited",
        (None, false) => "killed, it did not exit",
    };
    println!(
        "after SIGTERM: {ending} in {:.1} s; its per-run cgroups left {}, its nft tables left {}, its sbx* interfaces left {}, uid leases still locked by it {}",
        t.elapsed().as_secs_f64(),
        start.cgroups_left(pid),
        census::nft_tables(pid).1,
        start
            .sbx_prefix
            .as_deref()
            .map_or(0, |p| census::sbx_names(p).len()),
        census::leases_held(&args.leases, pid).1
    );
}
