//! The `__exec` helper on its own, as the server drives it: the worker channel on its
//! stdin, the spec first on it (a little-endian u32 length, then JSON), one JSON report
//! back. A setup step that fails late
//! (after the descriptors are rearranged) must still name itself.

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

#[test]
fn a_non_executable_interpreter_is_reported_by_the_exec_step() {
    let mount_point = tempfile::tempdir().expect("tempdir");
    let files = tempfile::tempdir().expect("tempdir");
    let program = files.path().join("not-a-program");
    std::fs::write(&program, b"plain text\n").expect("write");
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let spec = json!({
        "level": "namespaces",
        "root_dir": mount_point.path(),
        "root": {"binds": [program], "symlinks": []},
        "uid": 10999, "gid": 10999, "network": "offline", "root_files": [],
        "limits": {"address_space_bytes": null, "max_processes": 16, "tmp_bytes": 1 << 20,
                   "cpu_seconds": 5, "open_files": 64},
        "cgroup_procs": [], "profile": "python",
        "allowed_syscalls": [], "extra_syscalls": [],
        "program": program, "workdir": "/tmp",
        "argv": ["not-a-program"], "env": [], "mmap_min_addr": null
    });
    let report = helper_report(&spec);
    let message = report["setup_failed"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("a setup failure, got {report}"));
    // The exec is the very last step, long after the descriptors were rearranged.
    assert!(
        message.starts_with("starting the interpreter failed on")
            && message.contains("not-a-program")
            && message.contains("Permission denied"),
        "{message}"
    );
}

#[test]
fn an_interpreter_missing_from_the_root_is_reported_by_the_open_step() {
    let mount_point = tempfile::tempdir().expect("tempdir");
    let spec = json!({
        "level": "namespaces",
        "root_dir": mount_point.path(),
        "root": {"binds": [], "symlinks": []},
        "uid": 10999, "gid": 10999, "network": "offline", "root_files": [],
        "limits": {"address_space_bytes": null, "max_processes": 16, "tmp_bytes": 1 << 20,
                   "cpu_seconds": 5, "open_files": 64},
        "cgroup_procs": [], "profile": "python",
        "allowed_syscalls": [], "extra_syscalls": [],
        "program": "/usr/bin/no-such-interpreter", "workdir": "/tmp",
        "argv": ["x"], "env": [], "mmap_min_addr": null
    });
    let report = helper_report(&spec);
    let message = report["setup_failed"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.starts_with("opening the interpreter failed on /usr/bin/no-such-interpreter"),
        "{report}"
    );
}
