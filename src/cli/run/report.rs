//! How `sandbox run` reports a result, local or remote: the streams (unless they were
//! already streamed), the sandbox's notes, `--json`, and the exit code.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use super::EXIT_TIMEOUT;
#[cfg(target_os = "linux")]
use crate::engine::RunOutcome;
use crate::protocol::EPERM_NOTE;
use crate::protocol::LimitHit;

/// One file `--out` wrote: its path relative to DIR, and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutFile {
    pub path: String,
    pub bytes: u64,
}

/// The `--json` line: the API's run fields plus the duration, the limit and the files
/// `--out` wrote.
#[derive(Serialize)]
struct JsonResult<'a> {
    stdout: &'a str,
    stderr: &'a str,
    error: &'a str,
    exit_code: i32,
    duration_ms: f64,
    limit: Option<LimitHit>,
    files: &'a [OutFile],
}

/// A run's result, local or remote, and how `run` reports it.
pub(super) struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub error: String,
    pub exit_code: i32,
    pub duration: Duration,
    pub limit: Option<LimitHit>,
    /// What `--out` wrote.
    pub files: Vec<OutFile>,
    /// What `--out` refused to copy, each a sentence: the command then fails.
    pub refused: Vec<String>,
    /// The sandbox's own remarks (stdin cut at its limit), for stderr.
    pub notes: Vec<String>,
}

#[cfg(target_os = "linux")]
impl From<RunOutcome> for Outcome {
    fn from(o: RunOutcome) -> Self {
        Self {
            stdout: o.stdout,
            stderr: o.stderr,
            // A limit the snippet went on past is said too (the API leaves it out of
            // `error`, for Dify's sake).
            error: match o.caught {
                Some(note) if o.error.is_empty() => note,
                _ => o.error,
            },
            exit_code: o.exit_code,
            duration: o.duration,
            limit: o.limit,
            files: Vec::new(),
            refused: Vec::new(),
            notes: Vec::new(),
        }
    }
}

impl Outcome {
    /// Print the result (JSON, or the streams unless they were already streamed, plus the
    /// sandbox's note) and pick the exit code.
    pub fn finish(self, as_json: bool, streamed: bool) -> ExitCode {
        // A run whose output could not all be handed back did not do its job.
        let failed_out = self.exit_code == 0 && !self.refused.is_empty();
        if as_json {
            // `--json` tells the whole story: what `--out` refused is in `error`, and a
            // run that failed only there has the status the command exits with.
            let mut error = self.error.clone();
            for refused in &self.refused {
                if !error.is_empty() && !error.ends_with('\n') {
                    error.push('\n');
                }
                error.push_str(&format!("--out: {refused}"));
            }
            let out = JsonResult {
                stdout: &self.stdout,
                stderr: &self.stderr,
                error: &error,
                exit_code: if failed_out { 1 } else { self.exit_code },
                duration_ms: self.duration.as_secs_f64() * 1000.0,
                limit: self.limit,
                files: &self.files,
            };
            match serde_json::to_string(&out) {
                Ok(line) => {
                    let _ = writeln!(std::io::stdout(), "{line}");
                }
                Err(e) => eprintln!("sandbox: cannot encode the result as JSON: {e}"),
            }
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
            } else if let Some(note) = self.error.lines().last().filter(|l| *l == EPERM_NOTE) {
                // The sandbox's explanation of an EPERM, after the snippet's own stderr.
                eprintln!("{note}");
            }
        }
        for note in &self.notes {
            eprintln!("sandbox: {note}");
        }
        for refused in &self.refused {
            eprintln!("sandbox: --out: {refused}");
        }
        match self.limit {
            Some(LimitHit::Timeout) => ExitCode::from(EXIT_TIMEOUT),
            _ if failed_out => ExitCode::from(1),
            _ => ExitCode::from(u8::try_from(self.exit_code).unwrap_or(1)),
        }
    }
}

/// The note when stdin was longer than --max-input.
pub(super) fn stdin_cut_note(limit_mb: u64) -> String {
    format!(
        "stdin was cut after {limit_mb} MB (--max-input {limit_mb}): the snippet saw the end of its input there; raise --max-input to pass more"
    )
}
