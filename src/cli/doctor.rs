//! `sandbox doctor`: check this host, one line per check.

#[cfg(target_os = "linux")]
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
#[cfg(target_os = "linux")]
use std::process::ExitCode;

use clap::Args;

#[cfg(target_os = "linux")]
use crate::doctor;

#[derive(Debug, Args)]
#[command(after_help = "\
Each check prints ok, warning or failed, with a one-line fix for this distribution.
Warnings (building tools, Docker for the xtask, optional Python modules) do not fail.

Exit codes:
  0  every required check passed
  1  at least one required check failed")]
pub struct DoctorArgs {
    /// Configuration file to check (default: conf/config.yaml if present, else built-in defaults).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
}

#[cfg(target_os = "linux")]
pub fn execute(args: DoctorArgs) -> ExitCode {
    let report = doctor::run_checks(args.config.as_deref());
    let text = if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => s + "\n",
            Err(e) => {
                eprintln!("sandbox: cannot encode the report as JSON: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        let stdout = std::io::stdout();
        let colour = stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none();
        doctor::render(&report, colour)
    };
    // A closed pipe (doctor | head) must not turn into a panic.
    let _ = std::io::stdout().write_all(text.as_bytes());
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
