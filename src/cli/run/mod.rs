//! `sandbox run`: one snippet, locally in the same sandbox `serve` uses, or on a remote
//! `sandbox serve` with `--server`.

mod input;
mod remote;
mod report;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::engine::network::RunNetwork;
use crate::engine::{Engine, RunError, RunRequest, Sink, Stream};
use input::read_code;
use remote::run_remote;
use report::Outcome;

/// Exit code when the sandbox itself cannot start (the reason goes to stderr).
pub const EXIT_SANDBOX_FAILED: u8 = 125;
/// Exit code when the run hit its timeout, like timeout(1).
pub const EXIT_TIMEOUT: u8 = 124;

const EXIT_CODES: &str = "\
Exit codes:
  N    the snippet's own exit code; 128+S when signal S killed it (137: a memory or
       output limit stopped it with SIGKILL; --json names the limit)
  124  the run hit its timeout (like timeout(1))
  125  the sandbox could not start (neither root nor user namespaces, no seccomp, state
       directory not writable, server unreachable or key refused); the reason is on stderr
  2    bad input: unknown language, missing, unreadable or non-UTF-8 file, a snippet over
       16 MiB, an invalid option, a configuration error, an interpreter that does not run

Examples:
  sandbox run script.py
  echo 'print(1)' | sandbox run -l python3 -
  sandbox run -l nodejs -e 'console.log(1)'
  sandbox run --json --timeout 2 --memory 128 job.py
  API_KEY=secret sandbox run --server http://sandbox:8194 app.js";

#[derive(Debug, Args)]
#[command(after_help = EXIT_CODES)]
pub struct RunArgs {
    /// The snippet's file, or `-` for stdin. Not needed with --eval.
    pub file: Option<PathBuf>,
    /// Language: python3 or nodejs (default: from the file's extension: .py, .js, .mjs, .cjs).
    #[arg(long, short)]
    pub language: Option<String>,
    /// Run this code instead of a file.
    #[arg(long, short = 'e', value_name = "CODE")]
    pub eval: Option<String>,
    /// Seconds before the run is killed; fractions allowed (default: worker_timeout).
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    pub timeout: Option<f64>,
    /// Memory limit in MB for the whole run (default: memory_limit_mb).
    #[arg(long, value_name = "MB", allow_negative_numbers = true)]
    pub memory: Option<i64>,
    /// Processes and threads the run may have (default: max_processes).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub max_processes: Option<i64>,
    /// Bytes kept per output stream before the run is stopped (default: max_output_bytes).
    #[arg(long, value_name = "BYTES", allow_negative_numbers = true)]
    pub max_output: Option<i64>,
    /// Size in MB of the run's private /tmp (default: tmp_size_mb).
    #[arg(long, value_name = "MB", allow_negative_numbers = true)]
    pub tmp_size: Option<i64>,
    /// Let the snippet use the network (refused when enable_network is false).
    #[arg(long)]
    pub network: bool,
    /// Print the result as one JSON object: stdout, stderr, error, exit_code, duration_ms,
    /// limit (timeout, memory, output, processes or null).
    #[arg(long)]
    pub json: bool,
    /// Configuration file (default: conf/config.yaml if present, else built-in defaults).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Run on a remote `sandbox serve` at this URL (http://host:8194) instead of locally;
    /// its own limits apply. Needs no root.
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// API key for --server (default: dify-sandbox).
    #[arg(long, env = "API_KEY", hide_env_values = true, value_name = "KEY")]
    pub key: Option<String>,
}

/// The largest snippet accepted, like a server's request limit.
const MAX_CODE_BYTES: u64 = crate::api::MAX_BODY_BYTES as u64;
/// Bounds that keep later arithmetic (ms, bytes) far from overflowing.
const MAX_TIMEOUT_SECS: f64 = 86_400.0;
const MAX_MEMORY_MB: i64 = 1 << 20;

pub fn execute(args: RunArgs) -> ExitCode {
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("sandbox: {e:#}");
            let code = super::exit_code_for(&e);
            ExitCode::from(if code == super::EXIT_USAGE {
                code
            } else {
                EXIT_SANDBOX_FAILED
            })
        }
    }
}

