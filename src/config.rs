//! Configuration: YAML file -> raw (all optional) -> environment overrides -> validated
//! `Config`. The environment is passed in as a map so tests need not touch the process
//! environment. `serde_yaml` is used here only.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The embedded default configuration (the same text as `conf/config.yaml`).
pub const DEFAULT_YAML: &str = include_str!("../conf/config.yaml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}. Check the path given to --config")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the config file {path} is not valid YAML: {message}. Fix the file or remove it to use the defaults"
    )]
    Yaml { path: PathBuf, message: String },
    #[error(
        "config key `{key}` in {path} is invalid: {reason}. Fix the value or remove the key to use its default"
    )]
    Key {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("config key `{key}` has an invalid value {value:?}: {reason}")]
    Value {
        key: String,
        value: String,
        reason: String,
    },
    #[error("environment variable {var}={value:?} is invalid: {reason}")]
    Env {
        var: String,
        value: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct RawApp {
    port: Option<u16>,
    debug: Option<bool>,
    key: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct RawProxy {
    socks5: Option<String>,
    http: Option<String>,
    https: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct RawConfig {
    app: RawApp,
    max_workers: Option<usize>,
    max_requests: Option<usize>,
    worker_timeout: Option<u64>,
    python_path: Option<String>,
    nodejs_path: Option<String>,
    enable_network: Option<bool>,
    enable_preload: Option<bool>,
    allowed_syscalls: Option<Vec<i64>>,
    python_pip_mirror_url: Option<String>,
    python_deps_update_interval: Option<String>,
    proxy: RawProxy,
    system_lib_requirements: Option<Vec<String>>,
    log_path: Option<String>,
    memory_limit_mb: Option<u64>,
    max_processes: Option<u64>,
    max_output_bytes: Option<usize>,
    tmp_size_mb: Option<u64>,
    state_dir: Option<String>,
    dependencies_path: Option<String>,
    warm_workers: Option<usize>,
    metrics_auth: Option<bool>,
    log_format: Option<String>,
    isolation: Option<String>,
    extra_syscalls: Option<Vec<serde_yaml::Value>>,
    network_deny: Option<Vec<String>>,
}

const KNOWN_KEYS: &[&str] = &[
    "app",
    "max_workers",
    "max_requests",
    "worker_timeout",
    "python_path",
    "nodejs_path",
    "enable_network",
    "enable_preload",
    "allowed_syscalls",
    "python_pip_mirror_url",
    "python_deps_update_interval",
    "proxy",
    "system_lib_requirements",
    "log_path",
    "memory_limit_mb",
    "max_processes",
    "max_output_bytes",
    "tmp_size_mb",
    "state_dir",
    "dependencies_path",
    "warm_workers",
    "metrics_auth",
    "log_format",
    "isolation",
    "extra_syscalls",
    "network_deny",
];
const KNOWN_APP_KEYS: &[&str] = &["port", "debug", "key"];
const KNOWN_PROXY_KEYS: &[&str] = &["socks5", "http", "https"];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Proxy {
    pub socks5: String,
    pub http: String,
    pub https: String,
}

/// The validated configuration every subcommand works from.
#[derive(Debug, Clone)]
pub struct Config {
    pub port: u16,
    pub debug: bool,
    pub key: String,
    pub max_workers: usize,
    pub max_requests: usize,
    pub worker_timeout: Duration,
    /// As configured (a name on PATH or a path); resolved when the runtime is discovered.
    pub python_path: String,
    pub nodejs_path: String,
    /// Whether `python_path` / `nodejs_path` were set explicitly (a missing interpreter
    /// is then an error rather than a disabled language).
    pub python_path_explicit: bool,
    pub nodejs_path_explicit: bool,
    pub enable_network: bool,
    pub enable_preload: bool,
    pub allowed_syscalls: Vec<i64>,
    /// Syscall numbers added to the built-in allow-list (given by name or number).
    pub extra_syscalls: Vec<i64>,
    pub python_pip_mirror_url: String,
    pub python_deps_update_interval: Duration,
    pub proxy: Proxy,
    /// Empty: the platform's default list of system files.
    pub system_lib_requirements: Vec<PathBuf>,
    pub log_path: PathBuf,
    pub memory_limit_mb: u64,
    pub max_processes: u64,
    pub max_output_bytes: usize,
    pub tmp_size_mb: u64,
    pub state_dir: PathBuf,
    pub dependencies_path: PathBuf,
    /// Interpreters kept started and jailed per language and network setting; 0 = none.
    pub warm_workers: usize,
    /// Whether `GET /metrics` needs the API key.
    pub metrics_auth: bool,
    /// `text` or `json` log lines.
    pub log_json: bool,
    /// Destinations networked runs may not reach (loopback, link-local, cloud metadata by
    /// default); empty = no guard.
    pub network_deny: Vec<ipnet::IpNet>,
    /// Force the chroot level even where namespaces are available.
    pub force_chroot: bool,
    /// Keys found in the file that this version does not know (warned about, not fatal).
    pub unknown_keys: Vec<String>,
}

impl Config {
    /// Load from `path` (or the embedded defaults when `None`), then apply `env`.
    pub fn load(path: Option<&Path>, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
                p.to_path_buf(),
            ),
            None => (
                DEFAULT_YAML.to_string(),
                PathBuf::from("<embedded defaults>"),
            ),
        };
        Self::from_yaml(&text, &origin, env)
    }

    pub fn from_yaml(
        text: &str,
        origin: &Path,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let yaml_err = |e: serde_yaml::Error| ConfigError::Yaml {
            path: origin.to_path_buf(),
            message: e.to_string(),
        };
        let value: serde_yaml::Value = if text.trim().is_empty() {
            serde_yaml::Value::Mapping(Default::default())
        } else {
            serde_yaml::from_str(text).map_err(yaml_err)?
        };
        let unknown_keys = unknown_keys(&value);
        let raw: RawConfig = if value.is_null() {
            RawConfig::default()
        } else {
            serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Key {
                path: origin.to_path_buf(),
                key: e.path().to_string(),
                reason: e.into_inner().to_string(),
            })?
        };
        Self::from_raw(raw, env, unknown_keys)
    }

    fn from_raw(
        raw: RawConfig,
        env: &HashMap<String, String>,
        unknown_keys: Vec<String>,
    ) -> Result<Self, ConfigError> {
        let e = Env(env);
        let python_env = e.string("PYTHON_PATH");
        let node_env = e.string("NODEJS_PATH");
        let python_path_explicit =
            python_env.is_some() || raw.python_path.as_deref().is_some_and(|s| !s.is_empty());
        let nodejs_path_explicit =
            node_env.is_some() || raw.nodejs_path.as_deref().is_some_and(|s| !s.is_empty());
        let interval_text = e
            .string("PYTHON_DEPS_UPDATE_INTERVAL")
            .or(raw.python_deps_update_interval)
            .unwrap_or_else(|| "30m".to_string());
        let python_deps_update_interval =
            humantime::parse_duration(&interval_text).map_err(|err| ConfigError::Value {
                key: "python_deps_update_interval".into(),
                value: interval_text.clone(),
                reason: format!("{err}; write a duration such as 30m or 1h"),
            })?;
        let syscalls = match e.string("ALLOWED_SYSCALLS") {
            Some(list) => parse_syscall_list(&list)?,
            None => raw.allowed_syscalls.unwrap_or_default(),
        };
        let system_libs = list_setting(
            ("SYSTEM_LIB_REQUIREMENTS", "system_lib_requirements"),
            e.string("SYSTEM_LIB_REQUIREMENTS"),
            raw.system_lib_requirements,
            &[],
            |s| Ok(PathBuf::from(s)),
        )?;

        let cfg = Config {
            port: e.parse("SANDBOX_PORT")?.or(raw.app.port).unwrap_or(8194),
            debug: e.parse_bool("DEBUG")?.or(raw.app.debug).unwrap_or(false),
            key: e
                .string("API_KEY")
                .or(raw.app.key)
                .unwrap_or_else(|| "dify-sandbox".into()),
            max_workers: e.parse("MAX_WORKERS")?.or(raw.max_workers).unwrap_or(4),
            max_requests: e.parse("MAX_REQUESTS")?.or(raw.max_requests).unwrap_or(50),
            worker_timeout: Duration::from_secs(
                e.parse("WORKER_TIMEOUT")?
                    .or(raw.worker_timeout)
                    .unwrap_or(5),
            ),
            python_path: python_env
                .or(raw.python_path)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "python3".into()),
            nodejs_path: node_env
                .or(raw.nodejs_path)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "node".into()),
            python_path_explicit,
            nodejs_path_explicit,
            enable_network: e
                .parse_bool("ENABLE_NETWORK")?
                .or(raw.enable_network)
                .unwrap_or(true),
            enable_preload: e
                .parse_bool("ENABLE_PRELOAD")?
                .or(raw.enable_preload)
                .unwrap_or(false),
            allowed_syscalls: syscalls,
            extra_syscalls: extra_syscalls(e.string("EXTRA_SYSCALLS"), raw.extra_syscalls)?,
            network_deny: network_deny(e.string("NETWORK_DENY"), raw.network_deny)?,
            python_pip_mirror_url: e
                .string("PIP_MIRROR_URL")
                .or(raw.python_pip_mirror_url)
                .unwrap_or_default(),
            python_deps_update_interval,
            proxy: Proxy {
                socks5: e
                    .string("SOCKS5_PROXY")
                    .or(raw.proxy.socks5)
                    .unwrap_or_default(),
                http: e
                    .string("HTTP_PROXY")
                    .or(raw.proxy.http)
                    .unwrap_or_default(),
                https: e
                    .string("HTTPS_PROXY")
                    .or(raw.proxy.https)
                    .unwrap_or_default(),
            },
            system_lib_requirements: system_libs,
            log_path: PathBuf::from(
                e.string("LOG_PATH")
                    .or(raw.log_path)
                    .unwrap_or_else(|| "./logs".into()),
            ),
            memory_limit_mb: e
                .parse("MEMORY_LIMIT_MB")?
                .or(raw.memory_limit_mb)
                .unwrap_or(512),
            max_processes: e
                .parse("MAX_PROCESSES")?
                .or(raw.max_processes)
                .unwrap_or(64),
            max_output_bytes: e
                .parse("MAX_OUTPUT_BYTES")?
                .or(raw.max_output_bytes)
                .unwrap_or(8 << 20),
            tmp_size_mb: e.parse("TMP_SIZE_MB")?.or(raw.tmp_size_mb).unwrap_or(64),
            state_dir: e
                .string("SANDBOX_STATE_DIR")
                .or(raw.state_dir)
                .map(PathBuf::from)
                .unwrap_or_else(|| default_state_dir(nix::unistd::geteuid().is_root(), &e)),
            dependencies_path: PathBuf::from(
                e.string("DEPENDENCIES_PATH")
                    .or(raw.dependencies_path)
                    .unwrap_or_else(|| "dependencies/python-requirements.txt".into()),
            ),
            warm_workers: e.parse("WARM_WORKERS")?.or(raw.warm_workers).unwrap_or(2),
            force_chroot: one_of(
                e.string("SANDBOX_ISOLATION").or(raw.isolation),
                "isolation",
                &["auto", "chroot"],
            )? == "chroot",
            metrics_auth: e
                .parse_bool("METRICS_AUTH")?
                .or(raw.metrics_auth)
                .unwrap_or(false),
            log_json: one_of(
                e.string("LOG_FORMAT").or(raw.log_format),
                "log_format",
                &["text", "json"],
            )? == "json",
            unknown_keys,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, value: String, reason: &str| {
            Err(ConfigError::Value {
                key: key.into(),
                value,
                reason: reason.into(),
            })
        };
        if self.max_workers == 0 {
            return bad("max_workers", "0".into(), "must be at least 1");
        }
        if self.max_requests < self.max_workers {
            return bad(
                "max_requests",
                self.max_requests.to_string(),
                "must be at least max_workers",
            );
        }
        if self.worker_timeout.is_zero() {
            return bad("worker_timeout", "0".into(), "must be at least 1 second");
        }
        if self.memory_limit_mb < 16 {
            return bad(
                "memory_limit_mb",
                self.memory_limit_mb.to_string(),
                "must be at least 16",
            );
        }
        if self.max_processes == 0 {
            return bad(
                "max_processes",
                "0".into(),
                "must be at least 1 (threads count too)",
            );
        }
        if self.max_output_bytes == 0 {
            return bad("max_output_bytes", "0".into(), "must be at least 1");
        }
        if self.tmp_size_mb == 0 {
            return bad("tmp_size_mb", "0".into(), "must be at least 1");
        }
        if self.key.is_empty() {
            return bad(
                "app.key",
                String::new(),
                "must not be empty: Dify sends it as X-Api-Key",
            );
        }
        Ok(())
    }

    /// The environment variables the process was started with, as the map `load` takes.
    pub fn process_env() -> HashMap<String, String> {
        std::env::vars().collect()
    }
}

