//! One payload under one kind of load: sequential and paced, or N clients back to back.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::payloads::Payload;
use crate::common::procfs::TreeCpu;
use crate::common::{clip, percentile, server};

/// How one request went.
pub enum Got {
    /// The right answer, in this many milliseconds.
    Answer(f64),
    /// HTTP 503: more requests in flight than `max_requests`.
    Busy,
    /// A transport failure or a wrong answer.
    Bad(String),
}

pub async fn one(client: &reqwest::Client, base: &str, body: &Value, payload: &Payload) -> Got {
    let t = Instant::now();
    match server::run(client, base, body).await {
        Err(e) => Got::Bad(e),
        Ok((503, _)) => Got::Busy,
        Ok((200, envelope)) => match payload.check(&envelope) {
            Ok(()) => Got::Answer(t.elapsed().as_secs_f64() * 1000.0),
            Err(e) => Got::Bad(e),
        },
        Ok((status, envelope)) => Got::Bad(format!(
            "HTTP {status}: {}",
            clip(&envelope.to_string(), 300)
        )),
    }
}

#[derive(Default)]
pub struct Tally {
    latencies: Vec<f64>,
    errors: usize,
    busy: usize,
    first_error: Option<String>,
}

impl Tally {
    pub fn add(&mut self, got: Got) {
        match got {
            Got::Answer(ms) => self.latencies.push(ms),
            Got::Busy => self.busy += 1,
            Got::Bad(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        self.busy += other.busy;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// The JSON row: counts, latency quantiles, answers per second and, for load
    /// phases, the server tree's CPU per answer.
    fn summary(mut self, elapsed: Duration, cpu: Option<TreeCpu>) -> Value {
        self.latencies.sort_by(|a, b| a.total_cmp(b));
        let answers = self.latencies.len();
        let per_answer = |d: Duration| d.as_secs_f64() * 1000.0 / answers.max(1) as f64;
        json!({
            "answers": answers, "errors": self.errors, "busy_503": self.busy,
            "first_error": self.first_error,
            "p50_ms": percentile(&self.latencies, 0.5),
            "p90_ms": percentile(&self.latencies, 0.9),
            "p99_ms": percentile(&self.latencies, 0.99),
            "answers_per_s": answers as f64 / elapsed.as_secs_f64(),
            "cpu_ms_per_answer": cpu.map(|c| json!({
                "total": per_answer(c.total()), "server": per_answer(c.server),
                "runs": per_answer(c.runs),
            })),
        })
    }
}

/// `runs` requests one after the other, `pace` apart (the warm pool refills meanwhile).
pub async fn sequential(
    client: &reqwest::Client,
    base: &str,
    payload: &Payload,
    network: bool,
    runs: usize,
    pace: Duration,
) -> Value {
    let body = payload.body(network);
    let mut tally = Tally::default();
    let started = Instant::now();
    for _ in 0..runs {
        tally.add(one(client, base, &body, payload).await);
        tokio::time::sleep(pace).await;
    }
    tally.summary(started.elapsed(), None)
}

/// `clients` clients sending back to back for `secs`, with the CPU the server's process
/// tree used meanwhile.
pub async fn load(
    client: &reqwest::Client,
    base: &str,
    payload: &Payload,
    network: bool,
    clients: usize,
    secs: f64,
    server_pid: u32,
) -> Value {
    let cpu_before = TreeCpu::read(server_pid);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, base, payload) = (client.clone(), base.to_string(), payload.clone());
            let body = payload.body(network);
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while Instant::now() < deadline {
                    tally.add(one(&client, &base, &body, &payload).await);
                }
                tally
            })
        })
        .collect();
    let mut tally = Tally::default();
    for t in tasks {
        tally.merge(t.await.expect("a load client panicked"));
    }
    let elapsed = started.elapsed();
    let cpu = TreeCpu::read(server_pid).since(cpu_before);
    let mut row = tally.summary(elapsed, Some(cpu));
    row["clients"] = json!(clients);
    row
}
