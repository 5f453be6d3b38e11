//! Tools needed only to build the sandbox: pkg-config with libseccomp's files, and gcc.

use std::process::Command;

use super::packages::{Need, PackageManager};
use super::{Check, Status, check, ok};

/// Run `program args` and return its trimmed stdout when it succeeds.
fn output_of(program: &str, args: &[&str]) -> Result<String, String> {
    match Command::new(program).args(args).output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(e.to_string()),
    }
}

pub(super) fn build_checks(pm: PackageManager) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(
        match output_of("pkg-config", &["--modversion", "libseccomp"]) {
            Ok(v) => ok("pkg-config libseccomp", format!("{v} (for building)")),
            Err(e) => {
                let detail = if output_of("pkg-config", &["--version"]).is_err() {
                    "pkg-config is not installed (needed for building only)".to_string()
                } else {
                    format!("libseccomp.pc not found (needed for building only): {e}")
                };
                check(
                    "pkg-config libseccomp",
                    Status::Warning,
                    detail,
                    Some(pm.install(Need::LibseccompDev)),
                )
            }
        },
    );
    checks.push(match output_of("gcc", &["--version"]) {
        Ok(v) => ok(
            "gcc",
            format!("{} (for building)", v.lines().next().unwrap_or("").trim()),
        ),
        Err(e) => check(
            "gcc",
            Status::Warning,
            format!("not usable (needed for building only): {e}"),
            Some(pm.install(Need::Gcc)),
        ),
    });
    checks
}
