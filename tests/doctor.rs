//! `sandbox doctor` on this host, for real: it passes here, and a failing check makes the
//! exit code non-zero.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use common::{sandbox, stderr, stdout};
use serde_json::Value;

fn doctor_json(env: &[(&str, &str)], extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["doctor", "--json"];
    args.extend_from_slice(extra);
    let o = sandbox(&args, env);
    let v: Value = serde_json::from_str(&stdout(&o))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(&o), stderr(&o)));
    (o.status.code().unwrap(), v)
}

fn find<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {v:#}"))
}

/// Every check the doctor must report, by name.
const CHECKS: &[&str] = &[
    "config",
    "privileges",
    "exec lock",
    "libseccomp",
    "kernel seccomp",
    "namespaces",
    "cgroups",
    "state directory",
    "python",
    "python module jinja2",
    "python module requests",
    "python module httpx",
    "nodejs",
    "network",
    "ip_forward",
    "resolver",
    "veth",
    "port",
    "pkg-config libseccomp",
    "gcc",
    "docker",
];

#[test]
fn doctor_passes_on_this_host() {
    // A port no one uses, so a server another test started cannot interfere.
    let port = common::free_port().to_string();
    let (code, v) = doctor_json(&[("SANDBOX_PORT", &port)], &[]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["ok"], true);
    for name in CHECKS {
        let c = find(&v, name);
        assert!(
            c["status"] == "ok" || c["status"] == "warning",
            "{name}: {c}"
        );
    }
    for name in [
        "config",
        "privileges",
        "exec lock",
        "libseccomp",
        "kernel seccomp",
        "namespaces",
        "state directory",
        "python",
        "nodejs",
        "network",
        "ip_forward",
        "resolver",
        "veth",
        "port",
    ] {
        assert_eq!(find(&v, name)["status"], "ok", "{name}: {v:#}");
    }
    // What networked runs get, tried for real.
    assert!(
        v["network"].as_str().unwrap().starts_with("isolated"),
        "{v:#}"
    );
    assert!(
        find(&v, "veth")["detail"]
            .as_str()
            .unwrap()
            .contains("created and removed"),
        "{v:#}"
    );
    assert!(
        find(&v, "python")["detail"]
            .as_str()
            .unwrap()
            .contains("imports json")
    );
    assert!(
        v["isolation"].as_str().unwrap().starts_with("namespaces"),
        "{v:#}"
    );
    assert_eq!(v["package_manager"], "apt");
}

