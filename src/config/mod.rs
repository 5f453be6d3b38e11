//! Configuration: YAML file -> raw (all optional) -> environment overrides -> validated
//! `Config`. The environment is passed in as a map so tests need not touch the process
//! environment. `serde_yaml` is used here only.

mod limits;
mod network;
mod raw;
pub mod syscalls;
mod values;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use raw::RawConfig;

pub use limits::RunLimits;
pub use network::{AllowRule, NetworkIsolation, NetworkSettings};
use values::{Env, NotAModule, extra_syscalls, list_setting, one_of, parse_syscall_list};

/// The key Dify and the original sandbox ship with: public, so only fit for a port that
/// nobody else can reach.
pub const DEFAULT_KEY: &str = "dify-sandbox";

/// The embedded default configuration (the same text as `conf/config.yaml`).
pub const DEFAULT_YAML: &str = include_str!("../../conf/config.yaml");

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
    /// npm's registry for Node packages; empty: npm's default.
    pub nodejs_npm_mirror_url: String,
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
    /// Node's dependency file, a `package.json`.
    pub nodejs_dependencies_path: PathBuf,
    /// Interpreters kept started and jailed per language and network setting; 0 = none.
    pub warm_workers: usize,
    /// Python runs are forked from a fork server that has imported these modules
    /// (`python_fork_server`, `python_preload_modules`).
    pub python_fork_server: bool,
    pub python_preload_modules: Vec<String>,
    /// Whether `GET /metrics` needs the API key.
    pub metrics_auth: bool,
    /// `text` or `json` log lines.
    pub log_json: bool,
    /// How networked runs are isolated and what they may reach.
    pub network: NetworkSettings,
    /// Force the chroot level even where namespaces are available.
    pub force_chroot: bool,
    /// How long a client may take to send a request's headers, from connecting or from
    /// its first byte on a kept-alive connection.
    pub header_read_timeout: Duration,
    /// How long a connection may wait idle for its next request; zero = one request per
    /// connection.
    pub keepalive_timeout: Duration,
    /// Open connections at most; `None` = derived from the descriptor limit at start.
    pub max_connections: Option<usize>,
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
        let raw: RawConfig = if value.is_null() {
            RawConfig::default()
        } else {
            serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Key {
                path: origin.to_path_buf(),
                key: e.path().to_string(),
                reason: e.into_inner().to_string(),
            })?
        };
        Self::from_raw(raw, env)
    }

    fn from_raw(raw: RawConfig, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let unknown_keys = raw.unknown_keys();
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
            |s| Ok::<_, std::convert::Infallible>(PathBuf::from(s)),
        )?;

        let cfg = Config {
            port: e.parse("SANDBOX_PORT")?.or(raw.app.port).unwrap_or(8194),
            debug: e.parse_bool("DEBUG")?.or(raw.app.debug).unwrap_or(false),
            key: e
                .string("API_KEY")
                .or(raw.app.key)
                .unwrap_or_else(|| DEFAULT_KEY.into()),
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
            network: network::settings(
                network::RawNetwork {
                    isolation: raw.network_isolation,
                    subnet: raw.network_subnet,
                    deny: raw.network_deny,
                    allow: raw.network_allow,
                    dns: raw.network_dns,
                },
                &e,
            )?,
            python_pip_mirror_url: e
                .string("PIP_MIRROR_URL")
                .or(raw.python_pip_mirror_url)
                .unwrap_or_default(),
            nodejs_npm_mirror_url: e
                .string("NPM_MIRROR_URL")
                .or(raw.nodejs_npm_mirror_url)
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
            nodejs_dependencies_path: PathBuf::from(
                e.string("NODEJS_DEPENDENCIES_PATH")
                    .or(raw.nodejs_dependencies_path)
                    .unwrap_or_else(|| "dependencies/package.json".into()),
            ),
            warm_workers: e.parse("WARM_WORKERS")?.or(raw.warm_workers).unwrap_or(2),
            python_fork_server: e
                .parse_bool("PYTHON_FORK_SERVER")?
                .or(raw.python_fork_server)
                .unwrap_or(true),
            python_preload_modules: list_setting(
                ("PYTHON_PRELOAD_MODULES", "python_preload_modules"),
                e.string("PYTHON_PRELOAD_MODULES"),
                raw.python_preload_modules,
                DEFAULT_PRELOAD_MODULES,
                |m| {
                    if !m.is_empty()
                        && m.split('.').all(|p| {
                            !p.is_empty()
                                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        })
                    {
                        Ok(m.to_string())
                    } else {
                        Err(NotAModule)
                    }
                },
            )?,
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
            header_read_timeout: Duration::from_secs(
                e.parse("HEADER_READ_TIMEOUT")?
                    .or(raw.header_read_timeout)
                    .unwrap_or(10),
            ),
            keepalive_timeout: Duration::from_secs(
                e.parse("KEEPALIVE_TIMEOUT")?
                    .or(raw.keepalive_timeout)
                    .unwrap_or(75),
            ),
            max_connections: e
                .parse("MAX_CONNECTIONS")?
                .or(raw.max_connections)
                .filter(|&n: &usize| n > 0),
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
        if self.header_read_timeout.is_zero() {
            return bad(
                "header_read_timeout",
                "0".into(),
                "must be at least 1 second: without it a client can hold a connection open by never finishing its headers",
            );
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

/// What Dify's code-node and template-node runners import.
pub const DEFAULT_PRELOAD_MODULES: &[&str] = &["json", "base64", "jinja2"];

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
    /// Where `serve` listens: every interface, as the original does.
    pub fn listen_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([0, 0, 0, 0], self.port))
    }

    /// Whether anyone who reaches the port can run code: the key is the public default
    /// and the server listens beyond loopback.
    pub fn default_key_exposed(&self) -> bool {
        self.key == DEFAULT_KEY && !self.listen_addr().ip().is_loopback()
    }

    /// The limits each run gets.
    pub fn run_limits(&self) -> RunLimits {
        RunLimits {
            timeout: self.worker_timeout,
            memory_mb: self.memory_limit_mb,
            max_processes: self.max_processes,
            max_output_bytes: self.max_output_bytes,
            tmp_mb: self.tmp_size_mb,
        }
    }
}

#[cfg(test)]
mod tests;
