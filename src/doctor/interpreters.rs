//! The Python and Node.js interpreters runs are executed with.

use crate::config::Config;
use crate::runtime::{nodejs, python};

use super::packages::{Need, PackageManager};
use super::{Check, Status, check, ok};

pub(super) fn interpreter_checks(config: &Config, pm: PackageManager) -> Vec<Check> {
    let mut checks = Vec::new();
    let sys = &config.system_lib_requirements;
    match python::discover(&config.python_path, sys) {
        Ok(rt) => {
            checks.push(ok(
                "python",
                format!(
                    "{} {} runs and imports json",
                    rt.program.display(),
                    rt.version
                ),
            ));
            for (m, present) in &rt.modules {
                checks.push(if *present {
                    ok(&format!("python module {m}"), "importable")
                } else {
                    check(
                        &format!("python module {m}"),
                        Status::Warning,
                        "not importable (snippets that use it will fail)",
                        Some(format!("{} -m pip install {m}", rt.program.display())),
                    )
                });
            }
        }
        // Python is the language Dify uses most: its absence always fails.
        Err(e) => checks.push(check(
            "python",
            Status::Failed,
            e.to_string(),
            Some(format!(
                "{}, or set python_path / PYTHON_PATH to a working python3",
                pm.install(Need::Python)
            )),
        )),
    }
    match nodejs::discover(&config.nodejs_path, sys) {
        Ok(rt) => checks.push(ok(
            "nodejs",
            format!("{} {} runs", rt.program.display(), rt.version),
        )),
        Err(e) => {
            // Left to the default, a missing Node only disables nodejs runs.
            let (status, detail) = if config.nodejs_path_explicit {
                (Status::Failed, e.to_string())
            } else {
                (Status::Warning, format!("{e}; nodejs runs are disabled"))
            };
            checks.push(check(
                "nodejs",
                status,
                detail,
                Some(format!(
                    "{}, or set nodejs_path / NODEJS_PATH to a working node",
                    pm.install(Need::Node)
                )),
            ));
        }
    }
    checks
}
