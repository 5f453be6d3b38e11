//! Host checks behind `sandbox doctor`, each with a fix hint.

use std::path::Path;

use serde::Serialize;

use crate::config::Config;
use crate::isolation::detect;
use crate::runner::{nodejs, python};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warning,
    Failed,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    pub fix: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    pub isolation: Option<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Failed)
    }
}

fn check(name: &str, status: Status, detail: impl Into<String>, fix: Option<String>) -> Check {
    Check {
        name: name.into(),
        status,
        detail: detail.into(),
        fix,
    }
}

pub fn run_checks(config_path: Option<&Path>) -> Report {
    let mut checks = Vec::new();
    let config = match crate::cli::load_config(config_path) {
        Ok(c) => {
            checks.push(check("config", Status::Ok, "configuration parses", None));
            c
        }
        Err(e) => {
            checks.push(check(
                "config",
                Status::Failed,
                format!("{e:#}"),
                Some("fix the file or the environment variable it names".into()),
            ));
            return Report {
                checks,
                isolation: None,
            };
        }
    };
    let mount_dir = config.state_dir.join("rootfs");
    let state_ok = std::fs::create_dir_all(&mount_dir).is_ok();
    checks.push(check(
        "state directory",
        if state_ok { Status::Ok } else { Status::Failed },
        config.state_dir.display().to_string(),
        (!state_ok)
            .then(|| "set state_dir / SANDBOX_STATE_DIR to a writable directory".to_string()),
    ));
    let isolation = match detect::detect(&mount_dir, None) {
        Ok(host) => {
            checks.push(check("isolation", Status::Ok, host.level.describe(), None));
            match &host.cgroup {
                Some(cg) => checks.push(check("cgroups", Status::Ok, cg.describe(), None)),
                None => checks.push(check(
                    "cgroups",
                    Status::Warning,
                    "no writable cgroup: limits fall back to rlimits",
                    None,
                )),
            }
            Some(host.level.describe().to_string())
        }
        Err(e) => {
            checks.push(check("isolation", Status::Failed, e.to_string(), None));
            None
        }
    };
    match python::discover(&config.python_path, &config.system_lib_requirements) {
        Ok(rt) => {
            checks.push(check(
                "python",
                Status::Ok,
                format!("{} {}", rt.program.display(), rt.version),
                None,
            ));
            for (m, present) in &rt.modules {
                if !present {
                    checks.push(check(
                        &format!("python module {m}"),
                        Status::Warning,
                        "not importable",
                        Some(format!("{} -m pip install {m}", rt.program.display())),
                    ));
                }
            }
        }
        Err(e) => checks.push(check("python", Status::Failed, e.to_string(), None)),
    }
    match nodejs::discover(&config.nodejs_path, &config.system_lib_requirements) {
        Ok(rt) => checks.push(check(
            "nodejs",
            Status::Ok,
            format!("{} {}", rt.program.display(), rt.version),
            None,
        )),
        Err(e) => {
            let status = if config.nodejs_path_explicit {
                Status::Failed
            } else {
                Status::Warning
            };
            checks.push(check("nodejs", status, e.to_string(), None));
        }
    }
    let _ = Config::process_env;
    Report { checks, isolation }
}

pub fn print(report: &Report) {
    for c in &report.checks {
        let tag = match c.status {
            Status::Ok => "ok     ",
            Status::Warning => "warning",
            Status::Failed => "FAILED ",
        };
        println!("[{tag}] {}: {}", c.name, c.detail);
        if let Some(fix) = &c.fix {
            println!("          fix: {fix}");
        }
    }
    match &report.isolation {
        Some(level) => println!("serve would isolate runs with: {level}"),
        None => println!("serve could not start on this host"),
    }
}
