//! The configuration file as written: every key optional, unknown ones collected. The
//! structs below are the list of known keys; nothing else repeats it.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawApp {
    pub port: Option<u16>,
    pub debug: Option<bool>,
    pub key: Option<String>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawProxy {
    pub socks5: Option<String>,
    pub http: Option<String>,
    pub https: Option<String>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawConfig {
    pub app: RawApp,
    pub max_workers: Option<usize>,
    pub max_requests: Option<usize>,
    pub worker_timeout: Option<u64>,
    pub python_path: Option<String>,
    pub nodejs_path: Option<String>,
    pub enable_network: Option<bool>,
    pub enable_preload: Option<bool>,
    pub allowed_syscalls: Option<Vec<i64>>,
    pub python_pip_mirror_url: Option<String>,
    pub nodejs_npm_mirror_url: Option<String>,
    pub python_deps_update_interval: Option<String>,
    pub proxy: RawProxy,
    pub system_lib_requirements: Option<Vec<String>>,
    pub log_path: Option<String>,
    pub memory_limit_mb: Option<u64>,
    pub max_processes: Option<u64>,
    pub max_output_bytes: Option<usize>,
    pub tmp_size_mb: Option<u64>,
    pub state_dir: Option<String>,
    pub dependencies_path: Option<String>,
    pub nodejs_dependencies_path: Option<String>,
    pub warm_workers: Option<usize>,
    pub python_fork_server: Option<bool>,
    pub python_preload_modules: Option<Vec<String>>,
    pub metrics_auth: Option<bool>,
    pub log_format: Option<String>,
    pub isolation: Option<String>,
    pub extra_syscalls: Option<Vec<serde_yaml::Value>>,
    pub network_deny: Option<Vec<String>>,
    pub network_isolation: Option<String>,
    pub network_subnet: Option<String>,
    pub network_allow: Option<Vec<String>>,
    pub network_dns: Option<Vec<String>>,
    pub header_read_timeout: Option<u64>,
    pub keepalive_timeout: Option<u64>,
    pub max_connections: Option<usize>,
    /// Whatever the file holds beyond the keys above: warned about, not fatal.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_yaml::Value>,
}

impl RawConfig {
    /// Keys this version does not know, nested ones as `app.key`.
    pub fn unknown_keys(&self) -> Vec<String> {
        let nested = [("app", &self.app.unknown), ("proxy", &self.proxy.unknown)];
        self.unknown
            .keys()
            .cloned()
            .chain(
                nested
                    .into_iter()
                    .flat_map(|(section, keys)| keys.keys().map(move |k| format!("{section}.{k}"))),
            )
            .collect()
    }
}
