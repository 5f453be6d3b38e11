//! Host checks behind `sandbox doctor`: each says ok, warning or failed, with a one-line
//! fix for the detected distribution. Failed means `serve` cannot work as configured;
//! warning means something optional (building, the xtask, optional modules) is missing,
//! or a setting works but is risky (the public default API key).

mod api_key;
mod build;
mod config;
mod host;
mod interpreters;
mod network;
mod packages;
mod render;
mod runs;
mod services;

use std::path::Path;

use serde::Serialize;

use crate::isolation::detect;

use api_key::api_key_check;
use build::build_checks;
use config::config_check;
use host::{
    exec_lock_check, isolation_checks, libseccomp_check, privileges_check, state_dir_check,
};
use interpreters::interpreter_checks;
use network::network_checks;
use packages::PackageManager;
use runs::jailed_run_checks;
use services::{docker_check, port_check};

pub(crate) use render::render;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warning,
    Failed,
}

#[derive(Debug, Serialize)]
struct Check {
    name: String,
    status: Status,
    detail: String,
    fix: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    distribution: String,
    package_manager: PackageManager,
    checks: Vec<Check>,
    /// The isolation `serve` would use, or `None` when it could not start.
    isolation: Option<String>,
    /// Why `serve` could not start, when it could not.
    isolation_error: Option<String>,
    /// What networked runs get, in words (`None` when the host could not be judged).
    network: Option<String>,
    /// No check failed.
    pub(crate) ok: bool,
}

fn check(name: &str, status: Status, detail: impl Into<String>, fix: Option<String>) -> Check {
    Check {
        name: name.into(),
        status,
        detail: detail.into(),
        fix,
    }
}

fn ok(name: &str, detail: impl Into<String>) -> Check {
    check(name, Status::Ok, detail, None)
}

pub(crate) fn run_checks(config_path: Option<&Path>) -> Report {
    let (distribution, pm) = PackageManager::detect();
    let (mut checks, config) = config_check(config_path);
    let Some(config) = config else {
        return Report {
            distribution,
            package_manager: pm,
            checks,
            isolation: None,
            isolation_error: Some("the configuration does not load".into()),
            network: None,
            ok: false,
        };
    };
    checks.push(api_key_check(&config));
    let state = state_dir_check(&config);
    let probe = detect::probe(&crate::state::StateDir::new(&config.state_dir).mount_point());
    let host_report = &probe.report;
    let caps = detect::effective_caps().unwrap_or(0);
    checks.push(privileges_check(
        host_report.root,
        caps,
        &host_report.namespaces,
    ));
    checks.push(exec_lock_check(
        host_report.root,
        caps,
        host_report.mmap_min_addr,
    ));
    checks.push(libseccomp_check(pm));
    checks.extend(isolation_checks(host_report));
    checks.push(state);
    checks.extend(interpreter_checks(&config, pm));
    let decided = detect::decide(
        probe,
        config
            .force_chroot
            .then_some(crate::isolation::spec::IsolationLevel::Chroot),
    );
    let (network_checks, network) = network_checks(&config, decided.as_ref().ok(), pm);
    checks.extend(network_checks);
    // Only where the host can jail at all: otherwise the checks above say why not.
    if decided.is_ok() {
        checks.extend(jailed_run_checks(&config));
    }
    checks.push(port_check(config.port));
    checks.extend(build_checks(pm));
    checks.push(docker_check(pm));
    let (isolation, isolation_error) = match decided {
        Ok(host) => (Some(host.level.describe().to_string()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    Report {
        distribution,
        package_manager: pm,
        ok: checks.iter().all(|c| c.status != Status::Failed),
        checks,
        isolation,
        isolation_error,
        network,
    }
}