#[test]
fn plain_output_is_one_line_per_check_without_colour_off_a_terminal() {
    let port = common::free_port().to_string();
    let o = sandbox(&["doctor"], &[("SANDBOX_PORT", &port)]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let text = stdout(&o);
    assert!(!text.contains('\x1b'), "colour codes on a pipe:\n{text}");
    for name in CHECKS {
        assert!(
            text.lines().any(|l| (l.starts_with("ok ")
                || l.starts_with("warning ")
                || l.starts_with("failed "))
                && l.contains(name)),
            "no line for {name}:\n{text}"
        );
    }
    assert!(
        text.contains("serve would isolate runs with: namespaces"),
        "{text}"
    );
    assert!(text.contains("networked runs get: isolated"), "{text}");
    assert!(text.contains("all required checks passed"), "{text}");
}

#[test]
fn a_python_that_does_not_exist_fails_the_doctor() {
    let (code, v) = doctor_json(&[("PYTHON_PATH", "/nonexistent/bin/python3")], &[]);
    assert_ne!(code, 0, "{v:#}");
    assert_eq!(v["ok"], false);
    let py = find(&v, "python");
    assert_eq!(py["status"], "failed");
    assert!(
        py["detail"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/bin/python3")
    );
    assert!(
        py["fix"].as_str().unwrap().contains("apt-get install"),
        "{py}"
    );

    // The same through a config file, in the plain output.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "python_path: /nonexistent/bin/python3\n").unwrap();
    let o = sandbox(&["doctor", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(1));
    let text = stdout(&o);
    assert!(
        text.lines()
            .any(|l| l.starts_with("failed") && l.contains("python")),
        "{text}"
    );
    assert!(text.contains("required check(s) failed"), "{text}");
}

#[test]
fn an_explicit_node_that_does_not_exist_fails_the_doctor() {
    let (code, v) = doctor_json(&[("NODEJS_PATH", "/nonexistent/node")], &[]);
    assert_eq!(code, 1);
    assert_eq!(find(&v, "nodejs")["status"], "failed");
}

#[test]
fn a_config_that_does_not_parse_fails_but_the_other_checks_still_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "max_workers: many\n").unwrap();
    let (code, v) = doctor_json(&[], &["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1);
    let c = find(&v, "config");
    assert_eq!(c["status"], "failed");
    assert!(c["detail"].as_str().unwrap().contains("max_workers"), "{c}");
    assert_eq!(find(&v, "python")["status"], "ok");

    let (code, v) = doctor_json(&[("WORKER_TIMEOUT", "soon")], &[]);
    assert_eq!(code, 1);
    assert!(
        find(&v, "config")["detail"]
            .as_str()
            .unwrap()
            .contains("WORKER_TIMEOUT")
    );
}

#[test]
fn an_unwritable_state_directory_fails() {
    let (code, v) = doctor_json(&[("SANDBOX_STATE_DIR", "/proc/sandbox-state")], &[]);
    assert_eq!(code, 1);
    let c = find(&v, "state directory");
    assert_eq!(c["status"], "failed");
    assert!(c["fix"].as_str().unwrap().contains("SANDBOX_STATE_DIR"));
}

#[test]
fn a_port_taken_by_another_program_fails() {
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    // Accept and close: not an HTTP server answering /health.
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let (code, v) = doctor_json(&[("SANDBOX_PORT", &port)], &[]);
    assert_eq!(code, 1);
    let c = find(&v, "port");
    assert_eq!(c["status"], "failed", "{c}");
    assert!(c["fix"].as_str().unwrap().contains("SANDBOX_PORT"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_sandbox_on_the_port_is_only_a_warning() {
    let server = common::Server::start(&[]).await;
    let port = server.base.rsplit(':').next().unwrap().to_string();
    let (code, v) = doctor_json(&[("SANDBOX_PORT", &port)], &[]);
    assert_eq!(find(&v, "port")["status"], "warning", "{v:#}");
    assert_eq!(code, 0, "{v:#}");
}

#[test]
fn the_docker_check_is_a_warning_only() {
    let port = common::free_port().to_string();
    let (code, v) = doctor_json(
        &[
            ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
            ("SANDBOX_PORT", &port),
        ],
        &[],
    );
    assert_eq!(code, 0, "{v:#}");
    let c = find(&v, "docker");
    assert_eq!(c["status"], "warning");
    assert!(c["fix"].as_str().unwrap().contains("DOCKER_HOST"));
}

#[test]
fn help_documents_the_exit_codes() {
    let o = sandbox(&["doctor", "--help"], &[]);
    assert!(stdout(&o).contains("Exit codes"), "{}", stdout(&o));
    assert!(stdout(&o).contains("--json"));
}

/// The doctor reads the network policy and checks the rules with `nft --check`: it
/// installs no table of its own (the kernel's own event stream says so) and leaves
/// forwarding as it found it.
#[test]
fn the_doctor_installs_no_network_table() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let forward = || std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let forward_before = forward();
    let mut monitor = Command::new("nft")
        .args(["monitor", "tables"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("nft monitor");
    // The monitor listens once it runs; give it a moment.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let port = common::free_port().to_string();
    let doctor = Command::new(common::bin())
        .args(["doctor", "--json"])
        .env("SANDBOX_PORT", &port)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("doctor");
    let pid = doctor.id();
    let o = doctor.wait_with_output().expect("doctor ran");
    std::thread::sleep(std::time::Duration::from_millis(300));
    monitor.kill().expect("stop the monitor");
    let mut events = String::new();
    monitor
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut events)
        .unwrap();
    let _ = monitor.wait();
    let v: Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert!(
        v["network"].as_str().unwrap().starts_with("isolated"),
        "{v:#}"
    );
    // Tables are named `<prefix><pid namespace>_<pid>`: none of the doctor's.
    let ours: Vec<&str> = events
        .lines()
        .filter(|l| l.contains("table") && l.ends_with(&format!("_{pid}")))
        .collect();
    assert!(ours.is_empty(), "the doctor installed: {ours:?}");
    assert_eq!(forward(), forward_before, "ip_forward changed");
}

/// An interpreter that runs on the host but cannot start in the jail (here: executable by
/// root only) passes the interpreter check and fails the jailed run, naming the cause.
#[test]
fn an_interpreter_that_cannot_start_in_the_jail_fails_the_doctor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let python = dir.path().join("python3");
    std::fs::copy("/usr/bin/python3", &python).expect("copy python3");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let path = python.display().to_string();
    let (code, v) = doctor_json(&[("PYTHON_PATH", path.as_str())], &[]);
    assert_eq!(code, 1, "{v}");
    let checks = v["checks"].as_array().expect("checks");
    let by_name = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check: {v}"))
    };
    assert_eq!(by_name("python")["status"], "ok", "{v}");
    let jailed = by_name("jailed python3 run");
    assert_eq!(jailed["status"], "failed", "{v}");
    let detail = jailed["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("does not start in the jail") && detail.contains("Permission denied"),
        "{detail}"
    );
    assert!(
        jailed["fix"]
            .as_str()
            .unwrap_or_default()
            .contains("PYTHON_PATH"),
        "{v}"
    );
    assert_eq!(by_name("jailed nodejs run")["status"], "ok", "{v}");
}
