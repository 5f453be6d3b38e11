//! Node.js snippets through `POST /v1/sandbox/run`, as Dify's JavaScript code node sends them.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::time::{Duration, Instant};

use common::Server;
use serde_json::{Value, json};

async fn node(s: &Server, code: &str) -> Value {
    s.run("nodejs", code).await
}

#[tokio::test]
async fn console_log_json_and_buffers() {
    let s = Server::start(&[]).await;
    let data = node(
        &s,
        "console.log('hello'); console.log(JSON.stringify({a: [1, 2], b: 'ü'}));",
    )
    .await;
    assert_eq!(
        data,
        json!({"stdout": "hello\n{\"a\":[1,2],\"b\":\"ü\"}\n", "stderr": "", "error": "", "exit_code": 0})
    );
    let data = node(&s, "const b = Buffer.from('héllo wörld', 'utf-8').toString('base64'); console.log(b); console.log(Buffer.from(b, 'base64').toString('utf-8'));").await;
    assert_eq!(data["stdout"], "aMOpbGxvIHfDtnJsZA==\nhéllo wörld\n");
}

#[tokio::test]
async fn dify_javascript_code_node_template() {
    let s = Server::start(&[]).await;
    let inputs = json!({"arg1": "数据 ", "arg2": "naïve ✓"}).to_string();
    let b64 = common::base64(inputs.as_bytes());
    let code = format!(
        r#"// declare main function
function main({{arg1, arg2}}) {{
    return {{
        result: arg1 + arg2,
        length: (arg1 + arg2).length,
    }}
}}

// decode and prepare input object
var inputs_obj = JSON.parse(Buffer.from('{b64}', 'base64').toString('utf-8'))

// execute main function
var output_obj = main(inputs_obj)

// convert output to json and print
var output_json = JSON.stringify(output_obj)
var result = `<<RESULT>>${{output_json}}<<RESULT>>`
console.log(result)
"#
    );
    let (_, body) = s
        .run_json(
            json!({"language": "nodejs", "code": code, "preload": "", "enable_network": true}),
        )
        .await;
    assert_eq!(body["code"], 0, "{body}");
    assert_eq!(body["data"]["error"], "", "{body}");
    let out = body["data"]["stdout"].as_str().unwrap();
    let inner = out
        .trim()
        .strip_prefix("<<RESULT>>")
        .unwrap()
        .strip_suffix("<<RESULT>>")
        .unwrap();
    let v: Value = serde_json::from_str(inner).unwrap();
    assert_eq!(v, json!({"result": "数据 naïve ✓", "length": 10}));
}

#[tokio::test]
async fn console_error_stays_in_stderr_with_an_empty_error() {
    let s = Server::start(&[]).await;
    let data = node(&s, "console.log('out'); console.error('warn');").await;
    assert_eq!(data["stdout"], "out\n");
    assert_eq!(data["stderr"], "warn\n");
    assert_eq!(data["error"], "");
    assert_eq!(data["exit_code"], 0);
}

#[tokio::test]
async fn a_thrown_error_fills_error_and_exit_code() {
    let s = Server::start(&[]).await;
    let data = node(&s, "console.log('before');\nthrow new Error('kaboom');").await;
    assert_eq!(data["stdout"], "before\n");
    assert_ne!(data["exit_code"], 0);
    let error = data["error"].as_str().unwrap();
    assert!(error.starts_with("process exited with code 1\n"), "{error}");
    assert!(error.contains("Error: kaboom"), "{error}");
}

#[tokio::test]
async fn a_timer_that_never_ends_is_killed_at_the_timeout() {
    let s = Server::start(&[("WORKER_TIMEOUT", "1")]).await;
    let started = Instant::now();
    let data = node(&s, "console.log('tick'); setInterval(() => {}, 1000);").await;
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(data["exit_code"], -1);
    assert!(
        data["error"].as_str().unwrap().contains("timeout"),
        "{data}"
    );
    assert_eq!(data["stdout"], "tick\n");
    assert!(s.healthy().await);
}

#[tokio::test]
async fn async_code_and_modules_work() {
    let s = Server::start(&[]).await;
    let code = "const crypto = require('crypto');\nconst h = crypto.createHash('sha256').update('abc').digest('hex');\n(async () => { await new Promise(r => setTimeout(r, 50)); console.log(h.slice(0, 8)); })();";
    let data = node(&s, code).await;
    assert_eq!(data["stdout"], "ba7816bf\n", "{data}");
}

#[tokio::test]
async fn a_node_run_ends_as_node_would() {
    // A run announces its exit status once its 'exit' listeners ran, so the answer does
    // not wait for V8's teardown; every way a script ends must still answer as node does
    // (the expectations are `node -e`'s own).
    let s = Server::start(&[]).await;
    let endings = [
        ("console.log('a')", "a\n", 0),
        ("console.log('a'); process.exit(3)", "a\n", 3),
        ("process.exitCode = 5; console.log('b')", "b\n", 5),
        (
            "process.on('exit', c => console.log('bye', c)); console.log('hi')",
            "hi\nbye 0\n",
            0,
        ),
        (
            "setTimeout(() => console.log('later'), 50); console.log('now')",
            "now\nlater\n",
            0,
        ),
        ("Promise.reject(new Error('no'))", "", 1),
        ("process.on('exit', () => { process.exitCode = 9 })", "", 9),
        (
            "process.on('uncaughtException', e => console.log('caught', e.message)); setTimeout(() => { throw new Error('x') }, 1); setTimeout(() => console.log('after'), 20)",
            "caught x\nafter\n",
            0,
        ),
    ];
    for (code, stdout, exit_code) in endings {
        let d = node(&s, code).await;
        assert_eq!(d["stdout"], stdout, "{code}: {d}");
        assert_eq!(d["exit_code"], exit_code, "{code}: {d}");
    }
    let d = node(&s, "Promise.reject(new Error('no'))").await;
    assert!(d["error"].as_str().unwrap().contains("Error: no"), "{d}");
}

#[tokio::test]
async fn a_node_run_that_announces_a_false_end_is_stopped() {
    let s = Server::start(&[("WORKER_TIMEOUT", "20")]).await;
    let started = std::time::Instant::now();
    let code = "const fs = require('fs'); console.log(process.getuid()); fs.writeSync(3, '=0'); fs.closeSync(3); fs.closeSync(1); fs.closeSync(2); for (;;) {}";
    let d = node(&s, code).await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "the answer waited for the timeout: {d}"
    );
    let uid: u32 = d["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .parse()
        .expect("the run's uid");
    assert!(
        common::no_process_of(uid, std::time::Duration::from_secs(3)).await,
        "a run that announced a false end still runs as uid {uid}"
    );
    assert_eq!(node(&s, "console.log('next')").await["stdout"], "next\n");
}
