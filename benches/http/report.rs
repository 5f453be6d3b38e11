//! The tables, the ratios to the targets and the JSON of one run.

use serde_json::{Value, json};

use crate::common::payloads::{Lang, Payload};
use crate::common::procfs::TreeCpu;
use crate::{CLIENTS, Cold, Measured, Memory};

/// How the phases ran, for the header and the row labels.
pub struct Setup {
    pub server_env: Vec<String>,
    pub pace_ms: u64,
    pub load_secs: f64,
}

pub struct Run {
    /// Bare cold starts measured in the same run: Python, then Node.
    pub cold: [Cold; 2],
    /// A bare `node` doing what a Node hello run does.
    pub node_same_work: Cold,
    pub memory: Memory,
    pub measured: Vec<Measured>,
    pub setup: Setup,
    /// CPU of the server's tree from the end of the warm-up to the end of the last phase.
    pub total_cpu: TreeCpu,
}

/// Sequential p50 / cold start of the same interpreter at most this, per payload: a
/// hello run does nothing, Dify's code node decodes and encodes JSON, its Jinja2 node
/// imports and renders a template.
fn latency_target(payload: &Payload) -> f64 {
    match (payload.lang, payload.key) {
        (Lang::Python, "py-hello") => 0.3,
        (Lang::Python, "jinja2") => 1.0,
        (Lang::Python, _) => 0.5,
        (Lang::Node, _) => 0.3,
    }
}

/// Hello answers/s at least this many times CPUs / cold start seconds, per language.
fn throughput_target(lang: Lang) -> f64 {
    match lang {
        Lang::Python => 3.0,
        Lang::Node => 1.0,
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn met(ok: bool) -> &'static str {
    if ok { "MET" } else { "NOT MET" }
}

fn net(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

/// CPU ms per answer of a load row: total, the server's own threads, the per-run processes.
fn cpu_parts(row: &Value) -> Option<(f64, f64, f64)> {
    let cpu = &row["cpu_ms_per_answer"];
    (!cpu.is_null()).then(|| (num(&cpu["total"]), num(&cpu["server"]), num(&cpu["runs"])))
}

/// The payload and network setting, padded, at the start of a line.
fn label(x: &Measured) -> String {
    format!("  {:<21} network {:<3}", x.payload.title, net(x.network))
}

impl Run {
    fn cold(&self, lang: Lang) -> &Cold {
        match lang {
            Lang::Python => &self.cold[0],
            Lang::Node => &self.cold[1],
        }
    }

    /// Sequential p50 over the cold start, its target, and whether it is met.
    fn latency_ratio(&self, m: &Measured) -> (f64, f64, bool) {
        let ratio = num(&m.sequential["p50_ms"]) / self.cold(m.payload.lang).wall_ms;
        let target = latency_target(&m.payload);
        (ratio, target, ratio <= target)
    }

    /// CPUs / cold start seconds: how many bare cold starts the machine does per second.
    fn cold_starts_per_s(&self, lang: Lang) -> f64 {
        cpus() as f64 / (self.cold(lang).wall_ms / 1000.0)
    }

    /// Answers/s over `cold_starts_per_s`, its target, and whether it is met.
    fn throughput_ratio(&self, lang: Lang, row: &Value) -> (f64, f64, bool) {
        let ratio = num(&row["answers_per_s"]) / self.cold_starts_per_s(lang);
        let target = throughput_target(lang);
        (ratio, target, ratio >= target && row["errors"] == 0)
    }
}

fn row(payload: &str, network: bool, mode: &str, v: &Value) {
    let cpu = match cpu_parts(v) {
        Some((total, server, runs)) => format!("{total:.1} ({server:.1} + {runs:.1})"),
        None => String::new(),
    };
    println!(
        "{payload:<21} {:<3} {mode:<17} {:>7} {:>7.1} {:>7.1} {:>9.1} {:>6} {:>5}  {cpu}",
        net(network),
        count(&v["answers"]),
        num(&v["p50_ms"]),
        num(&v["p99_ms"]),
        num(&v["answers_per_s"]),
        count(&v["errors"]),
        count(&v["busy_503"]),
    );
}

pub fn print(run: &Run) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "\nsandbox serve on loopback ({} CPUs, kernel {}), {}",
        cpus(),
        kernel.trim(),
        run.setup.server_env.join(" ")
    );
    for c in run.cold.iter().chain([&run.node_same_work]) {
        println!(
            "bare cold start `{}`: p50 {:.1} ms wall, {:.1} ms CPU",
            c.command, c.wall_ms, c.cpu_ms
        );
    }
    let m = &run.memory;
    println!(
        "memory: server RSS idle {:.1} MB, peak {:.1} MB; below it, idle after warm-up {} processes {:.1} MB, idle after the load {} processes {:.1} MB\n",
        mb(m.server_idle_kb),
        mb(m.server_peak_kb),
        m.below_after_warmup.0,
        mb(m.below_after_warmup.1),
        m.below_after_load.0,
        mb(m.below_after_load.1),
    );
    println!(
        "{:<21} {:<3} {:<17} {:>7} {:>7} {:>7} {:>9} {:>6} {:>5}  CPU ms/answer (server + runs)",
        "payload", "net", "mode", "answers", "p50 ms", "p99 ms", "answers/s", "errors", "503"
    );
    for x in &run.measured {
        let title = x.payload.title;
        row(
            title,
            x.network,
            &format!("paced {} ms", run.setup.pace_ms),
            &x.sequential,
        );
        for l in &x.loads {
            row(
                title,
                x.network,
                &format!("{} clients {}s", count(&l["clients"]), run.setup.load_secs),
                l,
            );
        }
    }

    println!("\nlatency: sequential p50 / bare cold start of the same interpreter");
    for x in &run.measured {
        let (ratio, target, ok) = run.latency_ratio(x);
        println!(
            "{} p50 {:>6.1} ms = {ratio:.2} x cold (target <= {target}) {}",
            label(x),
            num(&x.sequential["p50_ms"]),
            met(ok)
        );
    }
    println!("\nthroughput: hello answers/s / (CPUs / cold start s), no errors");
    for x in run
        .measured
        .iter()
        .filter(|x| x.payload.key.ends_with("hello"))
    {
        for l in &x.loads {
            let (ratio, target, ok) = run.throughput_ratio(x.payload.lang, l);
            let rate = target * run.cold_starts_per_s(x.payload.lang);
            println!(
                "{} {:>2} clients {:>6.1} answers/s = {ratio:.2} x (target >= {target} x = {rate:.0}/s) {}",
                label(x),
                count(&l["clients"]),
                num(&l["answers_per_s"]),
                met(ok)
            );
        }
    }
    println!("\nsteadiness with 4 clients: no errors, p99 under 5 x p50");
    for x in &run.measured {
        let Some(l) = x.loads.iter().find(|l| l["clients"] == 4) else {
            continue;
        };
        let (p50, p99) = (num(&l["p50_ms"]), num(&l["p99_ms"]));
        let ok = l["errors"] == 0 && p99 < 5.0 * p50;
        println!(
            "{} {} errors, p99 {p99:.1} ms = {:.1} x p50 {}",
            label(x),
            count(&l["errors"]),
            p99 / p50,
            met(ok)
        );
    }
    let idle = run.memory.server_idle_kb;
    println!(
        "\nserver idle RSS {:.1} MB (target < 30 MB) {}",
        mb(idle),
        met(idle < 30 * 1024)
    );
    let most = CLIENTS.iter().max().copied().unwrap_or(0);
    println!(
        "\nCPU per answer with {most} clients (server's own threads + per-run processes) / bare cold-start CPU"
    );
    for x in &run.measured {
        let Some(l) = x.loads.iter().find(|l| l["clients"] == most) else {
            continue;
        };
        let Some((total, server, runs)) = cpu_parts(l) else {
            continue;
        };
        let cold = run.cold(x.payload.lang).cpu_ms;
        let same_work = match x.payload.lang {
            Lang::Node => format!(
                ", {:.2} x bare node doing the same work {:.1} ms",
                total / run.node_same_work.cpu_ms,
                run.node_same_work.cpu_ms
            ),
            Lang::Python => String::new(),
        };
        println!(
            "{} {total:>5.1} ms (server {server:.1} + runs {runs:.1}) = {:.2} x cold {cold:.1} ms{same_work}",
            label(x),
            total / cold
        );
    }
    println!(
        "  whole run: server {:.1} s + runs {:.1} s of CPU",
        run.total_cpu.server.as_secs_f64(),
        run.total_cpu.runs.as_secs_f64()
    );
    let failures: Vec<_> = run
        .measured
        .iter()
        .flat_map(|x| {
            std::iter::once(&x.sequential)
                .chain(&x.loads)
                .map(move |v| (x, v))
        })
        .filter_map(|(x, v)| Some((x, v["first_error"].as_str()?)))
        .collect();
    if !failures.is_empty() {
        println!("\nfirst error of each phase that had one:");
        for (x, e) in failures {
            println!("{}: {e}", label(x));
        }
    }
}

