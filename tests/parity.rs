//! `sandbox serve` checks each language by one real jailed run as it starts listening,
//! so an interpreter that starts on the host but not in the jail is reported at once, not
//! by every run that fails later.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, bin, free_port};

/// A copy of `program` only root may execute: it runs on the host, not in the jail.
fn root_only_copy(dir: &Path, program: &str, name: &str) -> PathBuf {
    let copy = dir.join(name);
    std::fs::copy(program, &copy).expect("copy the interpreter");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    copy
}

fn node() -> String {
    let out = Command::new("sh")
        .args(["-c", "command -v node"])
        .output()
        .expect("sh");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_names_a_language_that_cannot_run_in_the_jail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let python = root_only_copy(dir.path(), "/usr/bin/python3", "python3");
    let log = dir.path().join("serve.log");
    // Without the fork server: its runs fork a Python it started as root, already
    // loaded, so they would not show an interpreter the run's uid cannot execute.
    let server = Server::start_logging(
        &[
            ("PYTHON_PATH", python.to_str().unwrap()),
            ("PYTHON_FORK_SERVER", "false"),
        ],
        &log,
    )
    .await;
    // The probes run once the server listens.
    let deadline = Instant::now() + Duration::from_secs(30);
    let failed = loop {
        let text = std::fs::read_to_string(&log).expect("log");
        if let Some(line) = text.lines().find(|l| l.contains("LANGUAGE FAILS")) {
            break line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no failing language in the log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        failed.contains("python3")
            && failed.contains("does not start in the jail")
            && failed.contains("PYTHON_PATH"),
        "{failed}"
    );
    // The language that passed serves.
    let data = server.run("nodejs", "console.log(1)").await;
    assert_eq!(data["stdout"], "1\n", "{data}");
}

#[test]
fn serve_stops_when_no_language_runs_in_the_jail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let python = root_only_copy(dir.path(), "/usr/bin/python3", "python3");
    let node = root_only_copy(dir.path(), &node(), "node");
    let mut child = Command::new(bin())
        .arg("serve")
        .current_dir(std::env::temp_dir())
        .env("SANDBOX_PORT", free_port().to_string())
        .env("SANDBOX_LOG", "warn")
        .env("PYTHON_PATH", &python)
        .env("NODEJS_PATH", &node)
        .env("PYTHON_FORK_SERVER", "false")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sandbox serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve kept running though no language runs in the jail");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read");
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("no language runs in the jail") && err.contains("sandbox doctor"),
        "{err}"
    );
}
