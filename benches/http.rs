//! End-to-end benchmark of `sandbox serve` on loopback, against the cold start of the
//! bare interpreters measured in the same run.
//!
//!     cargo bench --bench http                 # full run (about 2 minutes)
//!     cargo bench --bench http -- --quick      # shorter, for a smoke check
//!
//! Prints a table and writes the same numbers as JSON to target/bench-http.json.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const KEY: &str = "dify-sandbox";

struct Settings {
    sequential_runs: usize,
    pace: Duration,
    load_secs: [(usize, u64); 3],
    cold_runs: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn median_ms(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(&v, 0.5)
}

/// Wall time of starting and ending the interpreter with nothing to do.
fn cold_start(program: &str, args: &[&str], runs: usize) -> f64 {
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let ok = Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "{program} {args:?} failed");
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    median_ms(times)
}

fn resolve_python() -> String {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 on PATH");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn rss_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Resident memory of every descendant of `pid` (the warm interpreters and helpers).
fn descendants_rss_kb(pid: u32) -> (usize, u64) {
    let mut parents = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        if let Some(pp) = stat[close + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|x| x.parse::<u32>().ok())
        {
            parents.insert(p, pp);
        }
    }
    let is_desc = |mut p: u32| {
        while let Some(&pp) = parents.get(&p) {
            if pp == pid {
                return true;
            }
            p = pp;
        }
        false
    };
    let procs: Vec<u32> = parents.keys().copied().filter(|p| is_desc(*p)).collect();
    (
        procs.len(),
        procs.iter().map(|p| rss_kb(*p, "VmRSS:")).sum(),
    )
}

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> Server {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_sandbox"))
        .arg("serve")
        .current_dir(std::env::temp_dir())
        .env("SANDBOX_PORT", port.to_string())
        .env("SANDBOX_LOG", "warn")
        .env("MAX_WORKERS", "4")
        .env("MAX_REQUESTS", "64")
        .stdout(Stdio::null())
        .spawn()
        .expect("start sandbox serve");
    Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
    }
}

fn body(language: &str) -> Value {
    let code = if language == "python3" {
        "print('hello world')"
    } else {
        "console.log('hello world')"
    };
    // Dify always asks for network; the server allows it by default.
    json!({"language": language, "code": code, "enable_network": true})
}

