//! `sandbox run`: one snippet, locally in the same sandbox `serve` uses, or on a remote
//! `sandbox serve` with `--server`, invoked the way `python3` and `node` invoke a script:
//! stdin streamed in, the arguments after `--`, only the variables named; locally also
//! input files at /job and output files back from /tmp/out.
//!
//! - `input`: the code and its language; `invocation`: argv, environment, stdin.
//! - `stage`: the run's /job and /tmp/out on the host; `collect`: `--out`, the copy back;
//!   `beneath`: what both make and open, by descriptor, no link followed.
//! - `local`: the run through the engine; `remote` and `prelude`: through a server.
//! - `report`: streams, notes, `--json`, exit code.

#[cfg(target_os = "linux")]
mod collect;
mod input;
mod invocation;
#[cfg(target_os = "linux")]
mod local;
mod prelude;
mod remote;
mod report;

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use nix::sys::signal::Signal;

use crate::protocol::{Invocation, Language};
use input::read_code;
use invocation::{Script, StdinSource};
#[cfg(target_os = "linux")]
use local::run_local;
use remote::{RemoteRun, run_remote};

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
  sandbox run job.py --file rules.json --dir lib --out out --env MODE=ci -- --since 2024 < in.csv
  sandbox run app.js --env-file ci.env --stdin data.json -- report
  API_KEY=secret sandbox run --server http://sandbox:8194 app.js -- a b
  SANDBOX_SERVER=https://sandbox.example.com API_KEY=secret sandbox run job.py";

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
    /// How Node runs code from --eval or stdin, as node's own option: commonjs (the
    /// default) or module (an ES module: `import`, top-level `await`). A file is run as
    /// Node decides: .mjs a module, .cjs CommonJS, .js by the nearest package.json's "type".
    #[arg(long, value_name = "TYPE", value_parser = ["commonjs", "module"])]
    pub input_type: Option<String>,
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
    /// Arguments for the snippet, after `--`: its sys.argv[1:] / process.argv.slice(2).
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
    /// Give the snippet this file as its stdin (default: this command's stdin, streamed;
    /// nothing when the code itself comes from stdin).
    #[arg(long = "stdin", value_name = "FILE")]
    pub stdin_file: Option<PathBuf>,
    /// Set NAME=VALUE in the snippet's environment (repeatable); a bare NAME passes this
    /// command's own value. Nothing else of this environment reaches the snippet.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Variables from a file of NAME=VALUE lines (# comments), before --env (repeatable).
    #[arg(long, value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Copy a file into the run, read-only, at /job/DEST (default: beside the script,
    /// under its own name); repeatable. Local runs only.
    #[arg(long = "file", value_name = "PATH[:DEST]")]
    pub input_files: Vec<String>,
    /// Copy a directory into the run, read-only, at /job/DEST (default: beside the
    /// script, under its own name; `.`: /job itself); repeatable. Local runs only.
    #[arg(long = "dir", value_name = "DIR[:DEST]")]
    pub input_dirs: Vec<String>,
    /// Copy what the run leaves in /tmp/out (its $SANDBOX_OUT) into DIR once it ended:
    /// regular files only, at most tmp_size_mb. Local runs only.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// MB of input a run may be given: its --file and --dir copies together, and its
    /// stdin, which ends there (default: 64).
    #[arg(long, value_name = "MB", allow_negative_numbers = true)]
    pub max_input: Option<i64>,
    /// Print the result as one JSON object: stdout, stderr, error, exit_code, duration_ms,
    /// limit (timeout, memory, output, processes or null), files (what --out wrote: path
    /// and bytes).
    #[arg(long)]
    pub json: bool,
    /// Configuration file (default: conf/config.yaml if present, else built-in defaults).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Run on a remote `sandbox serve` at this URL (http://host:8194, or https:// behind
    /// a TLS proxy) instead of locally; its own limits apply. Needs no root.
    #[arg(long, env = "SANDBOX_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// With an https:// --server: trust the CA certificate(s) in this PEM file instead of
    /// the system's (a private CA).
    #[arg(long, env = "SANDBOX_CACERT", value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// API key for --server (default: dify-sandbox).
    #[arg(long, env = "API_KEY", hide_env_values = true, value_name = "KEY")]
    pub key: Option<String>,
}