pub(super) fn usage(msg: String) -> anyhow::Error {
    UsageError(msg).into()
}

/// A whole number option within [min, max].
fn bounded(name: &str, value: Option<i64>, min: i64, max: i64) -> anyhow::Result<Option<u64>> {
    match value {
        None => Ok(None),
        Some(v) if (min..=max).contains(&v) => Ok(u64::try_from(v).ok()),
        Some(v) => Err(usage(format!(
            "{name} must be between {min} and {max}, got {v}"
        ))),
    }
}

fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let (language, code) = read_code(args).map_err(|e| usage(format!("{e:#}")))?;
    let timeout = match args.timeout {
        None => None,
        Some(t) if t > 0.0 && t <= MAX_TIMEOUT_SECS => Some(Duration::from_secs_f64(t)),
        Some(t) => {
            return Err(usage(format!(
                "--timeout must be a positive number of seconds (at most {MAX_TIMEOUT_SECS}), got {t}"
            )));
        }
    };
    let memory = bounded("--memory", args.memory, 16, MAX_MEMORY_MB)?;
    let processes = bounded("--max-processes", args.max_processes, 1, 1 << 16)?;
    let output = bounded("--max-output", args.max_output, 1, 1 << 40)?;
    let tmp = bounded("--tmp-size", args.tmp_size, 1, MAX_MEMORY_MB)?;
    if let Some(server) = &args.server {
        let local_only = [
            ("--timeout", timeout.is_some()),
            ("--memory", memory.is_some()),
            ("--max-processes", processes.is_some()),
            ("--max-output", output.is_some()),
            ("--tmp-size", tmp.is_some()),
            ("--config", args.config.is_some()),
        ];
        if let Some((name, _)) = local_only.iter().find(|(_, given)| *given) {
            return Err(usage(format!(
                "{name} applies to local runs only: with --server the server's own configuration applies"
            )));
        }
        let key = args.key.as_deref().unwrap_or("dify-sandbox");
        return run_remote(server, key, language, code, args.network, args.json);
    }

    let mut config = super::load_config(args.config.as_deref())?;
    if let Some(t) = timeout {
        config.worker_timeout = t;
    }
    if let Some(m) = memory {
        config.memory_limit_mb = m;
    }
    if let Some(p) = processes {
        config.max_processes = p;
    }
    if let Some(o) = output {
        config.max_output_bytes = usize::try_from(o).unwrap_or(usize::MAX);
    }
    if let Some(t) = tmp {
        config.tmp_size_mb = t;
    }
    // Without --network nothing of the network needs preparing.
    config.enable_network &= args.network;
    config.max_workers = 1;
    // One run: a fork server would cost more to start than it saves.
    config.python_fork_server = false;
    let sink: Option<Sink> = (!args.json).then(|| {
        Arc::new(|stream: Stream, bytes: &[u8]| {
            // A closed terminal or pipe must not stop the run; its result still counts.
            let _ = match stream {
                Stream::Stdout => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(bytes).and_then(|_| out.flush())
                }
                Stream::Stderr => std::io::stderr().lock().write_all(bytes),
            };
        }) as Sink
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let engine = rt.block_on(Engine::build(config))?;
    if let (true, RunNetwork::Host { guard: None, .. }) = (args.network, &engine.network) {
        eprintln!(
            "sandbox: warning: the run shares this host's network unguarded ({})",
            engine.network.describe()
        );
    }
    let outcome = rt
        .block_on(engine.execute(RunRequest {
            language,
            code,
            preload: String::new(),
            network: args.network,
            sink,
        }))
        .map_err(|e| match e {
            RunError::NetworkDisabled => usage(
                "--network is refused: enable_network is false in the configuration (ENABLE_NETWORK)"
                    .into(),
            ),
            other => other.into(),
        })?;
    Ok(Outcome::from(outcome).finish(args.json, true))
}

/// An error in what the user typed (exit code 2), as opposed to the sandbox failing.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);