/// The configuration file in use: `--config`, else `conf/config.yaml` when present.
pub fn config_path(path: Option<&Path>) -> Option<PathBuf> {
    let default = PathBuf::from("conf/config.yaml");
    match path {
        Some(p) => Some(p.to_path_buf()),
        None if default.is_file() => Some(default),
        None => None,
    }
}

/// Load the configuration: `--config`, else `conf/config.yaml` when present, else the
/// embedded defaults; the process environment overrides either.
pub fn load_config(path: Option<&Path>) -> Result<Config, ConfigError> {
    let env: HashMap<String, String> = Config::process_env();
    let chosen = config_path(path);
    let config = Config::load(chosen.as_deref(), &env)?;
    for key in &config.unknown_keys {
        eprintln!(
            "sandbox: warning: unknown configuration key `{key}` ignored; check its spelling"
        );
    }
    Ok(config)
}

/// Root keeps its state system-wide; a user (the rootless level) in its own home, as the
/// XDG base directory convention places state.
fn default_state_dir(root: bool, e: &Env) -> PathBuf {
    if root {
        return PathBuf::from("/var/lib/sandbox");
    }
    match (e.string("XDG_STATE_HOME"), e.string("HOME")) {
        (Some(state), _) if state.starts_with('/') => PathBuf::from(state).join("sandbox"),
        (_, Some(home)) if home.starts_with('/') => {
            PathBuf::from(home).join(".local/state/sandbox")
        }
        _ => PathBuf::from("/var/lib/sandbox"),
    }
}