/// The largest snippet accepted, like a server's request limit.
const MAX_CODE_BYTES: u64 = crate::protocol::MAX_BODY_BYTES as u64;
/// Bounds that keep later arithmetic (ms, bytes) far from overflowing.
const MAX_TIMEOUT_SECS: f64 = 86_400.0;
const MAX_MEMORY_MB: i64 = 1 << 20;
/// The default of --max-input, in MB.
const DEFAULT_MAX_INPUT_MB: u64 = 64;

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

pub(super) fn usage(msg: impl std::fmt::Display) -> anyhow::Error {
    UsageError(msg.to_string()).into()
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
    let max_input =
        bounded("--max-input", args.max_input, 1, MAX_MEMORY_MB)?.unwrap_or(DEFAULT_MAX_INPUT_MB);
    if args.input_type.is_some()
        && (language != Language::Nodejs || matches!(Script::of(args), Script::File(_)))
    {
        return Err(usage(
            "--input-type applies to Node.js code given with --eval or on stdin; a file's extension (.mjs, .cjs) or its package.json decides for a file",
        ));
    }
    // Everything the user typed is checked before anything runs.
    let how = invocation::invocation(args, language, true).map_err(usage)?;
    let stdin = StdinSource::of(args);
    let source = stdin.open().map_err(usage)?;
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
        let files = [
            ("--file", !args.input_files.is_empty()),
            ("--dir", !args.input_dirs.is_empty()),
            ("--out", args.out.is_some()),
        ];
        if let Some((name, _)) = files.iter().find(|(_, given)| *given) {
            return Err(usage(format!(
                "{name} applies to local runs only: Dify's protocol carries no files to or from a server; run locally, or pass data on stdin (--stdin) and read results from stdout"
            )));
        }
        let key = args.key.as_deref().unwrap_or("dify-sandbox");
        // The whole stdin is read before the request: a terminal would wait for input
        // nobody means to give, and a remote snippet cannot prompt anyone.
        let terminal = stdin == StdinSource::Caller && std::io::stdin().is_terminal();
        return run_remote(RemoteRun {
            server,
            key,
            cacert: args.cacert.as_deref(),
            language,
            code,
            how,
            script: match Script::of(args) {
                Script::File(name) => Some(name),
                Script::Eval | Script::Stdin => None,
            },
            stdin: if terminal { None } else { source },
            max_input_mb: max_input,
            network: args.network,
            as_json: args.json,
        });
    }
    if args.cacert.is_some() {
        return Err(usage(
            "--cacert applies to runs on a server (--server https://...)",
        ));
    }
    run_local(
        args,
        LocalRun {
            language,
            code,
            how,
            timeout,
            memory,
            processes,
            output,
            tmp,
            stdin: source,
            max_input_mb: max_input,
        },
    )
}

/// What `run` checked, for a local run.
#[cfg_attr(
    not(target_os = "linux"),
    expect(
        dead_code,
        reason = "off Linux a local run is refused before it is read"
    )
)]
pub(super) struct LocalRun {
    pub language: Language,
    pub code: String,
    pub how: Invocation,
    pub timeout: Option<Duration>,
    pub memory: Option<u64>,
    pub processes: Option<u64>,
    pub output: Option<u64>,
    pub tmp: Option<u64>,
    pub stdin: Option<Box<dyn Read + Send>>,
    pub max_input_mb: u64,
}

/// Where the jail cannot exist, a local run is refused; the CLI's default engine there
/// (`--engine docker`) never asks for one.
#[cfg(not(target_os = "linux"))]
fn run_local(_: &RunArgs, _: LocalRun) -> anyhow::Result<ExitCode> {
    anyhow::bail!(
        "a local run needs Linux (namespaces, seccomp): run it in a container of the local Docker engine (--engine docker) or on a server (--server URL)"
    )
}

/// SIGINT, SIGTERM and SIGHUP as they come (handlers installed when made).
pub(super) struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub(super) fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub(super) async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.int.recv() => Signal::SIGINT,
            _ = self.term.recv() => Signal::SIGTERM,
            _ = self.hup.recv() => Signal::SIGHUP,
        }
    }
}

/// An error in what the user typed (exit code 2), as opposed to the sandbox failing.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);
