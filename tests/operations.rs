//! Production operation: real Python dependencies from PyPI, metrics, run logs.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::time::{Duration, Instant};

use common::{KEY, Server};
use serde_json::{Value, json};

async fn get(s: &Server, path: &str, key: Option<&str>) -> (u16, String) {
    let mut req = s.client.get(format!("{}{path}", s.base));
    if let Some(k) = key {
        req = req.header("X-Api-Key", k);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn requirements_are_installed_imported_listed_and_switched_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let reqs = dir.path().join("python-requirements.txt");
    std::fs::write(&reqs, "six==1.16.0\n").unwrap();
    let state = dir.path().join("state");
    let s = Server::start(&[
        ("SANDBOX_STATE_DIR", state.to_str().unwrap()),
        ("DEPENDENCIES_PATH", reqs.to_str().unwrap()),
    ])
    .await;
    // Installed at start, in the background.
    let deadline = Instant::now() + Duration::from_secs(180);
    while !s
        .listed("python3")
        .await
        .contains(&("six".into(), "1.16.0".into()))
    {
        assert!(
            Instant::now() < deadline,
            "six was not installed: {:?}",
            s.listed("python3").await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let probe = "import six\nprint(six.__version__, six.__file__)";
    let out = s.python(probe).await["stdout"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(out.starts_with("1.16.0 "), "{out}");
    assert!(
        out.contains("/python-packages/"),
        "imported from the sandbox's own package directory: {out}"
    );

    // A bad line: pip's message is reported and the previous set stays in use.
    std::fs::write(
        &reqs,
        "six==1.16.0\nno-such-package-for-the-sandbox-tests==9.9.9\n",
    )
    .unwrap();
    let update = s
        .post_json(
            "/v1/sandbox/dependencies/update",
            json!({"language": "python3"}),
        )
        .await;
    let env = update;
    assert_eq!(env["code"], -500, "{env}");
    let msg = env["message"].as_str().unwrap();
    assert!(
        msg.contains("no-such-package-for-the-sandbox-tests"),
        "pip's message names the requirement: {msg}"
    );
    assert!(
        s.python(probe).await["stdout"]
            .as_str()
            .unwrap()
            .starts_with("1.16.0 ")
    );

    // A new version: refresh installs it beside the old one and switches.
    std::fs::write(&reqs, "six==1.15.0\n").unwrap();
    let (status, body) = get(
        &s,
        "/v1/sandbox/dependencies/refresh?language=python3",
        Some(KEY),
    )
    .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], 0, "{v}");
    assert!(
        v["data"]["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["name"] == "six" && d["version"] == "1.15.0"),
        "{v}"
    );
    assert!(
        s.python(probe).await["stdout"]
            .as_str()
            .unwrap()
            .starts_with("1.15.0 ")
    );
    // The host interpreter's own site-packages were never touched.
    let host = std::process::Command::new("python3").args(["-c", "import os, sys; print(any(os.path.exists(os.path.join(p, 'no-such-package-for-the-sandbox-tests')) for p in sys.path))"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&host.stdout).trim(), "False");
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_runs_by_outcome() {
    let s = Server::start(&[("WORKER_TIMEOUT", "1"), ("MAX_OUTPUT_BYTES", "1000")]).await;
    s.python("print(1)").await;
    s.python("raise SystemExit(3)").await;
    s.python("while True: pass").await;
    s.python("print('x' * 5000)").await;
    s.run("nodejs", "console.log(1)").await;
    let (_, env) = s.run_json(json!({"language": "python3"})).await;
    assert_eq!(env["code"], -400);
    let (status, text) = get(&s, "/metrics", None).await;
    assert_eq!(status, 200, "unauthenticated by default");
    for (series, want) in [
        (
            r#"sandbox_runs_total{language="python3",outcome="ok"}"#,
            1.0,
        ),
        (
            r#"sandbox_runs_total{language="python3",outcome="error"}"#,
            1.0,
        ),
        (
            r#"sandbox_runs_total{language="python3",outcome="timeout"}"#,
            1.0,
        ),
        (
            r#"sandbox_runs_total{language="python3",outcome="output"}"#,
            1.0,
        ),
        (r#"sandbox_runs_total{language="nodejs",outcome="ok"}"#, 1.0),
        (
            r#"sandbox_runs_total{language="unknown",outcome="invalid"}"#,
            1.0,
        ),
        (
            r#"sandbox_run_duration_seconds_count{language="python3"}"#,
            4.0,
        ),
        ("sandbox_requests_in_flight", 0.0),
        ("sandbox_queue_length", 0.0),
    ] {
        assert_eq!(metric(&text, series), want, "{series}\n{text}");
    }
    assert!(
        text.contains(r#"sandbox_warm_workers{language="python3",network="true"}"#),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_can_require_the_key() {
    let s = Server::start(&[("METRICS_AUTH", "true")]).await;
    assert_eq!(get(&s, "/metrics", None).await.0, 401);
    let (status, text) = get(&s, "/metrics", Some(KEY)).await;
    assert_eq!(status, 200);
    assert!(text.contains("sandbox_queue_length"), "{text}");
}

#[tokio::test]
async fn one_json_log_line_per_run_without_code_or_output() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let s = Server::start_logging(
        &[
            ("LOG_FORMAT", "json"),
            ("SANDBOX_LOG", "info"),
            ("LOG_PATH", ""),
        ],
        &log,
    )
    .await;
    s.python("print('TOP-SECRET-OUTPUT')  # TOP-SECRET-CODE")
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let runs: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "run finished")
        .collect();
    assert_eq!(runs.len(), 1, "{text}");
    let f = &runs[0]["fields"];
    assert_eq!(f["language"], "python3");
    assert_eq!(f["outcome"], "ok");
    assert_eq!(f["exit_code"], 0);
    assert!(f["duration_ms"].is_number());
    assert!(f["request_id"].is_number(), "{text}");
    assert!(
        !text.contains("TOP-SECRET"),
        "code and output stay out of the log unless debug is on"
    );
}
