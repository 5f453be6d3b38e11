//! Tools needed only to build the sandbox: pkg-config with libseccomp's files, and gcc.

use std::process::Command;

use super::packages::{Need, PackageManager};
use super::{Check, Status, check, ok};

/// Why a build tool gave no answer.
#[derive(Debug, thiserror::Error)]
enum ToolError {
    /// It could not be started: not installed, most likely.
    #[error(transparent)]
    NotRun(#[from] std::io::Error),
    /// It ran and failed; what it said on stderr.
    #[error("{0}")]
    Failed(String),
}

/// Run `program args` and return its trimmed stdout when it succeeds.
fn output_of(program: &str, args: &[&str]) -> Result<String, ToolError> {
    let o = Command::new(program).args(args).output()?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    } else {
        Err(ToolError::Failed(
            String::from_utf8_lossy(&o.stderr).trim().to_string(),
        ))
    }
}

pub(super) fn build_checks(pm: PackageManager) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(
        match output_of("pkg-config", &["--modversion", "libseccomp"]) {
            Ok(v) => ok("pkg-config libseccomp", format!("{v} (for building)")),
            Err(e) => {
                let detail = match e {
                    ToolError::NotRun(_) => {
                        "pkg-config is not installed (needed for building only)".to_string()
                    }
                    ToolError::Failed(_) => {
                        format!("libseccomp.pc not found (needed for building only): {e}")
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_and_a_failing_one_are_told_apart() {
        assert_eq!(output_of("sh", &["-c", "echo ' 1.2 '"]).unwrap(), "1.2");
        assert!(matches!(
            output_of("/nonexistent/pkg-config", &["--version"]),
            Err(ToolError::NotRun(_))
        ));
        match output_of("sh", &["-c", "echo 'no libseccomp.pc' >&2; exit 1"]) {
            Err(ToolError::Failed(said)) => assert_eq!(said, "no libseccomp.pc"),
            other => panic!("{other:?}"),
        }
    }
}
