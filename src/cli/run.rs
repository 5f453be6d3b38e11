//! `sandbox run`: one snippet, locally in the same sandbox `serve` uses, or on a remote
//! `sandbox serve` with `--server`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::engine::{LimitHit, RunOutcome, RunRequest, Sink, Stream};
use crate::runtime::Language;

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
/// How long to wait for a remote server's answer (it may queue the run first).
const REMOTE_TIMEOUT: Duration = Duration::from_secs(600);

fn read_code(args: &RunArgs) -> anyhow::Result<(Language, String)> {
    let from_ext = args.file.as_deref().and_then(Language::from_extension);
    let language = match &args.language {
        Some(name) => Language::parse(name)
            .with_context(|| format!("unsupported language {name:?}: use python3 or nodejs"))?,
        None => from_ext.with_context(|| match &args.file {
            Some(f) if f.as_os_str() != "-" => format!(
                "cannot tell the language of {}: name it .py or .js, or pass --language python3 or --language nodejs",
                f.display()
            ),
            _ => "cannot tell the language: pass --language python3 or --language nodejs".into(),
        })?,
    };
    let code = match (&args.eval, &args.file) {
        (Some(code), None) => code.clone(),
        (Some(_), Some(_)) => bail!("give either a file or --eval, not both"),
        (None, None) => bail!("nothing to run: give a file, `-` for stdin, or --eval CODE"),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .take(MAX_CODE_BYTES + 1)
                .read_to_end(&mut bytes)
                .context("cannot read the snippet from stdin")?;
            String::from_utf8(bytes)
                .map_err(|_| anyhow::anyhow!("the snippet on stdin is not UTF-8 text"))?
        }
        (None, Some(path)) => {
            let meta = std::fs::metadata(path).with_context(|| {
                format!(
                    "cannot read {}: check the path and its permissions",
                    path.display()
                )
            })?;
            if meta.is_dir() {
                bail!("{} is a directory, not a snippet file", path.display());
            }
            if meta.len() > MAX_CODE_BYTES {
                bail!(
                    "{} is {} bytes; snippets are limited to {MAX_CODE_BYTES} bytes",
                    path.display(),
                    meta.len()
                );
            }
            let bytes = std::fs::read(path).with_context(|| {
                format!("cannot read {}: check its permissions", path.display())
            })?;
            String::from_utf8(bytes).map_err(|_| {
                anyhow::anyhow!("{} is not UTF-8 text; save it as UTF-8", path.display())
            })?
        }
    };
    if code.len() as u64 > MAX_CODE_BYTES {
        bail!(
            "the snippet is more than {MAX_CODE_BYTES} bytes; snippets are limited to {MAX_CODE_BYTES} bytes"
        );
    }
    Ok((language, code))
}

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

fn usage(msg: String) -> anyhow::Error {
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
    if args.network && !config.enable_network {
        return Err(usage(
            "--network is refused: enable_network is false in the configuration (ENABLE_NETWORK)"
                .into(),
        ));
    }
    config.max_workers = 1;
    let engine = super::build_engine(config, args.network)?;
    if let Err(e) = &engine.net_guard {
        eprintln!(
            "sandbox: warning: no network guard ({e}): the run can reach the host's loopback services and cloud metadata addresses"
        );
    }
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
    let outcome = rt.block_on(engine.execute(RunRequest {
        language,
        code,
        preload: String::new(),
        network: args.network,
        sink,
    }))?;
    Ok(Outcome::from(outcome).finish(args.json, true))
}

/// A run's result, local or remote, and how `run` reports it.
struct Outcome {
    stdout: String,
    stderr: String,
    error: String,
    exit_code: i32,
    duration: Duration,
    limit: Option<LimitHit>,
}

impl From<RunOutcome> for Outcome {
    fn from(o: RunOutcome) -> Self {
        Self {
            stdout: o.stdout,
            stderr: o.stderr,
            error: o.error,
            exit_code: o.exit_code,
            duration: o.duration,
            limit: o.limit,
        }
    }
}