impl Config {
    /// The empty directory private roots are mounted on (inside each run's own mount
    /// namespace).
    pub fn mount_dir(&self) -> PathBuf {
        self.state_dir.join("rootfs")
    }
}

struct Env<'a>(&'a HashMap<String, String>);

impl Env<'_> {
    fn string(&self, var: &str) -> Option<String> {
        self.0.get(var).cloned()
    }

    fn parse<T: std::str::FromStr>(&self, var: &str) -> Result<Option<T>, ConfigError>
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

    fn parse_bool(&self, var: &str) -> Result<Option<bool>, ConfigError> {
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

fn parse_syscall_list(list: &str) -> Result<Vec<i64>, ConfigError> {
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

/// A value that must be one of `allowed`; unset or empty means the first.
fn one_of(value: Option<String>, key: &str, allowed: &[&str]) -> Result<String, ConfigError> {
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

/// What networked runs may not reach unless the operator says otherwise: the host's own
/// services (loopback; 0.0.0.0 reaches them too), link-local addresses, where the cloud
/// metadata services live (169.254.169.254, fd00:ec2::254).
pub const DEFAULT_NETWORK_DENY: &[&str] = &[
    "127.0.0.0/8",
    "0.0.0.0/8",
    "169.254.0.0/16",
    "::1/128",
    "fe80::/10",
    "fd00:ec2::254/128",
];

/// `network_deny` from the environment (comma list; empty = none) or the file (list).
fn network_deny(
    env: Option<String>,
    file: Option<Vec<String>>,
) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    list_setting(
        ("NETWORK_DENY", "network_deny"),
        env,
        file,
        DEFAULT_NETWORK_DENY,
        |item| {
            // A bare address means just that address.
            item.parse::<ipnet::IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    "expected an address or a CIDR block such as 169.254.0.0/16 or fe80::/10"
                        .to_string()
                })
        },
    )
}

