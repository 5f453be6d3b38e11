//! Values from the environment and the file's lists: parsing that names the variable or
//! key a bad value came from.

use std::collections::HashMap;

use super::ConfigError;

pub(super) struct Env<'a>(pub &'a HashMap<String, String>);

impl Env<'_> {
    pub fn string(&self, var: &str) -> Option<String> {
        self.0.get(var).cloned()
    }

    pub fn parse<T: std::str::FromStr>(&self, var: &str) -> Result<Option<T>, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.0.get(var) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<T>()
                .map(Some)
                .map_err(|err| ConfigError::Env {
                    var: var.into(),
                    value: v.clone(),
                    reason: format!("{err}; expected a non-negative whole number"),
                }),
        }
    }

    pub fn parse_bool(&self, var: &str) -> Result<Option<bool>, ConfigError> {
        match self.0.get(var).map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(None),
            Some(v) => match v.as_str() {
                "1" | "true" | "yes" | "on" => Ok(Some(true)),
                "0" | "false" | "no" | "off" | "" => Ok(Some(false)),
                _ => Err(ConfigError::Env {
                    var: var.into(),
                    value: v,
                    reason: "expected true or false".into(),
                }),
            },
        }
    }
}

pub(super) fn parse_syscall_list(list: &str) -> Result<Vec<i64>, ConfigError> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<i64>().map_err(|err| ConfigError::Env {
                var: "ALLOWED_SYSCALLS".into(),
                value: list.into(),
                reason: format!(
                    "{s:?} is not a syscall number ({err}); give a comma list such as 0,1,60"
                ),
            })
        })
        .collect()
}

/// A Python module's name that is not one.
#[derive(Debug, thiserror::Error)]
#[error("expected a module name such as json or jinja2.sandbox")]
pub(super) struct NotAModule;

/// A value that must be one of `allowed`; unset or empty means the first.
pub(super) fn one_of(
    value: Option<String>,
    key: &str,
    allowed: &[&str],
) -> Result<String, ConfigError> {
    let v = value
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| allowed[0].to_string());
    if allowed.contains(&v.as_str()) {
        Ok(v)
    } else {
        Err(ConfigError::Value {
            key: key.into(),
            value: v,
            reason: format!("use one of: {}", allowed.join(", ")),
        })
    }
}

/// `extra_syscalls` from the environment (comma list) or the file (list), by name or
/// number, resolved now so a typo stops the server at start.
pub(super) fn extra_syscalls(
    env: Option<String>,
    file: Option<Vec<serde_yaml::Value>>,
) -> Result<Vec<i64>, ConfigError> {
    let file = file.map(|items| {
        items
            .into_iter()
            .map(|v| match v {
                serde_yaml::Value::String(s) => s,
                serde_yaml::Value::Number(n) => n.to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    });
    list_setting(
        ("EXTRA_SYSCALLS", "extra_syscalls"),
        env,
        file,
        &[],
        super::syscalls::resolve,
    )
}

/// A list setting: the environment's comma list wins over the file's list, which wins
/// over `default`; each item goes through `parse`, and a failure names the variable or
/// key it came from.
pub(super) fn list_setting<T, E: std::fmt::Display>(
    (var, key): (&str, &str),
    env: Option<String>,
    file: Option<Vec<String>>,
    default: &[&str],
    parse: impl Fn(&str) -> Result<T, E>,
) -> Result<Vec<T>, ConfigError> {
    let (items, from_env): (Vec<String>, bool) = match (env, file) {
        (Some(list), _) => (
            list.split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect(),
            true,
        ),
        (None, Some(list)) => (list, false),
        (None, None) => (default.iter().map(|s| s.to_string()).collect(), false),
    };
    items
        .iter()
        .map(|item| {
            parse(item).map_err(|reason| {
                let reason = reason.to_string();
                if from_env {
                    ConfigError::Env {
                        var: var.into(),
                        value: item.clone(),
                        reason,
                    }
                } else {
                    ConfigError::Value {
                        key: key.into(),
                        value: item.clone(),
                        reason,
                    }
                }
            })
        })
        .collect()
}