impl Outcome {
    /// Print the result (JSON, or the streams unless they were already streamed, plus the
    /// sandbox's note) and pick the exit code.
    fn finish(self, as_json: bool, streamed: bool) -> ExitCode {
        if as_json {
            let out = json!({
                "stdout": self.stdout,
                "stderr": self.stderr,
                "error": self.error,
                "exit_code": self.exit_code,
                "duration_ms": self.duration.as_secs_f64() * 1000.0,
                "limit": self.limit,
            });
            let _ = writeln!(std::io::stdout(), "{out}");
        } else {
            if !streamed {
                let _ = std::io::stdout().write_all(self.stdout.as_bytes());
                let _ = std::io::stdout().flush();
                let _ = std::io::stderr().write_all(self.stderr.as_bytes());
            }
            if let Some(limit) = self.limit {
                // The streams were shown; add only what the sandbox itself says.
                let msg = if limit == LimitHit::Timeout {
                    self.error.lines().next()
                } else {
                    self.error.lines().last()
                };
                eprintln!("sandbox: {}", msg.unwrap_or(limit.as_str()));
            } else if let Some(note) = self
                .error
                .lines()
                .last()
                .filter(|l| l.starts_with("sandbox: operation not permitted"))
            {
                // The sandbox's explanation of an EPERM, after the snippet's own stderr.
                eprintln!("{note}");
            }
        }
        match self.limit {
            Some(LimitHit::Timeout) => ExitCode::from(EXIT_TIMEOUT),
            _ => ExitCode::from(u8::try_from(self.exit_code).unwrap_or(1)),
        }
    }
}

/// The API answers without the limit: it is in `error`, as its first line (timeout) or
/// the sandbox's note on its last line.
fn infer_limit(exit_code: i32, error: &str) -> Option<LimitHit> {
    if exit_code == -1 || error.starts_with("timeout") {
        return Some(LimitHit::Timeout);
    }
    let last = error.lines().last().unwrap_or("");
    [
        ("memory limit exceeded", LimitHit::Memory),
        ("output limit exceeded", LimitHit::Output),
        ("process limit reached", LimitHit::Processes),
    ]
    .into_iter()
    .find(|(prefix, _)| last.starts_with(prefix))
    .map(|(_, limit)| limit)
}

/// Errors talking to a remote server; all mean the sandbox could not run the snippet.
#[derive(Debug, thiserror::Error)]
enum RemoteError {
    #[error(
        "cannot reach the sandbox server at {url}: {reason}. Check --server and that `sandbox serve` runs there"
    )]
    Unreachable { url: String, reason: String },
    #[error(
        "the sandbox server at {url} refused the API key (HTTP 401): pass --key or set API_KEY to its app.key"
    )]
    Unauthorized { url: String },
    #[error("the sandbox server at {url} is busy (HTTP 503, max_requests reached): retry later")]
    Busy { url: String },
    #[error("the sandbox server at {url} could not run the snippet: {message}")]
    Failed { url: String, message: String },
    #[error("{url} did not answer like a sandbox server (HTTP {status}: {body}). Check --server")]
    NotASandbox {
        url: String,
        status: u16,
        body: String,
    },
}

fn server_base(server: &str) -> anyhow::Result<String> {
    let server = server.trim().trim_end_matches('/');
    if server.is_empty() {
        return Err(usage(
            "--server needs a URL such as http://host:8194".into(),
        ));
    }
    if server.starts_with("https://") {
        return Err(usage(format!(
            "--server {server}: https is not supported by this client; reach the server over http (a private network or an SSH tunnel)"
        )));
    }
    if server.starts_with("http://") {
        Ok(server.to_string())
    } else if server.contains("://") {
        Err(usage(format!(
            "--server {server}: only http:// URLs are supported"
        )))
    } else {
        Ok(format!("http://{server}"))
    }
}