pub fn json(run: &Run) -> Value {
    let cold = |c: &Cold| json!({"command": c.command, "wall_ms": c.wall_ms, "cpu_ms": c.cpu_ms});
    let m = &run.memory;
    let payloads: Vec<Value> = run
        .measured
        .iter()
        .map(|x| {
            let (ratio, target, ok) = run.latency_ratio(x);
            let throughput: Vec<Value> = x
                .loads
                .iter()
                .map(|l| {
                    let (r, t, ok) = run.throughput_ratio(x.payload.lang, l);
                    json!({"clients": l["clients"], "ratio": r, "target": t, "met": ok})
                })
                .collect();
            json!({
                "key": x.payload.key, "title": x.payload.title, "language": x.payload.lang.wire(),
                "network": x.network, "sequential": x.sequential, "load": x.loads,
                "p50_over_cold": ratio, "p50_target": target, "p50_met": ok,
                "answers_per_s_over_cpus_per_cold_s": throughput,
            })
        })
        .collect();
    json!({
        "machine": {"cpus": cpus(),
                    "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()},
        "server_env": run.setup.server_env, "pace_ms": run.setup.pace_ms,
        "load_secs": run.setup.load_secs,
        "cold_start": {"python3": cold(&run.cold[0]), "nodejs": cold(&run.cold[1]),
                       "nodejs_same_work_as_hello": cold(&run.node_same_work)},
        "memory_kb": {"server_idle": m.server_idle_kb, "server_peak": m.server_peak_kb,
                      "below_after_warmup": {"processes": m.below_after_warmup.0, "rss": m.below_after_warmup.1},
                      "below_after_load": {"processes": m.below_after_load.0, "rss": m.below_after_load.1}},
        "cpu_s": {"server": run.total_cpu.server.as_secs_f64(), "runs": run.total_cpu.runs.as_secs_f64()},
        "payloads": payloads,
    })
}
