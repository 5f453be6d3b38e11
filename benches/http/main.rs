//! End-to-end benchmark of `sandbox serve` on loopback with the requests Dify really
//! sends, each with network off and on, against the bare interpreters' cold start
//! measured in the same run.
//!
//!     cargo bench --bench http                       # full run (about 6 minutes)
//!     cargo bench --bench http -- --quick            # short phases, for a smoke check
//!     cargo bench --bench http -- --only py-code,jinja2
//!     cargo bench --bench http -- --compare dist/linux-amd64/sandbox,dist/linux-amd64-gnu/sandbox
//!
//! `--compare A,B` measures two builds side by side instead (network off, sequential and
//! 16 clients, `--rounds N` times, 3 by default; see compare.rs) and prints how much worse
//! A is than B on each figure, each the median of its rounds.
//!
//! Payload keys: py-hello, py-code, jinja2, node-hello, js-code. Prints tables and the
//! ratios to the targets, and writes the same numbers as JSON to target/bench-http.json.

#[path = "../common/mod.rs"]
mod common;
mod compare;
mod measure;
mod report;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::payloads::{self, Payload};
use common::procfs::{self, TreeCpu};
use common::server::{self, Server};

/// Concurrent clients of the load phases.
pub const CLIENTS: [usize; 2] = [4, 16];

/// Well above the most clients, each of which has one request in flight at a time:
/// a 503 in a load phase then means the server miscounts, not that the bench overdid it.
const MAX_REQUESTS: usize = 4 * 16;

struct Settings {
    cold_runs: usize,
    sequential_runs: usize,
    pace: Duration,
    load_secs: f64,
}

/// What a sandboxed Node hello run does, done by a bare `node`: load the modules the
/// bootstrap uses, compile the snippet as a script and print. The floor a single-use Node
/// process cannot go below.
const NODE_HELLO_BARE: &str =
    "require('fs');new (require('vm').Script)('console.log(\\'hello\\')').runInThisContext()";

/// A bare interpreter started and ended with nothing to do, in an empty environment: a
/// variable such as NODE_EXTRA_CA_CERTS in the caller's would triple Node's start.
pub struct Cold {
    pub command: String,
    pub wall_ms: f64,
    pub cpu_ms: f64,
}

fn cold_start(program: &str, args: &[&str], runs: usize) -> Cold {
    let mut times = Vec::new();
    let cpu_before = procfs::children_cpu();
    for _ in 0..runs {
        let t = Instant::now();
        let ok = Command::new(program)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "{program} {args:?} failed");
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let cpu = procfs::children_cpu().saturating_sub(cpu_before);
    times.sort_by(|a, b| a.total_cmp(b));
    Cold {
        command: format!("{program} {}", args.join(" ")),
        wall_ms: common::percentile(&times, 0.5),
        cpu_ms: cpu.as_secs_f64() * 1000.0 / runs as f64,
    }
}

/// One payload with one network setting: the paced sequential row and one row per
/// client count.
pub struct Measured {
    pub payload: Payload,
    pub network: bool,
    pub sequential: Value,
    pub loads: Vec<Value>,
}

/// Resident memory of the server (kB) and of the processes below it.
pub struct Memory {
    pub server_idle_kb: u64,
    pub server_peak_kb: u64,
    pub below_after_warmup: (usize, u64),
    pub below_after_load: (usize, u64),
}

struct Args {
    quick: bool,
    only: Option<Vec<String>>,
    compare: Option<[std::ffi::OsString; 2]>,
    /// How many times `--compare` measures both builds (each figure: the median).
    rounds: usize,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let only = argv
        .iter()
        .position(|a| a == "--only")
        .map(|i| argv.get(i + 1).expect("--only needs a payload key"))
        .map(|keys| keys.split(',').map(str::to_string).collect::<Vec<_>>());
    let compare = argv.iter().position(|a| a == "--compare").map(|i| {
        let both = argv.get(i + 1).expect("--compare needs A,B (two binaries)");
        let (a, b) = both
            .split_once(',')
            .expect("--compare needs two binaries separated by a comma");
        // The servers start in a directory of their own: a relative path is this one's.
        [a, b].map(|bin| {
            std::path::absolute(bin)
                .expect("--compare: resolve the binary's path")
                .into_os_string()
        })
    });
    let rounds = argv
        .iter()
        .position(|a| a == "--rounds")
        .map(|i| {
            argv.get(i + 1)
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| *n > 0)
                .expect("--rounds needs a positive whole number")
        })
        .unwrap_or(3);
    Args {
        rounds,
        quick: argv.iter().any(|a| a == "--quick"),
        only,
        compare,
    }
}