/// `extra_syscalls` from the environment (comma list) or the file (list), by name or
/// number, resolved now so a typo stops the server at start.
fn extra_syscalls(
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
        crate::isolation::seccomp::policy::resolve_token,
    )
}

/// A list setting: the environment's comma list wins over the file's list, which wins
/// over `default`; each item goes through `parse`, and a failure names the variable or
/// key it came from.
fn list_setting<T>(
    (var, key): (&str, &str),
    env: Option<String>,
    file: Option<Vec<String>>,
    default: &[&str],
    parse: impl Fn(&str) -> Result<T, String>,
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

fn unknown_keys(value: &serde_yaml::Value) -> Vec<String> {
    let mut out = Vec::new();
    let Some(map) = value.as_mapping() else {
        return out;
    };
    let nested: BTreeMap<&str, &[&str]> = [("app", KNOWN_APP_KEYS), ("proxy", KNOWN_PROXY_KEYS)]
        .into_iter()
        .collect();
    for (k, v) in map {
        let Some(k) = k.as_str() else { continue };
        if !KNOWN_KEYS.contains(&k) {
            out.push(k.to_string());
        } else if let (Some(known), Some(sub)) = (nested.get(k), v.as_mapping()) {
            for sk in sub.keys().filter_map(|x| x.as_str()) {
                if !known.contains(&sk) {
                    out.push(format!("{k}.{sk}"));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn network_deny_defaults_parses_and_names_bad_values() {
        let c = Config::from_yaml("", Path::new("c.yaml"), &env(&[])).expect("loads");
        assert_eq!(c.network_deny.len(), DEFAULT_NETWORK_DENY.len());
        assert!(
            c.network_deny
                .iter()
                .any(|n| n.contains(&"169.254.169.254".parse::<std::net::IpAddr>().unwrap()))
        );
        let c = Config::from_yaml(
            "network_deny: [10.0.0.0/8, 192.0.2.7]\n",
            Path::new("c.yaml"),
            &env(&[]),
        )
        .expect("loads");
        assert_eq!(c.network_deny[1].to_string(), "192.0.2.7/32");
        let c = Config::from_yaml("", Path::new("c.yaml"), &env(&[("NETWORK_DENY", "")]))
            .expect("loads");
        assert!(c.network_deny.is_empty());
        let e = Config::from_yaml(
            "",
            Path::new("c.yaml"),
            &env(&[("NETWORK_DENY", "127.0.0.0/8,localhost")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("NETWORK_DENY") && e.contains("localhost"), "{e}");
        let e = Config::from_yaml(
            "network_deny: [300.1.1.1/8]\n",
            Path::new("c.yaml"),
            &env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("network_deny") && e.contains("300.1.1.1/8"),
            "{e}"
        );
    }

    #[test]
    fn state_dir_defaults_by_privilege() {
        let vars = env(&[("HOME", "/home/ci"), ("XDG_STATE_HOME", "/xdg")]);
        assert_eq!(
            default_state_dir(true, &Env(&vars)),
            PathBuf::from("/var/lib/sandbox")
        );
        assert_eq!(
            default_state_dir(false, &Env(&vars)),
            PathBuf::from("/xdg/sandbox")
        );
        let vars = env(&[("HOME", "/home/ci")]);
        assert_eq!(
            default_state_dir(false, &Env(&vars)),
            PathBuf::from("/home/ci/.local/state/sandbox")
        );
    }

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn embedded_defaults_match_the_protocol() {
        let c = Config::load(None, &env(&[])).expect("defaults load");
        assert_eq!(c.port, 8194);
        assert_eq!(c.key, "dify-sandbox");
        assert_eq!(c.max_workers, 4);
        assert_eq!(c.max_requests, 50);
        assert_eq!(c.worker_timeout, Duration::from_secs(5));
        assert!(c.enable_network);
        assert!(!c.enable_preload);
        assert_eq!(c.memory_limit_mb, 512);
        assert_eq!(c.max_processes, 64);
        assert_eq!(c.max_output_bytes, 8 << 20);
        assert_eq!(c.tmp_size_mb, 64);
        assert_eq!(c.python_deps_update_interval, Duration::from_secs(1800));
        assert!(c.unknown_keys.is_empty());
    }

    #[test]
    fn environment_overrides_every_kind_of_value() {
        let c = Config::from_yaml(
            "app:\n  port: 9000\nmax_workers: 2\n",
            Path::new("t.yaml"),
            &env(&[
                ("SANDBOX_PORT", "9100"),
                ("API_KEY", "k"),
                ("ENABLE_NETWORK", "false"),
                ("ALLOWED_SYSCALLS", "0, 1,60"),
                ("MEMORY_LIMIT_MB", "128"),
                ("HTTP_PROXY", "http://p:1"),
                ("PYTHON_DEPS_UPDATE_INTERVAL", "1h"),
            ]),
        )
        .expect("loads");
        assert_eq!(c.port, 9100);
        assert_eq!(c.max_workers, 2);
        assert_eq!(c.key, "k");
        assert!(!c.enable_network);
        assert_eq!(c.allowed_syscalls, vec![0, 1, 60]);
        assert_eq!(c.memory_limit_mb, 128);
        assert_eq!(c.proxy.http, "http://p:1");
        assert_eq!(c.python_deps_update_interval, Duration::from_secs(3600));
    }

    #[test]
    fn bad_input_names_the_key_and_value() {
        let err = Config::from_yaml("max_workers: [", Path::new("c.yaml"), &env(&[])).unwrap_err();
        assert!(err.to_string().contains("c.yaml"), "{err}");
        let err = Config::from_yaml("", Path::new("c.yaml"), &env(&[("MAX_WORKERS", "four")]))
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("MAX_WORKERS") && msg.contains("four"), "{msg}");
        let err =
            Config::from_yaml("worker_timeout: abc\n", Path::new("c.yaml"), &env(&[])).unwrap_err();
        assert!(err.to_string().contains("worker_timeout"), "{err}");
        let err = Config::from_yaml(
            "python_deps_update_interval: soon\n",
            Path::new("c.yaml"),
            &env(&[]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("python_deps_update_interval"),
            "{err}"
        );
    }

    #[test]
    fn extra_syscalls_take_names_or_numbers_but_not_the_fixed_ones() {
        let c = Config::from_yaml(
            "extra_syscalls: [mbind, 309]\n",
            Path::new("c.yaml"),
            &env(&[]),
        )
        .expect("loads");
        assert_eq!(c.extra_syscalls.len(), 2);
        assert_eq!(c.extra_syscalls[1], 309);
        let e = Config::from_yaml(
            "",
            Path::new("c.yaml"),
            &env(&[("EXTRA_SYSCALLS", "getcpu,nosuchcall")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("nosuchcall"), "{e}");
        let e = Config::from_yaml("extra_syscalls: [execve]\n", Path::new("c.yaml"), &env(&[]))
            .unwrap_err();
        assert!(e.to_string().contains("cannot be allowed"), "{e}");
    }

    #[test]
    fn unknown_keys_are_collected_not_fatal() {
        let c = Config::from_yaml(
            "colour: blue\napp:\n  prot: 1\n",
            Path::new("c.yaml"),
            &env(&[]),
        )
        .expect("loads");
        assert_eq!(
            c.unknown_keys,
            vec!["colour".to_string(), "app.prot".to_string()]
        );
    }
}
