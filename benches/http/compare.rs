//! Two builds of the server side by side in one run (`--compare A,B`): typically the
//! portable (musl, static) binary against the glibc one, to see what the C library and
//! its allocator cost. Both servers run at once, each idle while the other is measured.
//! The whole comparison is made `rounds` times (`--rounds N`, default 3), the order of
//! the two alternating by payload and by round, and each figure is the median of its
//! rounds: a burst of other work on the machine falls on one round of one build, not on
//! the result.

use std::ffi::OsString;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::payloads::Payload;
use crate::common::procfs;
use crate::common::server::{self, Server};
use crate::measure;

/// Clients of the load phase compared.
const CLIENTS: usize = 16;
/// A build is "no worse" while each figure is within this much of the other's.
const TOLERANCE: f64 = 0.10;

pub struct Settings {
    pub rounds: usize,
    pub sequential_runs: usize,
    pub pace: Duration,
    pub load_secs: f64,
}

/// One figure of one payload for both builds; `higher_is_better` for throughput.
#[derive(Clone, Copy)]
struct Figure {
    payload: &'static str,
    name: &'static str,
    a: f64,
    b: f64,
    higher_is_better: bool,
}

impl Figure {
    /// How much worse A is than B, as a fraction (negative: A is better).
    fn a_worse_by(&self) -> f64 {
        if self.higher_is_better {
            self.b / self.a - 1.0
        } else {
            self.a / self.b - 1.0
        }
    }
}