/// Confirms the server runs `preload` (ENABLE_PRELOAD), which the Jinja2 node relies on.
async fn check_preload(client: &reqwest::Client, base: &str) {
    let body = json!({"language": "python3", "code": "print('code')", "preload": "print('preload')",
                      "enable_network": false});
    let (_, envelope) = server::run(client, base, &body)
        .await
        .expect("the preload check request");
    assert_eq!(
        envelope["data"]["stdout"], "preload\ncode\n",
        "the server did not run the preload: {envelope}"
    );
}

#[tokio::main]
async fn main() {
    let args = args();
    let settings = if args.quick {
        Settings {
            cold_runs: 10,
            sequential_runs: 20,
            pace: Duration::from_millis(100),
            load_secs: 2.0,
        }
    } else {
        Settings {
            cold_runs: 30,
            sequential_runs: 100,
            pace: Duration::from_millis(100),
            load_secs: 8.0,
        }
    };
    let mut selected = payloads::all();
    if let Some(only) = &args.only {
        selected.retain(|p| only.iter().any(|k| k == p.key));
        assert!(
            !selected.is_empty(),
            "--only {only:?} names no payload; keys: py-hello, py-code, jinja2, node-hello, js-code"
        );
    }

    let python = server::resolve_python();
    if let Some(bins) = args.compare {
        let compare = compare::Settings {
            rounds: args.rounds,
            sequential_runs: settings.sequential_runs,
            pace: settings.pace,
            load_secs: settings.load_secs,
        };
        compare::run(bins, &selected, &compare, &python).await;
        return;
    }
    let cold_py = cold_start(&python, &["-c", "pass"], settings.cold_runs);
    let cold_node = cold_start("node", &["-e", "0"], settings.cold_runs);
    let node_same_work = cold_start("node", &["-e", NODE_HELLO_BARE], settings.cold_runs);

    let server_env = [
        ("MAX_WORKERS", "4".to_string()),
        ("MAX_REQUESTS", MAX_REQUESTS.to_string()),
        ("ENABLE_PRELOAD", "true".to_string()),
        // The server runs the interpreter the baseline was measured on.
        ("PYTHON_PATH", python.clone()),
    ];
    let client = server::client(*CLIENTS.iter().max().unwrap_or(&16));
    let server = Server::start(&server_env, &client).await;
    let (base, pid) = (server.base.clone(), server.pid());
    check_preload(&client, &base).await;
    // Each payload once with each network setting: both warm pools exist from here on.
    for p in &selected {
        for network in [false, true] {
            if let measure::Got::Bad(e) = measure::one(&client, &base, &p.body(network), p).await {
                eprintln!(
                    "warm-up: {} (network {network}) answered wrongly: {e}",
                    p.title
                );
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let server_idle_kb = procfs::status_kb(pid, "VmRSS:");
    let below_after_warmup = procfs::descendants_rss_kb(pid);
    let idle_cpu = TreeCpu::read(pid);

    let mut measured = Vec::new();
    for p in &selected {
        for network in [false, true] {
            eprintln!(
                "measuring {} with network {}",
                p.title,
                if network { "on" } else { "off" }
            );
            let sequential = measure::sequential(
                &client,
                &base,
                p,
                network,
                settings.sequential_runs,
                settings.pace,
            )
            .await;
            let mut loads = Vec::new();
            for clients in CLIENTS {
                loads.push(
                    measure::load(&client, &base, p, network, clients, settings.load_secs, pid)
                        .await,
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            measured.push(Measured {
                payload: p.clone(),
                network,
                sequential,
                loads,
            });
        }
    }
    let total_cpu = TreeCpu::read(pid).since(idle_cpu);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let memory = Memory {
        server_idle_kb,
        server_peak_kb: procfs::status_kb(pid, "VmHWM:"),
        below_after_warmup,
        below_after_load: procfs::descendants_rss_kb(pid),
    };
    drop(server);

    let run = report::Run {
        cold: [cold_py, cold_node],
        node_same_work,
        memory,
        measured,
        setup: report::Setup {
            server_env: server_env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            pace_ms: settings.pace.as_millis() as u64,
            load_secs: settings.load_secs,
        },
        total_cpu,
    };
    report::print(&run);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-http.json");
    let json = serde_json::to_string_pretty(&report::json(&run)).expect("the report as JSON");
    std::fs::write(&path, json).expect("write target/bench-http.json");
    println!("JSON: {}", path.display());
}