async fn one(client: &reqwest::Client, base: &str, body: &Value) -> Result<f64, String> {
    let t = Instant::now();
    let r = client
        .post(format!("{base}/v1/sandbox/run"))
        .header("X-Api-Key", KEY)
        .json(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let v: Value = r.json().await.map_err(|e| e.to_string())?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if status != 200 || v["code"] != 0 || v["data"]["stdout"] != "hello world\n" {
        return Err(format!("{status} {v}"));
    }
    Ok(ms)
}

fn summary(mut lat: Vec<f64>, errors: usize, secs: f64) -> Value {
    lat.sort_by(|a, b| a.total_cmp(b));
    json!({
        "runs": lat.len(), "errors": errors,
        "p50_ms": percentile(&lat, 0.5), "p90_ms": percentile(&lat, 0.9), "p99_ms": percentile(&lat, 0.99),
        "throughput_rps": lat.len() as f64 / secs,
    })
}

async fn sequential(
    client: &reqwest::Client,
    base: &str,
    language: &str,
    runs: usize,
    pace: Duration,
) -> Value {
    let body = body(language);
    let (mut lat, mut errors) = (Vec::new(), 0);
    let started = Instant::now();
    for _ in 0..runs {
        match one(client, base, &body).await {
            Ok(ms) => lat.push(ms),
            Err(_) => errors += 1,
        }
        if !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
    }
    summary(lat, errors, started.elapsed().as_secs_f64())
}

async fn load(
    client: &reqwest::Client,
    base: &str,
    language: &str,
    clients: usize,
    secs: u64,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, base, body) = (client.clone(), base.to_string(), body(language));
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0usize);
            while Instant::now() < deadline {
                match one(&client, &base, &body).await {
                    Ok(ms) => lat.push(ms),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.expect("client task");
        lat.extend(l);
        errors += e;
    }
    summary(lat, errors, secs as f64)
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let settings = if quick {
        Settings {
            sequential_runs: 50,
            pace: Duration::from_millis(100),
            load_secs: [(2, 3), (4, 5), (8, 3)],
            cold_runs: 10,
        }
    } else {
        Settings {
            sequential_runs: 200,
            pace: Duration::from_millis(100),
            load_secs: [(2, 10), (4, 20), (8, 10)],
            cold_runs: 30,
        }
    };
    let python = resolve_python();
    let cold_py = cold_start(&python, &["-c", "pass"], settings.cold_runs);
    let cold_node = cold_start("node", &["-e", "0"], settings.cold_runs);

    let server = start_server();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(16)
        .build()
        .unwrap();
    let ready = Instant::now();
    while client
        .get(format!("{}/health", server.base))
        .send()
        .await
        .is_err()
    {
        assert!(
            ready.elapsed() < Duration::from_secs(30),
            "server did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // let the warm pool fill
    let pid = server.child.id();
    let idle_rss = rss_kb(pid, "VmRSS:");
    let (pool_procs, pool_rss) = descendants_rss_kb(pid);

    let mut results = serde_json::Map::new();
    for (language, cold) in [("python3", cold_py), ("nodejs", cold_node)] {
        let paced = sequential(
            &client,
            &server.base,
            language,
            settings.sequential_runs,
            settings.pace,
        )
        .await;
        let back_to_back = sequential(
            &client,
            &server.base,
            language,
            settings.sequential_runs,
            Duration::ZERO,
        )
        .await;
        let mut loads = Vec::new();
        for (clients, secs) in settings.load_secs {
            let mut l = load(&client, &server.base, language, clients, secs).await;
            l["clients"] = json!(clients);
            l["seconds"] = json!(secs);
            loads.push(l);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        results.insert(
            language.to_string(),
            json!({"cold_start_ms": cold, "sequential": paced, "back_to_back": back_to_back, "load": loads,
                   "p50_over_cold": paced["p50_ms"].as_f64().unwrap_or(f64::NAN) / cold}),
        );
    }
    let peak_rss = rss_kb(pid, "VmHWM:");
    let report = json!({
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                     "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()},
        "server_idle_rss_kb": idle_rss, "server_peak_rss_kb": peak_rss,
        "pool_processes": pool_procs, "pool_rss_kb": pool_rss,
        "languages": results,
    });

    println!(
        "\nsandbox serve on loopback ({} CPUs, kernel {})",
        report["machine"]["cpus"], report["machine"]["kernel"]
    );
    println!(
        "server RSS idle {:.1} MB, peak {:.1} MB; warm pool: {} processes, {:.1} MB\n",
        idle_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0,
        pool_procs,
        pool_rss as f64 / 1024.0
    );
    println!(
        "{:<8} {:<26} {:>7} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "lang", "mode", "runs", "p50 ms", "p90 ms", "p99 ms", "req/s", "errors"
    );
    for (language, r) in &results {
        let row = |mode: &str, v: &Value| {
            println!(
                "{:<8} {:<26} {:>7} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>7}",
                language,
                mode,
                v["runs"],
                v["p50_ms"].as_f64().unwrap_or(0.0),
                v["p90_ms"].as_f64().unwrap_or(0.0),
                v["p99_ms"].as_f64().unwrap_or(0.0),
                v["throughput_rps"].as_f64().unwrap_or(0.0),
                v["errors"]
            )
        };
        row(
            "cold start (bare)",
            &json!({"runs": settings.cold_runs, "p50_ms": r["cold_start_ms"], "p90_ms": 0, "p99_ms": 0, "throughput_rps": 0, "errors": 0}),
        );
        row(
            &format!("sequential, {} ms apart", settings.pace.as_millis()),
            &r["sequential"],
        );
        row("sequential, back to back", &r["back_to_back"]);
        for l in r["load"].as_array().unwrap() {
            row(&format!("{} clients, {} s", l["clients"], l["seconds"]), l);
        }
    }
    println!();
    for (language, target) in [("python3", 0.5), ("nodejs", 0.3)] {
        let ratio = results[language]["p50_over_cold"]
            .as_f64()
            .unwrap_or(f64::NAN);
        println!(
            "{language}: p50 / bare cold start = {ratio:.2} (target <= {target}) {}",
            if ratio <= target { "MET" } else { "NOT MET" }
        );
    }
    for language in ["python3", "nodejs"] {
        let c4 = &results[language]["load"][1];
        let (p50, p99) = (
            c4["p50_ms"].as_f64().unwrap_or(f64::NAN),
            c4["p99_ms"].as_f64().unwrap_or(f64::NAN),
        );
        let ok = c4["errors"] == 0 && p99 < 5.0 * p50;
        println!(
            "{language}: 4 clients: {} errors, p99 {p99:.1} ms = {:.1} x p50 (target: 0 errors, < 5 x) {}",
            c4["errors"],
            p99 / p50,
            if ok { "MET" } else { "NOT MET" }
        );
    }
    println!(
        "server idle RSS {:.1} MB (target < 30 MB) {}",
        idle_rss as f64 / 1024.0,
        if idle_rss < 30 * 1024 {
            "MET"
        } else {
            "NOT MET"
        }
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-http.json");
    let _ = std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap());
    println!("JSON: {}", path.display());
}