fn run_remote(
    server: &str,
    key: &str,
    language: Language,
    code: String,
    network: bool,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let base = server_base(server)?;
    let url = format!("{base}/v1/sandbox/run");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(REMOTE_TIMEOUT)
        .build()
        .context("cannot set up the HTTP client")?;
    let started = Instant::now();
    let body = json!({
        "language": language.as_str(),
        "code": code,
        "preload": "",
        "enable_network": network,
    });
    let (status, text) = rt
        .block_on(async {
            let r = client
                .post(&url)
                .header("X-Api-Key", key)
                .json(&body)
                .send()
                .await?;
            let status = r.status().as_u16();
            Ok::<_, reqwest::Error>((status, r.text().await?))
        })
        .map_err(|e| RemoteError::Unreachable {
            url: base.clone(),
            reason: error_chain(&e),
        })?;
    let duration = started.elapsed();
    match status {
        401 => return Err(RemoteError::Unauthorized { url: base }.into()),
        503 => return Err(RemoteError::Busy { url: base }.into()),
        413 => {
            return Err(usage(format!(
                "the sandbox server at {base} refused the snippet as too large (HTTP 413)"
            )));
        }
        _ => {}
    }
    let not_a_sandbox = || RemoteError::NotASandbox {
        url: base.clone(),
        status,
        body: text.chars().take(200).collect(),
    };
    let envelope: Value = serde_json::from_str(&text).map_err(|_| not_a_sandbox())?;
    let message = envelope["message"].as_str().unwrap_or("").to_string();
    match envelope["code"].as_i64() {
        Some(0) => {}
        // The server judged the request itself wrong: unsupported language, network off.
        Some(-400) => {
            return Err(usage(format!(
                "the sandbox server at {base} refused the request: {message}"
            )));
        }
        Some(_) => return Err(RemoteError::Failed { url: base, message }.into()),
        None => return Err(not_a_sandbox().into()),
    }
    let data = &envelope["data"];
    let field = |name: &str| data[name].as_str().unwrap_or("").to_string();
    let exit_code = data["exit_code"]
        .as_i64()
        .and_then(|c| i32::try_from(c).ok())
        .ok_or_else(not_a_sandbox)?;
    let error = field("error");
    let result = Outcome {
        stdout: field("stdout"),
        stderr: field("stderr"),
        limit: infer_limit(exit_code, &error),
        error,
        exit_code,
        duration,
    };
    Ok(result.finish(as_json, false))
}

/// reqwest's top-level message is generic ("error sending request"); the cause is below.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

/// An error in what the user typed (exit code 2), as opposed to the sandbox failing.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_inferred_from_the_api_answer() {
        assert_eq!(infer_limit(-1, ""), Some(LimitHit::Timeout));
        assert_eq!(
            infer_limit(137, "timeout: the run took longer than 1s"),
            Some(LimitHit::Timeout)
        );
        assert_eq!(
            infer_limit(
                137,
                "process exited with code 137\nmemory limit exceeded: the run used more than 64 MB"
            ),
            Some(LimitHit::Memory)
        );
        assert_eq!(
            infer_limit(
                137,
                "process exited with code 137\noutput limit exceeded: x"
            ),
            Some(LimitHit::Output)
        );
        assert_eq!(
            infer_limit(
                1,
                "process exited with code 1\nprocess limit reached: at most 4"
            ),
            Some(LimitHit::Processes)
        );
        assert_eq!(infer_limit(3, "process exited with code 3\n"), None);
        assert_eq!(infer_limit(0, ""), None);
    }

    #[test]
    fn server_urls_are_normalised() {
        assert_eq!(
            server_base("http://h:8194/").unwrap(),
            "http://h:8194".to_string()
        );
        assert_eq!(server_base("h:8194").unwrap(), "http://h:8194".to_string());
        assert!(server_base("https://h").is_err());
        assert!(server_base("ftp://h").is_err());
        assert!(server_base(" ").is_err());
    }
}
