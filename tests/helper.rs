//! The `__exec` helper on its own, as the server drives it: the worker channel on its
//! stdin, the spec first on it (a little-endian u32 length, then JSON), one JSON report
//! back. A setup step that fails late
//! (after the descriptors are rearranged) must still name itself.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

/// Run the helper on `spec` and return its report; the channel gets no snippet.
fn helper_report(spec: &Value) -> Value {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let json = spec.to_string();
    let mut framed = (json.len() as u32).to_le_bytes().to_vec();
    framed.extend_from_slice(json.as_bytes());
    (&ours).write_all(&framed).expect("send the spec");
    let mut child = Command::new(common::bin())
        .arg("__exec")
        .env_clear()
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the helper");
    let writer = ours.try_clone().expect("clone");
    let mut line = String::new();
    BufReader::new(&ours)
        .read_line(&mut line)
        .expect("read the report");
    drop(writer);
    drop(ours);
    let status = child.wait().expect("wait");
    assert!(status.success(), "helper exit status {status}");
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// The last steps of a helper's jail (descriptors, ids, no_new_privs, exec), for `program`.
fn exec_jail(program: &std::path::Path) -> Value {
    let keep = |fd: &str, at: i32, cloexec: bool| json!({"fd": fd, "at": at, "cloexec": cloexec});
    json!({
        "owner": [],
        "run": [
            {"op": "open_program", "path": program},
            {"op": "descriptors", "park": 512, "keep": [
                keep("stdin", 0, false), keep("stdout", 1, false), keep("stderr", 2, false),
                keep("code", 3, false), keep("error", 1022, true), keep("program", 1023, true)]},
            {"op": "map_exec_page", "address": 0x7_0000_0000u64},
            {"op": "set_gid", "gid": 10999},
            {"op": "set_uid", "uid": 10999},
            {"op": "no_new_privs"},
            {"op": "exec", "argv": ["x"], "env": [], "path_address": 0x7_0000_0000u64},
        ],
    })
}

#[test]
fn a_non_executable_interpreter_is_reported_by_the_exec_step() {
    let files = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let program = files.path().join("not-a-program");
    std::fs::write(&program, b"plain text\n").expect("write");
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let report = helper_report(&exec_jail(&program));
    let message = report["setup_failed"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("a setup failure, got {report}"));
    // The exec is the very last step, long after the descriptors were rearranged.
    assert!(
        message.starts_with("starting the interpreter failed on")
            && message.contains("Permission denied"),
        "{message}"
    );
}

#[test]
fn an_interpreter_missing_from_the_root_is_reported_by_the_open_step() {
    let report = helper_report(&exec_jail(std::path::Path::new(
        "/usr/bin/no-such-interpreter",
    )));
    let message = report["setup_failed"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.starts_with("opening the interpreter failed on /usr/bin/no-such-interpreter"),
        "{report}"
    );
}
