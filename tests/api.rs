//! The Dify sandbox protocol, end to end against a real `sandbox serve`.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::time::{Duration, Instant};

use common::{KEY, Server};
use serde_json::{Value, json};

/// Dify's Python code node: user `main`, then a runner that decodes base64 JSON inputs
/// and prints the result between <<RESULT>> tags.
fn dify_python_node(inputs: &Value) -> String {
    let b64 = common::base64(inputs.to_string().as_bytes());
    format!(
        r#"
def main(arg1: str, arg2: int) -> dict:
    return {{"result": arg1 + "!" * arg2, "n": arg2 * 2}}

import json
from base64 import b64decode

inputs_obj = json.loads(b64decode('{b64}').decode('utf-8'))
output_obj = main(**inputs_obj)
output_json = json.dumps(output_obj, indent=4)
result = f'''<<RESULT>>{{output_json}}<<RESULT>>'''
print(result)
"#
    )
}

fn between_tags(stdout: &str) -> Value {
    let start = stdout.find("<<RESULT>>").expect("opening tag") + "<<RESULT>>".len();
    let end = stdout[start..].find("<<RESULT>>").expect("closing tag") + start;
    serde_json::from_str(&stdout[start..end]).expect("JSON between the tags")
}

#[tokio::test]
async fn health_needs_no_key() {
    let s = Server::start(&[]).await;
    let r = s
        .client
        .get(format!("{}/health", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!("ok"));
}

#[tokio::test]
async fn every_sandbox_endpoint_requires_the_key() {
    let s = Server::start(&[]).await;
    let endpoints = [
        ("POST", "/v1/sandbox/run"),
        ("GET", "/v1/sandbox/dependencies?language=python3"),
        ("POST", "/v1/sandbox/dependencies/update"),
        ("GET", "/v1/sandbox/dependencies/refresh?language=python3"),
    ];
    for (method, path) in endpoints {
        for key in [None, Some("wrong")] {
            let mut req = s
                .client
                .request(method.parse().unwrap(), format!("{}{path}", s.base));
            if let Some(k) = key {
                req = req.header("X-Api-Key", k);
            }
            let r = req
                .json(&json!({"language": "python3", "code": "print(1)"}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401, "{method} {path} with key {key:?}");
            assert!(r.text().await.unwrap().is_empty());
        }
    }
}

#[tokio::test]
async fn plain_print_succeeds_with_the_envelope() {
    let s = Server::start(&[]).await;
    let (status, body) = s
        .run_json(json!({"language": "python3", "code": "print('hello world')"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"code": 0, "message": "success", "data": {"stdout": "hello world\n", "stderr": "", "error": "", "exit_code": 0}})
    );
}

#[tokio::test]
async fn dify_python_code_node_round_trips_through_result_tags() {
    let s = Server::start(&[]).await;
    let code = dify_python_node(&json!({"arg1": "héllo 世界", "arg2": 3}));
    let (_, body) = s
        .run_json(
            json!({"language": "python3", "code": code, "preload": "", "enable_network": true,
                         "dependencies": [{"name": "numpy", "version": ""}]}),
        )
        .await;
    assert_eq!(body["code"], 0, "{body}");
    assert_eq!(body["data"]["error"], "", "{body}");
    let result = between_tags(body["data"]["stdout"].as_str().unwrap());
    assert_eq!(result, json!({"result": "héllo 世界!!!", "n": 6}));
}

#[tokio::test]
async fn dify_jinja2_template_runs_with_its_preload() {
    let s = Server::start(&[("ENABLE_PRELOAD", "true")]).await;
    let inputs = common::base64(
        json!({"name": "Dify", "items": ["a", "b"]})
            .to_string()
            .as_bytes(),
    );
    let code = format!(
        r#"
def main(**inputs):
    template = jinja2.Template('''Hello {{{{ name }}}}: {{% for i in items %}}[{{{{ i }}}}]{{% endfor %}}''')
    return template.render(**inputs)

import jinja2
import json
from base64 import b64decode

inputs_obj = json.loads(b64decode('{inputs}').decode('utf-8'))
output = main(**inputs_obj)
result = f'''<<RESULT>>{{output}}<<RESULT>>'''
print(result)
"#
    );
    let preload = r#"
import jinja2
from base64 import b64decode

def _jinja2_preload_():
    # prepare jinja2 environment, load template and render before to avoid sandbox issue
    template = jinja2.Template('{{s}}')
    template.render(s='a')

if __name__ == '__main__':
    _jinja2_preload_()
"#;
    let (_, body) = s.run_json(json!({"language": "python3", "code": code, "preload": preload, "enable_network": true})).await;
    assert_eq!(body["code"], 0, "{body}");
    assert_eq!(body["data"]["error"], "", "{body}");
    assert_eq!(
        body["data"]["stdout"],
        "<<RESULT>>Hello Dify: [a][b]<<RESULT>>\n"
    );
}

#[tokio::test]
async fn preload_is_ignored_unless_enabled() {
    let s = Server::start(&[]).await;
    let (_, body) = s
        .run_json(json!({"language": "python3", "preload": "print('preloaded')", "code": "print('code')"}))
        .await;
    assert_eq!(body["data"]["stdout"], "code\n");
}

#[tokio::test]
async fn large_stdout_is_returned_intact() {
    let s = Server::start(&[]).await;
    // 304,486 characters and a newline: 304,487 bytes, with a pattern to catch reordering.
    let data = s.python("import sys\nsys.stdout.write(''.join(chr(48 + i % 10) for i in range(304486)) + '\\n')").await;
    let out = data["stdout"].as_str().unwrap();
    assert_eq!(out.len(), 304_487);
    assert!(
        out.bytes()
            .take(304_486)
            .enumerate()
            .all(|(i, b)| b == 48 + (i % 10) as u8)
    );
    assert!(out.ends_with('\n'));
    assert_eq!(data["error"], "");
}

#[tokio::test]
async fn a_snippet_larger_than_a_pipe_reaches_the_interpreter_whole() {
    // Warm and fresh workers both: the second server has no pool.
    for warm in ["2", "0"] {
        let s = Server::start(&[("WARM_WORKERS", warm)]).await;
        // 2 MiB of code, far beyond a pipe's 64 KiB buffer; the length and the last line
        // prove nothing was cut.
        let literal = "x = '".to_string() + &"ab".repeat(1 << 20) + "'\n";
        let data = s.python(&format!("{literal}print('end', len(x))")).await;
        assert_eq!(
            data["stdout"], "end 2097152\n",
            "warm_workers={warm}: {data}"
        );
        let data = s
            .run("nodejs", &format!("{literal}console.log('end', x.length)"))
            .await;
        assert_eq!(
            data["stdout"], "end 2097152\n",
            "warm_workers={warm}: {data}"
        );
    }
}

#[tokio::test]
async fn stderr_is_kept_apart_from_stdout() {
    let s = Server::start(&[]).await;
    let data = s
        .python("import sys\nprint('out')\nprint('err', file=sys.stderr)\nprint('out2')")
        .await;
    assert_eq!(data["stdout"], "out\nout2\n");
    assert_eq!(data["stderr"], "err\n");
    assert_eq!(data["error"], "", "stderr alone is not an error");
    assert_eq!(data["exit_code"], 0);
}

#[tokio::test]
async fn an_exception_fills_error_with_the_exit_code_and_stderr() {
    let s = Server::start(&[]).await;
    let data = s.python("print('before')\nraise ValueError('boom')").await;
    assert_eq!(data["stdout"], "before\n");
    assert_eq!(data["exit_code"], 1);
    let error = data["error"].as_str().unwrap();
    assert!(error.starts_with("process exited with code 1\n"), "{error}");
    assert!(error.contains("ValueError: boom"), "{error}");
    assert!(data["stderr"].as_str().unwrap().contains("Traceback"));
}

#[tokio::test]
async fn a_run_past_worker_timeout_is_killed() {
    let s = Server::start(&[("WORKER_TIMEOUT", "1")]).await;
    let started = Instant::now();
    let data = s
        .python("import time\nprint('started', flush=True)\nwhile True: time.sleep(0.01)")
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(data["exit_code"], -1);
    assert!(
        data["error"].as_str().unwrap().contains("timeout"),
        "{data}"
    );
    assert_eq!(
        data["stdout"], "started\n",
        "output before the kill is kept"
    );
    assert!(s.healthy().await);
}

#[tokio::test]
async fn bad_requests_get_minus_400_naming_the_problem() {
    let s = Server::start(&[]).await;
    let cases: Vec<(Value, &str)> = vec![
        (json!({"language": "python3"}), "code"),
        (json!({"code": "print(1)"}), "language"),
        (json!({"language": "python3", "code": 5}), "code"),
        (
            json!({"language": "python3", "code": "x", "enable_network": "perhaps"}),
            "enable_network",
        ),
        (json!(["not", "an", "object"]), "object"),
    ];
    for (body, word) in cases {
        let (status, env) = s.run_json(body.clone()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(env["code"], -400, "{body} -> {env}");
        assert!(
            env["message"].as_str().unwrap().contains(word),
            "{body} -> {env}"
        );
    }
    let r = s
        .client
        .post(format!("{}/v1/sandbox/run", s.base))
        .header("X-Api-Key", KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let env: Value = r.json().await.unwrap();
    assert_eq!(env["code"], -400);
    assert!(env["message"].as_str().unwrap().contains("JSON"), "{env}");
}

#[tokio::test]
async fn unsupported_language_is_http_400() {
    let s = Server::start(&[]).await;
    let (status, env) = s
        .run_json(json!({"language": "ruby", "code": "puts 1"}))
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        env,
        json!({"code": -400, "message": "unsupported language", "data": null})
    );
}

#[tokio::test]
async fn network_request_is_refused_when_the_server_forbids_network() {
    let s = Server::start(&[("ENABLE_NETWORK", "false")]).await;
    let (status, env) = s
        .run_json(json!({"language": "python3", "code": "print(1)", "enable_network": true}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(env["code"], -400);
    assert_eq!(
        env["message"],
        "network is disabled, please enable it in the configuration"
    );
    let data = s.python("print(1)").await;
    assert_eq!(data["stdout"], "1\n", "runs without network still work");
}

#[tokio::test]
async fn form_encoded_bodies_are_accepted() {
    let s = Server::start(&[]).await;
    let r = s
        .client
        .post(format!("{}/v1/sandbox/run", s.base))
        .header("X-Api-Key", KEY)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("language=python3&code=print%28%22form%22%29&enable_network=false")
        .send()
        .await
        .unwrap();
    let env: Value = r.json().await.unwrap();
    assert_eq!(env["code"], 0, "{env}");
    assert_eq!(env["data"]["stdout"], "form\n");
}

#[tokio::test]
async fn requests_beyond_max_requests_get_503() {
    let s = Server::start(&[("MAX_REQUESTS", "1"), ("MAX_WORKERS", "1")]).await;
    let slow = s.spawn_run(
        json!({"language": "python3", "code": "import time; time.sleep(1.5); print('done')"}),
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, env) = s
        .run_json(json!({"language": "python3", "code": "print(1)"}))
        .await;
    assert_eq!(status, 503);
    assert_eq!(
        env,
        json!({"code": -503, "message": "Too many requests", "data": null})
    );
    let first = slow.await.unwrap();
    assert_eq!(
        first["data"]["stdout"], "done\n",
        "the admitted run is unaffected"
    );
    let data = s.python("print('after')").await;
    assert_eq!(data["stdout"], "after\n", "capacity is released");
}

#[tokio::test]
async fn at_most_max_workers_execute_and_the_rest_wait_in_line() {
    let s = Server::start(&[("MAX_WORKERS", "1"), ("MAX_REQUESTS", "10")]).await;
    // Each run records when it started and ended; with one worker they cannot overlap.
    let code = "import time\na = time.time(); time.sleep(0.5); b = time.time()\nprint(a, b)";
    let (r1, r2, r3) = tokio::join!(s.python(code), s.python(code), s.python(code));
    let mut spans: Vec<(f64, f64)> = [r1, r2, r3]
        .iter()
        .map(|d| {
            let v: Vec<f64> = d["stdout"]
                .as_str()
                .unwrap()
                .split_whitespace()
                .map(|x| x.parse().unwrap())
                .collect();
            (v[0], v[1])
        })
        .collect();
    spans.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    for w in spans.windows(2) {
        assert!(w[1].0 >= w[0].1, "runs overlapped: {spans:?}");
    }
}

#[tokio::test]
async fn forbidden_operations_say_operation_not_permitted() {
    let s = Server::start(&[]).await;
    let data = s
        .python("import os\nos.execv('/bin/sh', ['sh', '-c', 'id'])")
        .await;
    assert_ne!(data["exit_code"], 0);
    assert!(
        data["error"]
            .as_str()
            .unwrap()
            .contains("operation not permitted"),
        "{data}"
    );
}

#[tokio::test]
async fn dependencies_endpoints_list_update_and_refresh() {
    // The shipped requirements file requests nothing extra: every endpoint answers with
    // an empty set. tests/operations.rs installs real packages.
    let reqs = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dependencies/python-requirements.txt"
    );
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/dependencies/package.json");
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(&[
        ("DEPENDENCIES_PATH", reqs),
        ("NODEJS_DEPENDENCIES_PATH", manifest),
        ("SANDBOX_STATE_DIR", state.path().to_str().unwrap()),
    ])
    .await;
    let get = |path: &str| {
        let url = format!("{}{path}", s.base);
        let client = s.client.clone();
        async move {
            let r = client
                .get(url)
                .header("X-Api-Key", KEY)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    for path in [
        "/v1/sandbox/dependencies?language=python3",
        "/v1/sandbox/dependencies/refresh?language=python3",
        "/v1/sandbox/dependencies?language=nodejs",
        "/v1/sandbox/dependencies/refresh?language=nodejs",
    ] {
        let (status, env) = get(path).await;
        assert_eq!(status, 200);
        assert_eq!(
            env,
            json!({"code": 0, "message": "success", "data": {"dependencies": []}}),
            "{path}"
        );
    }
    let (status, env) = get("/v1/sandbox/dependencies?language=ruby").await;
    assert_eq!(
        (status, env["message"].as_str()),
        (400, Some("unsupported language"))
    );
    let (status, env) = get("/v1/sandbox/dependencies").await;
    assert_eq!((status, env["code"].as_i64()), (200, Some(-400)));
    let update = s
        .post_json(
            "/v1/sandbox/dependencies/update",
            json!({"language": "python3"}),
        )
        .await;
    assert_eq!(update, json!({"code": 0, "message": "success", "data": {}}));
}

#[tokio::test]
async fn internal_failures_answer_minus_500_and_the_server_survives() {
    let state = tempfile::tempdir().unwrap();
    let log = state.path().join("log");
    // No warm workers: each run must build its sandbox when it is asked for.
    let s = Server::start_logging(
        &[
            ("SANDBOX_STATE_DIR", state.path().to_str().unwrap()),
            ("WARM_WORKERS", "0"),
            ("SANDBOX_LOG", "info"),
        ],
        &log,
    )
    .await;
    // The start's probe runs are over (a server whose every probe fails stops).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("language ready")
        .count()
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the start probes never passed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Remove the mount point runs are built on: the sandbox cannot be set up. (Node:
    // Python's fork server built its root once, at start.)
    std::fs::remove_dir(state.path().join("rootfs")).unwrap();
    let (status, env) = s
        .run_json(json!({"language": "nodejs", "code": "console.log(1)"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(env["code"], -500, "{env}");
    assert!(
        env["message"].as_str().unwrap().contains("sandbox root"),
        "{env}"
    );
    std::fs::create_dir(state.path().join("rootfs")).unwrap();
    assert_eq!(s.python("print(2)").await["stdout"], "2\n");
}

#[tokio::test]
async fn sigterm_drains_in_flight_runs_then_exits() {
    let s = Server::start(&[]).await;
    let run = s.spawn_run(
        json!({"language": "python3", "code": "import time; time.sleep(1); print('finished')"}),
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let pid = s.pid();
    assert!(
        !common::run_cgroups_of(pid).is_empty(),
        "the running snippet and warm workers have cgroups"
    );
    let status = tokio::task::spawn_blocking(move || s.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let body = run.await.unwrap();
    assert_eq!(body["data"]["stdout"], "finished\n", "{body}");
    // Nothing of the server's runs or warm workers is left behind: a cgroup can only
    // be removed once no process is in it.
    let leftovers = common::run_cgroups_of(pid);
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

#[tokio::test]
async fn a_client_that_goes_away_leaves_nothing_behind() {
    let s = Server::start(&[("WARM_WORKERS", "0")]).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let r = impatient
        .post(format!("{}/v1/sandbox/run", s.base))
        .header("X-Api-Key", KEY)
        .json(&json!({"language": "python3", "code": "import time; time.sleep(3)"}))
        .send()
        .await;
    assert!(r.is_err(), "the client gave up first");
    // The cancelled run's sandbox is torn down: no cgroup (so no process) is left.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !common::run_cgroups_of(s.pid()).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "left behind: {:?}",
            common::run_cgroups_of(s.pid())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.python("print('next')").await["stdout"], "next\n");
}