fn number(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

fn check_clean(label: &str, what: &str, row: &Value) {
    let errors = row["errors"].as_u64().unwrap_or(0);
    let busy = row["busy_503"].as_u64().unwrap_or(0);
    assert!(
        errors == 0 && busy == 0,
        "{label} {what}: {errors} errors, {busy} busy; first error: {}",
        row["first_error"]
    );
}

pub async fn run(bins: [OsString; 2], payloads: &[Payload], settings: &Settings, python: &str) {
    let labels = bins.clone().map(|b| b.to_string_lossy().into_owned());
    let server_env = [
        ("MAX_WORKERS", "4".to_string()),
        ("MAX_REQUESTS", (4 * CLIENTS).to_string()),
        ("ENABLE_PRELOAD", "true".to_string()),
        ("PYTHON_PATH", python.to_string()),
    ];
    let client = server::client(CLIENTS);
    let mut servers = Vec::new();
    for bin in &bins {
        servers.push(Server::start_bin(bin, &server_env, &client).await);
    }
    for (server, label) in servers.iter().zip(&labels) {
        for p in payloads {
            if let measure::Got::Bad(e) =
                measure::one(&client, &server.base, &p.body(false), p).await
            {
                panic!("{label}: warm-up of {} answered wrongly: {e}", p.title);
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_kb: Vec<u64> = servers
        .iter()
        .map(|s| procfs::status_kb(s.pid(), "VmRSS:"))
        .collect();

    // Each figure of each round, in the same order every round.
    let mut rounds: Vec<Vec<Figure>> = Vec::new();
    for round in 0..settings.rounds {
        eprintln!("round {} of {}", round + 1, settings.rounds);
        rounds.push(measure_round(&client, &servers, &labels, payloads, settings, round).await);
    }
    let figures: Vec<Figure> = rounds[0]
        .iter()
        .enumerate()
        .map(|(i, f)| Figure {
            a: median(rounds.iter().map(|r| r[i].a).collect()),
            b: median(rounds.iter().map(|r| r[i].b).collect()),
            ..*f
        })
        .collect();
    let peak_kb: Vec<u64> = servers
        .iter()
        .map(|s| procfs::status_kb(s.pid(), "VmHWM:"))
        .collect();
    drop(servers);
    report(&labels, &figures, &idle_kb, &peak_kb, settings.rounds);
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// One round: every payload on both builds, sequential then 16 clients.
async fn measure_round(
    client: &reqwest::Client,
    servers: &[Server],
    labels: &[String],
    payloads: &[Payload],
    settings: &Settings,
    round: usize,
) -> Vec<Figure> {
    let mut figures = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        let order: [usize; 2] = if (i + round).is_multiple_of(2) {
            [0, 1]
        } else {
            [1, 0]
        };
        let mut seq = [Value::Null, Value::Null];
        let mut load = [Value::Null, Value::Null];
        for &k in &order {
            eprintln!("{}: sequential, {}", p.title, labels[k]);
            seq[k] = measure::sequential(
                client,
                &servers[k].base,
                p,
                false,
                settings.sequential_runs,
                settings.pace,
            )
            .await;
            check_clean(&labels[k], p.key, &seq[k]);
        }
        for &k in &order {
            eprintln!("{}: {CLIENTS} clients, {}", p.title, labels[k]);
            load[k] = measure::load(
                client,
                &servers[k].base,
                p,
                false,
                CLIENTS,
                settings.load_secs,
                servers[k].pid(),
            )
            .await;
            check_clean(&labels[k], p.key, &load[k]);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let pair = |rows: &[Value; 2], key: &str| (number(&rows[0], key), number(&rows[1], key));
        for (name, (a, b), higher_is_better) in [
            ("sequential p50 ms", pair(&seq, "p50_ms"), false),
            ("sequential p90 ms", pair(&seq, "p90_ms"), false),
            ("16 clients answers/s", pair(&load, "answers_per_s"), true),
            ("16 clients p50 ms", pair(&load, "p50_ms"), false),
            ("16 clients p90 ms", pair(&load, "p90_ms"), false),
            (
                "16 clients CPU ms/answer",
                (
                    load[0]["cpu_ms_per_answer"]["total"]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                    load[1]["cpu_ms_per_answer"]["total"]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                ),
                false,
            ),
        ] {
            figures.push(Figure {
                payload: p.key,
                name,
                a,
                b,
                higher_is_better,
            });
        }
    }
    figures
}

fn report(labels: &[String], figures: &[Figure], idle_kb: &[u64], peak_kb: &[u64], rounds: usize) {
    println!();
    println!("A = {}", labels[0]);
    println!("B = {}", labels[1]);
    println!("each figure: the median of {rounds} rounds");
    println!();
    println!("| payload | figure | A | B | A vs B |");
    println!("|---|---|---:|---:|---:|");
    let mut worse = Vec::new();
    for f in figures {
        let by = f.a_worse_by();
        let mark = if by > TOLERANCE { " **worse**" } else { "" };
        println!(
            "| {} | {} | {:.1} | {:.1} | {:+.1} %{mark} |",
            f.payload,
            f.name,
            f.a,
            f.b,
            by * 100.0
        );
        if by > TOLERANCE {
            worse.push(format!("{} {}", f.payload, f.name));
        }
    }
    println!(
        "| server | RSS idle / peak MB | {:.1} / {:.1} | {:.1} / {:.1} | |",
        idle_kb[0] as f64 / 1024.0,
        peak_kb[0] as f64 / 1024.0,
        idle_kb[1] as f64 / 1024.0,
        peak_kb[1] as f64 / 1024.0
    );
    println!("(A vs B: how much worse A is; positive = A slower, negative = A faster)");
    if worse.is_empty() {
        println!(
            "A is within {:.0} % of B on every figure.",
            TOLERANCE * 100.0
        );
    } else {
        println!(
            "A is more than {:.0} % worse on: {}",
            TOLERANCE * 100.0,
            worse.join(", ")
        );
    }
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-http-compare.json");
    let rows: Vec<Value> = figures
        .iter()
        .map(|f| {
            json!({"payload": f.payload, "figure": f.name, "a": f.a, "b": f.b,
                        "a_worse_by": f.a_worse_by()})
        })
        .collect();
    let report = json!({"a": labels[0], "b": labels[1], "rounds": rounds, "figures": rows,
                        "rss_kb": {"idle": idle_kb, "peak": peak_kb}});
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&report).expect("the comparison as JSON"),
    )
    .expect("write target/bench-http-compare.json");
    println!("JSON: {}", path.display());
}
