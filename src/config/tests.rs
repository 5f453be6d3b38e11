use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::network::DEFAULT_NETWORK_DENY;
use super::values::Env;
use super::*;

#[test]
fn network_deny_defaults_parses_and_names_bad_values() {
    let c = Config::from_yaml("", Path::new("c.yaml"), &env(&[])).expect("loads");
    assert_eq!(c.network.deny.len(), DEFAULT_NETWORK_DENY.len());
    assert!(
        c.network
            .deny
            .iter()
            .any(|n| n.contains(&"169.254.169.254".parse::<std::net::IpAddr>().unwrap()))
    );
    let c = Config::from_yaml(
        "network_deny: [10.0.0.0/8, 192.0.2.7]\n",
        Path::new("c.yaml"),
        &env(&[]),
    )
    .expect("loads");
    assert_eq!(c.network.deny[1].to_string(), "192.0.2.7/32");
    let c =
        Config::from_yaml("", Path::new("c.yaml"), &env(&[("NETWORK_DENY", "")])).expect("loads");
    assert!(c.network.deny.is_empty());
    let e = env_error(&[("NETWORK_DENY", "127.0.0.0/8,localhost")]);
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

/// The error the defaults give with `pairs` in the environment.
fn env_error(pairs: &[(&str, &str)]) -> String {
    Config::from_yaml("", Path::new("c.yaml"), &env(pairs))
        .expect_err("the environment is refused")
        .to_string()
}

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
    let err =
        Config::from_yaml("", Path::new("c.yaml"), &env(&[("MAX_WORKERS", "four")])).unwrap_err();
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

/// The configuration table of the README, first column: every yaml key it documents
/// (`proxy.socks5/http/https` style rows included).
fn documented_keys() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let table = readme
        .split("## Configuration")
        .nth(1)
        .expect("README has a Configuration section");
    let mut keys = Vec::new();
    for row in table.lines().skip_while(|l| !l.starts_with('|')) {
        let Some(first) = row.strip_prefix('|').and_then(|r| r.split('|').next()) else {
            break;
        };
        for key in first.split('`').skip(1).step_by(2) {
            match key.split_once('/') {
                // `proxy.socks5/http/https`
                Some((head, rest)) => {
                    let (section, first) = head.rsplit_once('.').expect("a nested key");
                    keys.push(format!("{section}.{first}"));
                    keys.extend(rest.split('/').map(|k| format!("{section}.{k}")));
                }
                None => keys.push(key.to_string()),
            }
        }
    }
    keys
}

#[test]
fn every_documented_key_is_known_and_the_shipped_file_has_no_other() {
    let keys = documented_keys();
    assert!(keys.len() > 20, "{keys:?}");
    use serde_yaml::{Mapping, Value};
    let mut root = Mapping::new();
    for key in &keys {
        match key.split_once('.') {
            Some((section, sub)) => {
                let entry = root
                    .entry(section.into())
                    .or_insert_with(|| Value::Mapping(Mapping::new()));
                if let Value::Mapping(m) = entry {
                    m.insert(sub.into(), Value::Null);
                }
            }
            None => {
                root.insert(key.as_str().into(), Value::Null);
            }
        }
    }
    let value = Value::Mapping(root);
    let text = serde_yaml::to_string(&value).expect("yaml");
    let c = Config::from_yaml(&text, Path::new("README"), &env(&[])).expect("loads");
    assert!(
        c.unknown_keys.is_empty(),
        "documented but unknown: {:?}",
        c.unknown_keys
    );
    let shipped = Config::from_yaml(DEFAULT_YAML, Path::new("conf"), &env(&[])).expect("loads");
    assert!(
        shipped.unknown_keys.is_empty(),
        "{:?}",
        shipped.unknown_keys
    );
}

#[test]
fn connection_limits_default_override_and_refuse_a_zero_header_timeout() {
    let c = Config::from_yaml("", Path::new("c.yaml"), &env(&[])).expect("loads");
    assert_eq!(c.header_read_timeout, Duration::from_secs(10));
    assert_eq!(c.keepalive_timeout, Duration::from_secs(75));
    assert_eq!(c.max_connections, None, "derived from the descriptor limit");
    let c = Config::from_yaml(
        "header_read_timeout: 3\nmax_connections: 0\n",
        Path::new("c.yaml"),
        &env(&[("KEEPALIVE_TIMEOUT", "0"), ("MAX_CONNECTIONS", "500")]),
    )
    .expect("loads");
    assert_eq!(c.header_read_timeout, Duration::from_secs(3));
    assert_eq!(c.keepalive_timeout, Duration::ZERO);
    assert_eq!(c.max_connections, Some(500));
    let e = env_error(&[("HEADER_READ_TIMEOUT", "0")]);
    assert!(e.contains("header_read_timeout"), "{e}");
    let e = env_error(&[("MAX_CONNECTIONS", "many")]);
    assert!(e.contains("MAX_CONNECTIONS") && e.contains("many"), "{e}");
}

#[test]
fn only_the_public_default_key_on_every_interface_is_exposed() {
    let c = Config::from_yaml("", Path::new("c.yaml"), &env(&[])).expect("loads");
    assert!(c.default_key_exposed());
    let c =
        Config::from_yaml("", Path::new("c.yaml"), &env(&[("API_KEY", "s3cret")])).expect("loads");
    assert!(!c.default_key_exposed());
}

#[test]
fn every_key_of_the_shipped_file_is_documented() {
    let documented = documented_keys();
    let shipped: serde_yaml::Mapping = serde_yaml::from_str(DEFAULT_YAML).expect("yaml");
    let mut missing = Vec::new();
    for (key, value) in &shipped {
        let key = key.as_str().expect("string keys");
        let keys: Vec<String> = match value {
            serde_yaml::Value::Mapping(sub) => sub
                .keys()
                .filter_map(|k| k.as_str())
                .map(|k| format!("{key}.{k}"))
                .collect(),
            _ => vec![key.to_string()],
        };
        missing.extend(keys.into_iter().filter(|k| !documented.contains(k)));
    }
    assert!(
        missing.is_empty(),
        "keys of conf/config.yaml missing from the README's table: {missing:?}"
    );
}

#[test]
fn a_runs_limits_are_the_configured_ones() {
    let c = Config::from_yaml(
        "worker_timeout: 7\n",
        Path::new("c.yaml"),
        &env(&[("MEMORY_LIMIT_MB", "300")]),
    )
    .expect("loads");
    let limits = c.run_limits();
    assert_eq!(limits.timeout, Duration::from_secs(7));
    assert_eq!(limits.memory_mb, 300);
    assert_eq!(limits.max_processes, c.max_processes);
    assert_eq!(limits.max_output_bytes, c.max_output_bytes);
    assert_eq!(limits.tmp_mb, c.tmp_size_mb);
}
