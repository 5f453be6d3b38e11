//! Whether the configuration `serve` would use loads.

use std::collections::HashMap;
use std::path::Path;

use crate::config::Config;

use super::{Check, Status, check, ok};

/// Load the configuration the way `serve` would. When it does not load, the remaining
/// checks still run, against the embedded defaults.
pub(super) fn config_check(path: Option<&Path>) -> (Vec<Check>, Option<Config>) {
    let cwd = std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|_| "?".into());
    let origin = match (path, crate::config::config_path(path)) {
        (Some(p), _) => p.display().to_string(),
        (None, Some(default)) => format!("{cwd}/{}", default.display()),
        (None, None) => format!("embedded defaults (no conf/config.yaml in {cwd})"),
    };
    match crate::config::load_config(path) {
        Ok(config) => {
            let mut checks = vec![ok("config", format!("{origin} parses"))];
            if !config.unknown_keys.is_empty() {
                checks.push(check(
                    "config keys",
                    Status::Warning,
                    format!("unknown keys ignored: {}", config.unknown_keys.join(", ")),
                    Some("check their spelling against conf/config.yaml".into()),
                ));
            }
            (checks, Some(config))
        }
        Err(e) => {
            let checks = vec![check(
                "config",
                Status::Failed,
                format!("{e:#}"),
                Some("fix the file or the environment variable named above".into()),
            )];
            // The environment may be what is broken: the embedded defaults alone always load.
            let fallback = Config::load(None, &HashMap::new()).ok();
            (checks, fallback)
        }
    }
}
