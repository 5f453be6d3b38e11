//! What the API answers to bodies too large or in the wrong encoding, to keys that are
//! nearly right, and how the server and doctor warn about the public default key.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::sync::Arc;

use common::raw::{self, read_answer};
use common::{KEY, Server, sandbox, stdout};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

const LIMIT: usize = 16 << 20;

fn envelope(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn a_body_over_the_limit_gets_a_json_413_naming_the_limit() {
    let s = Server::start(&[]).await;
    let body = Arc::new(vec![b' '; LIMIT + 1]);
    // Declared too large: refused on its Content-Length.
    let declared = raw::exchange(
        s.addr(),
        raw::run_head("application/json", LIMIT + 1),
        body.clone(),
    )
    .await
    .expect("an answer");
    // Chunked, no length declared: refused once it passes the limit.
    let chunked = {
        let mut c = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
        let head = format!(
            "POST /v1/sandbox/run HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        c.write_all(head.as_bytes()).await.unwrap();
        let (mut reader, mut writer) = c.into_split();
        let sending = tokio::spawn(async move {
            let chunk = vec![b' '; 1 << 20];
            for _ in 0..17 {
                let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
                frame.extend_from_slice(&chunk);
                frame.extend_from_slice(b"\r\n");
                if writer.write_all(&frame).await.is_err() {
                    break;
                }
            }
            let _ = writer.write_all(b"0\r\n\r\n").await;
        });
        let answer = read_answer(&mut reader).await.expect("an answer");
        sending.abort();
        answer
    };
    for (what, status, body) in [
        ("declared", declared.status, declared.body),
        ("chunked", chunked.0, chunked.1),
    ] {
        assert_eq!(status, 413, "{what}: {body}");
        let v = envelope(&body);
        assert_eq!(v["code"], -400, "{what}: {v}");
        assert_eq!(v["data"], Value::Null, "{what}: {v}");
        let message = v["message"].as_str().unwrap();
        assert!(
            message.contains(&LIMIT.to_string()) && message.contains("16 MiB"),
            "{what}: {message}"
        );
    }
    // A body of exactly the limit is read.
    let mut fits = br#"{"language":"python3","code":"print(7)"}"#.to_vec();
    fits.resize(LIMIT, b' ');
    let a = raw::exchange(
        s.addr(),
        raw::run_head("application/json", LIMIT),
        Arc::new(fits),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(envelope(&a.body)["data"]["stdout"], "7\n");
}

async fn post_typed(s: &Server, content_type: &str, body: &str) -> (u16, Value) {
    let r = s
        .client
        .post(format!("{}/v1/sandbox/run", s.base))
        .header("X-Api-Key", KEY)
        .header("content-type", content_type)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, envelope(&r.text().await.unwrap()))
}

#[tokio::test]
async fn json_sent_as_text_runs_and_an_unreadable_body_names_the_accepted_types() {
    let s = Server::start(&[]).await;
    let json = r#"  {"language":"python3","code":"print(1)"}"#;
    for content_type in [
        "text/plain",
        "text/plain; charset=utf-8",
        "application/octet-stream",
    ] {
        let (status, v) = post_typed(&s, content_type, json).await;
        assert_eq!(
            (status, &v["code"]),
            (200, &json!(0)),
            "{content_type}: {v}"
        );
        assert_eq!(v["data"]["stdout"], "1\n", "{content_type}: {v}");
    }
    // Declared a form, it is read as one: the JSON is a field name, not the fields.
    let (_, v) = post_typed(&s, "application/x-www-form-urlencoded", json).await;
    assert_eq!(v["code"], -400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("`language`"), "{v}");
    for (content_type, body) in [
        ("text/plain", "print(1)"),
        ("application/json", "{print(1)"),
    ] {
        let (status, v) = post_typed(&s, content_type, body).await;
        assert_eq!((status, &v["code"]), (200, &json!(-400)), "{v}");
        let message = v["message"].as_str().unwrap();
        assert!(
            message.contains("application/json")
                && message.contains("application/x-www-form-urlencoded"),
            "{content_type}: {message}"
        );
    }
}

#[tokio::test]
async fn keys_that_are_nearly_right_are_refused() {
    let s = Server::start(&[("METRICS_AUTH", "true")]).await;
    let wrong = [
        "dify-sandboy",  // same length, last byte differs
        "eify-sandbox",  // same length, first byte differs
        "dify-sandbo",   // a prefix
        "dify-sandbox1", // the key and more
        "DIFY-SANDBOX",
        "",
    ];
    let ask = |path: &str, key: Option<&str>| {
        let mut r = s.client.get(format!("{}{path}", s.base));
        if let Some(k) = key {
            r = r.header("X-Api-Key", k);
        }
        r.send()
    };
    for path in ["/v1/sandbox/dependencies?language=python3", "/metrics"] {
        for key in wrong.iter().map(|k| Some(*k)).chain([None]) {
            let r = ask(path, key).await.unwrap();
            assert_eq!(r.status(), 401, "{path} with {key:?}");
            assert_eq!(r.text().await.unwrap(), "", "{path} with {key:?}");
        }
        let r = ask(path, Some(KEY)).await.unwrap();
        assert_eq!(r.status(), 200, "{path} with the key");
    }
    let data = s.python("print('in')").await;
    assert_eq!(data["stdout"], "in\n");
}

fn api_key_check(env: &[(&str, &str)]) -> Value {
    let port = common::free_port().to_string();
    let mut env = env.to_vec();
    env.push(("SANDBOX_PORT", &port));
    let o = sandbox(&["doctor", "--json"], &env);
    let v: Value = serde_json::from_str(&stdout(&o)).expect("doctor --json");
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "api key")
        .cloned()
        .unwrap_or_else(|| panic!("no api key check in {v:#}"))
}

#[tokio::test]
async fn the_public_default_key_is_warned_about_by_doctor_and_serve() {
    let default = api_key_check(&[]);
    assert_eq!(default["status"], "warning", "{default}");
    assert!(
        default["detail"].as_str().unwrap().contains("dify-sandbox"),
        "{default}"
    );
    assert!(
        default["fix"].as_str().unwrap().contains("API_KEY"),
        "{default}"
    );
    let own = api_key_check(&[("API_KEY", "a-long-secret-of-our-own")]);
    assert_eq!(own["status"], "ok", "{own}");

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("default.log");
    drop(Server::start_logging(&[], &log).await);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("public default") && text.contains("API_KEY"),
        "{text}"
    );
    let log = dir.path().join("own.log");
    let s = Server::start_logging(&[("API_KEY", "a-long-secret-of-our-own")], &log).await;
    let r = s
        .client
        .post(format!("{}/v1/sandbox/run", s.base))
        .header("X-Api-Key", "a-long-secret-of-our-own")
        .json(&json!({"language": "python3", "code": "print(2)"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(s);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("public default"), "{text}");
}
