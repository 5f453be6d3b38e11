//! `sandbox doctor`: check this host, one line per check.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::doctor;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Configuration file to check (default: conf/config.yaml if present, else built-in defaults).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn execute(args: DoctorArgs) -> ExitCode {
    let report = doctor::run_checks(args.config.as_deref());
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        doctor::print(&report);
    }
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
