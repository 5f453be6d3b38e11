//! One real run per language, jailed as `serve` jails it (`Engine::probe`).

use crate::config::Config;
use crate::deps::PackageSet;
use crate::engine::{Engine, ProbeError};
use crate::runtime::Language;

use super::{Check, Status, check, ok};

pub(super) fn jailed_run_checks(config: &Config) -> Vec<Check> {
    let mut config = config.clone();
    // The run, not the network or the fork server: nothing is installed for it.
    config.enable_network = false;
    config.max_workers = 1;
    config.warm_workers = 0;
    config.python_fork_server = false;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return vec![check(
                "jailed runs",
                Status::Failed,
                format!("cannot start the async runtime: {e}"),
                None,
            )];
        }
    };
    let engine = match runtime.block_on(Engine::build(config)) {
        Ok(engine) => engine,
        Err(e) => {
            return vec![check(
                "jailed runs",
                Status::Failed,
                e.to_string(),
                Some("fix the checks above that failed, then run sandbox doctor again".into()),
            )];
        }
    };
    let mut checks = Vec::new();
    for language in Language::ALL {
        // A language the server does not have is the interpreter checks' to report.
        if engine.runtime(language).is_err() {
            continue;
        }
        let name = format!("jailed {} run", language.as_str());
        checks.push(match runtime.block_on(engine.probe(language)) {
            Ok(()) => ok(&name, "starts in the jail and runs a snippet"),
            Err(e) => check(
                &name,
                Status::Failed,
                e.to_string(),
                Some(ProbeError::fix(language)),
            ),
        });
    }
    for language in Language::ALL {
        if let Some(set) = engine.package_set(language) {
            checks.push(package_check(set));
        }
    }
    runtime.block_on(engine.close());
    checks
}

/// A language's extra packages: what is live, and what the last install said.
fn package_check(set: &PackageSet) -> Check {
    let name = format!("{} packages", set.language().as_str());
    let file = set.file().display().to_string();
    let s = set.status();
    let live = format!("{} package(s) live ({}) from {file}", s.packages, s.live);
    if set.installer_missing() {
        return check(
            &name,
            Status::Failed,
            format!("{file} asks for packages, but npm was not found beside node or on PATH"),
            Some("install npm (Debian/Ubuntu: apt-get install npm), or give nodejs_path a Node that has npm beside it".into()),
        );
    }
    match s.last_ok {
        Some(false) => check(
            &name,
            Status::Warning,
            format!(
                "the last install failed ({} s after the epoch): {}; {live} stay in use",
                s.last_at, s.last_error
            ),
            Some(format!(
                "fix {file}: a running server installs it again when it changes (or POST /v1/sandbox/dependencies/update)"
            )),
        ),
        _ => ok(&name, live),
    }
}
