//! One real run per language, jailed as `serve` jails it (`Engine::probe`).

use crate::config::Config;
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
    runtime.block_on(engine.close());
    checks
}
