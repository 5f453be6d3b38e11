//! `sandbox run`: one snippet, locally, in the same sandbox `serve` uses.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;

use crate::engine::{LimitHit, RunRequest, Sink, Stream};
use crate::runner::Language;

/// Exit code when the sandbox itself cannot start (the reason goes to stderr).
pub const EXIT_SANDBOX_FAILED: u8 = 125;
/// Exit code when the run hit its timeout, like timeout(1).
pub const EXIT_TIMEOUT: u8 = 124;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The snippet's file, or `-` for stdin. Not needed with --eval.
    pub file: Option<PathBuf>,
    /// Language: python3 or nodejs (default: from the file's extension).
    #[arg(long, short)]
    pub language: Option<String>,
    /// Run this code instead of a file.
    #[arg(long, short = 'e', value_name = "CODE")]
    pub eval: Option<String>,
    /// Seconds before the run is killed (default: worker_timeout).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// Memory limit in MB (default: memory_limit_mb).
    #[arg(long, value_name = "MB")]
    pub memory: Option<u64>,
    /// Let the snippet use the network.
    #[arg(long)]
    pub network: bool,
    /// Print the result as JSON (stdout, stderr, error, exit_code, duration_ms, limit).
    #[arg(long)]
    pub json: bool,
    /// Configuration file (default: conf/config.yaml if present, else built-in defaults).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

/// The largest snippet accepted, like a server's request limit.
const MAX_CODE_BYTES: u64 = 16 << 20;

fn read_code(args: &RunArgs) -> anyhow::Result<(Language, String)> {
    let from_ext = args.file.as_deref().and_then(Language::from_extension);
    let language = match &args.language {
        Some(name) => Language::parse(name)
            .with_context(|| format!("unsupported language {name:?}: use python3 or nodejs"))?,
        None => from_ext
            .context("cannot tell the language: pass --language python3 or --language nodejs")?,
    };
    let code = match (&args.eval, &args.file) {
        (Some(code), None) => code.clone(),
        (Some(_), Some(_)) => bail!("give either a file or --eval, not both"),
        (None, None) => bail!("nothing to run: give a file, `-` for stdin, or --eval CODE"),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::stdin()
                .take(MAX_CODE_BYTES + 1)
                .read_to_string(&mut s)
                .context("cannot read the snippet from stdin (it must be UTF-8 text)")?;
            s
        }
        (None, Some(path)) => {
            let meta = std::fs::metadata(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if meta.len() > MAX_CODE_BYTES {
                bail!(
                    "{} is {} bytes; snippets are limited to {MAX_CODE_BYTES} bytes",
                    path.display(),
                    meta.len()
                );
            }
            std::fs::read_to_string(path).with_context(|| {
                format!(
                    "cannot read {} (it must be readable UTF-8 text)",
                    path.display()
                )
            })?
        }
    };
    if code.len() as u64 > MAX_CODE_BYTES {
        bail!(
            "the snippet is {} bytes; snippets are limited to {MAX_CODE_BYTES} bytes",
            code.len()
        );
    }
    Ok((language, code))
}

pub fn execute(args: RunArgs) -> ExitCode {
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
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

fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let (language, code) = read_code(args).map_err(|e| e.context(UsageError))?;
    let mut config = super::load_config(args.config.as_deref())?;
    if let Some(t) = args.timeout {
        if !(t > 0.0 && t.is_finite()) {
            return Err(
                anyhow::anyhow!("--timeout must be a positive number of seconds, got {t}")
                    .context(UsageError),
            );
        }
        config.worker_timeout = Duration::from_secs_f64(t);
    }
    if let Some(m) = args.memory {
        if m < 16 {
            return Err(
                anyhow::anyhow!("--memory must be at least 16 MB, got {m}").context(UsageError)
            );
        }
        config.memory_limit_mb = m;
    }
    config.max_workers = 1;
    let engine = super::build_engine(config)?;
    let sink: Option<Sink> = (!args.json).then(|| {
        Arc::new(|stream: Stream, bytes: &[u8]| {
            let _ = match stream {
                Stream::Stdout => std::io::stdout()
                    .lock()
                    .write_all(bytes)
                    .and_then(|_| std::io::stdout().flush()),
                Stream::Stderr => std::io::stderr().lock().write_all(bytes),
            };
        }) as Sink
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let limits = engine.default_limits();
    let outcome = rt.block_on(engine.execute(RunRequest {
        language,
        code,
        preload: String::new(),
        network: args.network,
        limits,
        sink,
    }))?;
    if args.json {
        let out = json!({
            "stdout": outcome.stdout,
            "stderr": outcome.stderr,
            "error": outcome.error,
            "exit_code": outcome.exit_code,
            "duration_ms": outcome.duration.as_secs_f64() * 1000.0,
            "limit": outcome.limit,
        });
        println!("{out}");
    } else if let Some(limit) = outcome.limit {
        // The streams were already shown; add only what the sandbox itself says.
        let last = outcome.error.lines().last().unwrap_or("");
        let msg = if limit == LimitHit::Timeout {
            outcome.error.lines().next().unwrap_or("")
        } else {
            last
        };
        eprintln!("sandbox: {msg}");
    }
    Ok(match outcome.limit {
        Some(LimitHit::Timeout) => ExitCode::from(EXIT_TIMEOUT),
        _ => ExitCode::from(u8::try_from(outcome.exit_code).unwrap_or(1)),
    })
}

/// Marks errors in what the user typed (exit code 2), as opposed to the sandbox failing.
#[derive(Debug, thiserror::Error)]
#[error("invalid input")]
pub struct UsageError;
