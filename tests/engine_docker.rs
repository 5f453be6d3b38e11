//! `--engine docker` for real: `run`, `doctor` and `serve` carried out by a `sandbox` in
//! a container of the local Docker engine, with this build's binary bound over the
//! image's (`SANDBOX_LINUX_BINARY`), in the runtime image made from this host's packages
//! (`tests/common/runtime_image.rs`). What a Mac does, on Linux.
//!
//! Needs a Docker engine (CI: `install.sh --test` starts one); skipped, saying so, when
//! none answers or with `SANDBOX_SKIP_DOCKER_TESTS=1`.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::runtime_image::{docker, runtime_image};
use serde_json::Value;

fn engine_available() -> bool {
    if std::env::var("SANDBOX_SKIP_DOCKER_TESTS").as_deref() == Ok("1") {
        eprintln!("skipped: SANDBOX_SKIP_DOCKER_TESTS=1 (this test needs a Docker engine)");
        return false;
    }
    if !docker(&["info"]).status.success() {
        eprintln!("skipped: no Docker engine answers (`docker info` fails)");
        return false;
    }
    true
}

fn sandbox(image: &str, cwd: &std::path::Path) -> Command {
    let mut cmd = Command::new(common::bin());
    cmd.current_dir(cwd)
        .env("SANDBOX_ENGINE", "docker")
        .env("SANDBOX_IMAGE", image)
        .env("SANDBOX_LINUX_BINARY", common::bin());
    cmd
}

/// The tests count the containers left behind: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Containers this feature left behind.
fn leftovers() -> String {
    let out = docker(&["ps", "-aq", "--filter", "label=org.dify-sandbox.engine"]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn run_and_doctor_go_through_the_engine_with_the_same_options_output_and_exit_codes() {
    if !engine_available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let image = runtime_image();
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("job.py"),
        "import os, sys\nprint(os.getcwd(), open('data.csv').read().strip(), sys.stdin.read().strip(), sys.argv[1:])\n\
         open(os.environ['SANDBOX_OUT'] + '/result.txt', 'w').write('made inside')\n\
         print('to stderr', file=sys.stderr)\nsys.exit(3)\n",
    )
    .unwrap();
    let data = outside.path().join("data.csv");
    std::fs::write(&data, "a,b").unwrap();
    let out_dir = outside.path().join("results");

    let mut child = sandbox(&image, dir.path())
        .args(["run", "job.py", "--file"])
        .arg(format!("{}:data.csv", data.display()))
        .arg("--out")
        .arg(&out_dir)
        .args(["--", "x", "y"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/job a,b from stdin ['x', 'y']\n",
        "{stderr}"
    );
    assert_eq!(stderr, "to stderr\n");
    assert_eq!(
        std::fs::read_to_string(out_dir.join("result.txt")).unwrap(),
        "made inside"
    );

    // --json and a limit, as locally.
    let out = sandbox(&image, dir.path())
        .args(["run", "--json", "--timeout", "1", "-l", "python3", "-e"])
        .arg("import time\ntime.sleep(5)")
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["limit"], "timeout", "{v}");
    assert_eq!(out.status.code(), Some(124), "{v}");

    // The jail inside: the snippet cannot exec.
    let out = sandbox(&image, dir.path())
        .args(["run", "-l", "python3", "-e"])
        .arg("import os\nos.execv('/bin/sh', ['sh'])")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not permitted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = sandbox(&image, dir.path())
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["ok"], true, "{v:#}");
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["docker engine", "image", "linux binary", "container level"]
    );
    assert!(
        v["inside"]["isolation"]
            .as_str()
            .unwrap()
            .starts_with("namespaces"),
        "the container gets the namespaces level: {v:#}"
    );

    // A missing image is named, with the command that makes it.
    let out = sandbox("sandbox-no-such-image:none", dir.path())
        .args(["doctor"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cargo xtask image"), "{text}");
    assert_eq!(leftovers(), "", "containers left behind");
}

#[test]
fn serve_runs_in_a_container_says_where_and_stops_cleanly() {
    if !engine_available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(serve_in_a_container());
}

async fn serve_in_a_container() {
    let image = runtime_image();
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let log = dir.path().join("log");
    let mut child = sandbox(&image, dir.path())
        .arg("serve")
        .env("SANDBOX_PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{base}/health")).send().await
            && r.status().is_success()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not serving: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains(&format!("serving at http://127.0.0.1:{port}")),
        "{said}"
    );
    let v: Value = client
        .post(format!("{base}/v1/sandbox/run"))
        .header("X-Api-Key", common::KEY)
        .json(&serde_json::json!({"language": "python3", "code": "print(6 * 7)"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"]["stdout"], "42\n", "{v}");

    common::nix_kill(child.id(), "TERM").unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("in-flight runs finished"), "{said}");
    assert_eq!(leftovers(), "", "containers left behind");
}
