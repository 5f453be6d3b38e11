//! `sandbox run`, as a CI pipeline calls it: every option and every exit code, including
//! bad input, for real (root, real interpreters, real sandbox).
//!
//! Transcript of the exit codes these tests pin down:
//!
//! ```text
//! $ sandbox run ok.py                          -> 0, the snippet's output
//! $ sandbox run -l python3 -e 'exit(7)'         -> 7 (the snippet's own code)
//! $ sandbox run --timeout 1 spin.py             -> 124, "sandbox: timeout: ..."
//! $ sandbox run -l ruby -e 'puts 1'             -> 2, "unsupported language"
//! $ sandbox run missing.py                      -> 2, "cannot read missing.py"
//! $ sandbox run --timeout -1 ok.py              -> 2, "--timeout must be a positive number"
//! $ sandbox run big.py   (20 MB)                -> 2, "snippets are limited to 16777216 bytes"
//! $ (as nobody) sandbox run ok.py               -> rootless mode: see tests/rootless.rs
//! $ sandbox run --server http://127.0.0.1:1 ... -> 125, "cannot reach the sandbox server"
//! $ sandbox run job.py -- a b < data            -> stdin, argv, files: see tests/cli_ci.rs
//! ```

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Server, bin, sandbox, sandbox_with_stdin, stderr, stdout};
use serde_json::Value;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

fn json_of(o: &Output) -> Value {
    serde_json::from_str(stdout(o).trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(o), stderr(o)))
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

/// As `nobody`: what a user without root gets.
fn as_nobody(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir("/")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap()
}

// --- the snippet's own result ---

#[test]
fn a_python_file_runs_by_its_extension() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "script.py",
        "import sys\nprint('out')\nprint('err', file=sys.stderr)\n",
    );
    let o = sandbox(&["run", &f], &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "out\n");
    assert_eq!(stderr(&o), "err\n");
}

#[test]
fn a_javascript_file_runs_by_its_extension() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["app.js", "app.mjs", "app.cjs"] {
        let f = write(
            dir.path(),
            name,
            "console.log('js ' + (1 + 1)); console.error('e');",
        );
        let o = sandbox(&["run", &f], &[]);
        assert_eq!(code(&o), 0, "{name}: {}", stderr(&o));
        assert_eq!(stdout(&o), "js 2\n", "{name}");
        assert_eq!(stderr(&o), "e\n", "{name}");
    }
}

#[test]
fn language_flag_overrides_the_extension() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "snippet.txt", "console.log(typeof process)");
    let o = sandbox(&["run", "-l", "nodejs", &f], &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "object\n");
}

#[test]
fn stdin_with_a_dash() {
    let o = sandbox_with_stdin(
        &["run", "-l", "python3", "-"],
        b"print(sum(range(10)))\n",
        &[],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "45\n");
}

#[test]
fn eval_with_each_language_name() {
    for (lang, code_text) in [
        ("nodejs", "console.log(1)"),
        ("node", "console.log(1)"),
        ("js", "console.log(1)"),
        ("python3", "print(1)"),
        ("python", "print(1)"),
        ("py", "print(1)"),
    ] {
        let o = sandbox(&["run", "-l", lang, "-e", code_text], &[]);
        assert_eq!(code(&o), 0, "{lang}: {}", stderr(&o));
        assert_eq!(stdout(&o), "1\n", "{lang}");
    }
}

#[test]
fn the_snippets_exit_code_is_the_exit_code() {
    let o = sandbox(
        &["run", "-l", "python3", "-e", "import sys; sys.exit(7)"],
        &[],
    );
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    let o = sandbox(&["run", "-l", "nodejs", "-e", "process.exit(9)"], &[]);
    assert_eq!(code(&o), 9, "{}", stderr(&o));
    // An uncaught exception: the interpreter's own 1, with the traceback on stderr.
    let o = sandbox(
        &["run", "-l", "python3", "-e", "raise ValueError('boom')"],
        &[],
    );
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("ValueError: boom"), "{}", stderr(&o));
    // A blocked operation is the snippet's failure, explained, not a sandbox failure.
    let o = sandbox(
        &["run", "-l", "python3", "-e", "import os; os.system('id')"],
        &[],
    );
    assert_ne!(code(&o), 125, "{}", stderr(&o));
}

#[test]
fn output_is_streamed_as_it_comes() {
    let mut child = Command::new(bin())
        .args([
            "run",
            "-l",
            "python3",
            "-e",
            "import time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')",
        ])
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    out.read_exact(&mut buf).unwrap();
    let first_after = started.elapsed();
    assert_eq!(&buf, b"first\n");
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let total = started.elapsed();
    assert!(child.wait().unwrap().success());
    assert_eq!(rest, "second\n");
    assert!(
        total - first_after >= Duration::from_millis(1000),
        "the first line came at {first_after:?}, the end at {total:?}: not streamed"
    );
}

// --- limits ---

#[test]
fn timeout_exits_124() {
    let started = Instant::now();
    let o = sandbox(
        &[
            "run",
            "--timeout",
            "1",
            "-l",
            "python3",
            "-e",
            "while True: pass",
        ],
        &[],
    );
    let took = started.elapsed();
    assert_eq!(code(&o), 124, "{}", stderr(&o));
    assert!(stderr(&o).contains("sandbox: timeout"), "{}", stderr(&o));
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn fractional_timeout_and_json_name_the_limit() {
    let o = sandbox(
        &[
            "run",
            "--json",
            "--timeout",
            "0.5",
            "-l",
            "nodejs",
            "-e",
            "for(;;){}",
        ],
        &[],
    );
    assert_eq!(code(&o), 124, "{}", stderr(&o));
    let v = json_of(&o);
    assert_eq!(v["limit"], "timeout");
    assert_eq!(v["exit_code"], -1);
    assert!(v["error"].as_str().unwrap().starts_with("timeout"), "{v}");
    let ms = v["duration_ms"].as_f64().unwrap();
    assert!((450.0..3000.0).contains(&ms), "{ms}");
}

#[test]
fn the_timeout_defaults_to_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "c.yaml", "worker_timeout: 1\n");
    let started = Instant::now();
    let o = sandbox(
        &[
            "run",
            "--config",
            &cfg,
            "-l",
            "python3",
            "-e",
            "import time; time.sleep(30)",
        ],
        &[],
    );
    assert_eq!(code(&o), 124, "{}", stderr(&o));
    assert!(started.elapsed() < Duration::from_secs(10));
    // ... and to WORKER_TIMEOUT, which overrides the embedded default.
    let o = sandbox(
        &["run", "-l", "python3", "-e", "import time; time.sleep(30)"],
        &[("WORKER_TIMEOUT", "1")],
    );
    assert_eq!(code(&o), 124, "{}", stderr(&o));
}

#[test]
fn memory_limit_is_named() {
    let o = sandbox(
        &[
            "run",
            "--json",
            "--memory",
            "64",
            "-l",
            "python3",
            "-e",
            "b = bytearray(400 * 1024 * 1024)\nprint(len(b))",
        ],
        &[],
    );
    let v = json_of(&o);
    assert_eq!(v["limit"], "memory", "{v}");
    assert_ne!(code(&o), 0);
    assert_eq!(Some(code(&o)), v["exit_code"].as_i64().map(|c| c as i32));
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("memory limit exceeded"),
        "{v}"
    );
    // Without --json the note goes to stderr.
    let o = sandbox(
        &[
            "run",
            "--memory",
            "64",
            "-l",
            "python3",
            "-e",
            "b = bytearray(400 * 1024 * 1024)",
        ],
        &[],
    );
    assert!(
        stderr(&o).contains("sandbox: memory limit exceeded"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn output_limit_is_named() {
    let o = sandbox(
        &[
            "run",
            "--json",
            "--max-output",
            "1000",
            "-l",
            "python3",
            "-e",
            "print('x' * 100000)",
        ],
        &[],
    );
    let v = json_of(&o);
    assert_eq!(v["limit"], "output", "{v}");
    assert!(v["stdout"].as_str().unwrap().len() <= 1000);
    assert_ne!(code(&o), 0);
}

#[test]
fn process_limit_is_named() {
    let snippet = "import threading, time\nts = [threading.Thread(target=time.sleep, args=(1,)) for _ in range(32)]\nfor t in ts: t.start()\n";
    let o = sandbox(
        &[
            "run",
            "--json",
            "--max-processes",
            "4",
            "-l",
            "python3",
            "-e",
            snippet,
        ],
        &[],
    );
    let v = json_of(&o);
    assert_eq!(v["limit"], "processes", "{v}");
    assert_ne!(code(&o), 0);
}

#[test]
fn tmp_size_limits_the_private_tmp() {
    let snippet = "open('/tmp/f', 'wb').write(b'x' * (4 << 20))";
    let o = sandbox(
        &["run", "--tmp-size", "1", "-l", "python3", "-e", snippet],
        &[],
    );
    assert_ne!(code(&o), 0);
    // The private /tmp is full, or RLIMIT_FSIZE (sized like it) stops the write first.
    assert!(
        stderr(&o).contains("No space left on device") || stderr(&o).contains("File too large"),
        "{}",
        stderr(&o)
    );
    let o = sandbox(
        &["run", "--tmp-size", "16", "-l", "python3", "-e", snippet],
        &[],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn network_only_with_the_flag() {
    common::netlab::lab();
    let snippet = format!(
        "import socket\ns = socket.create_connection(('{}', {}), timeout=3)\ns.send(b'cli')\nprint(s.recv(16).decode())",
        common::netlab::EXT,
        common::netlab::TCP_PORT
    );
    let o = sandbox(&["run", "--network", "-l", "python3", "-e", &snippet], &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "pong:cli\n");
    let o = sandbox(&["run", "-l", "python3", "-e", &snippet], &[]);
    assert_ne!(code(&o), 0, "connected without --network");
    // The operator's enable_network: false wins.
    let o = sandbox(
        &["run", "--network", "-l", "python3", "-e", &snippet],
        &[("ENABLE_NETWORK", "false")],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("enable_network"), "{}", stderr(&o));
}

#[test]
fn json_has_the_api_fields_plus_duration_and_limit() {
    let o = sandbox(
        &[
            "run",
            "--json",
            "-l",
            "python3",
            "-e",
            "import sys; print('o'); print('e', file=sys.stderr); sys.exit(3)",
        ],
        &[],
    );
    assert_eq!(code(&o), 3);
    assert_eq!(stderr(&o), "", "nothing but the JSON object is printed");
    let v = json_of(&o);
    assert_eq!(v["stdout"], "o\n");
    assert_eq!(v["stderr"], "e\n");
    assert_eq!(v["exit_code"], 3);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("process exited with code 3")
    );
    assert!(v["limit"].is_null());
    assert!(v["duration_ms"].as_f64().unwrap() > 0.0);
}

// --- bad input: exit code 2, the reason on stderr ---

fn assert_usage(o: &Output, needle: &str) {
    assert_eq!(code(o), 2, "stderr: {}", stderr(o));
    assert!(
        stderr(o).contains(needle),
        "expected {needle:?} in: {}",
        stderr(o)
    );
    assert_eq!(stdout(o), "");
}

#[test]
fn unknown_language() {
    assert_usage(
        &sandbox(&["run", "-l", "ruby", "-e", "puts 1"], &[]),
        "unsupported language \"ruby\"",
    );
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "x.rb", "puts 1");
    assert_usage(&sandbox(&["run", &f], &[]), "cannot tell the language of");
    assert_usage(&sandbox(&["run", "-e", "print(1)"], &[]), "pass --language");
}

#[test]
fn missing_file() {
    assert_usage(
        &sandbox(&["run", "/nonexistent/script.py"], &[]),
        "cannot read /nonexistent/script.py",
    );
}

#[test]
fn unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("dir.py");
    std::fs::create_dir(&d).unwrap();
    assert_usage(
        &sandbox(&["run", d.to_str().unwrap()], &[]),
        "is a directory",
    );
    let f = dir.path().join("latin1.py");
    std::fs::write(&f, b"print('caf\xe9')").unwrap();
    assert_usage(
        &sandbox(&["run", f.to_str().unwrap()], &[]),
        "is not UTF-8 text",
    );
    // Root reads any mode; a user cannot read a mode-000 file.
    let shared = tempfile::Builder::new().tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(
        shared.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let f = shared.path().join("secret.py");
    std::fs::write(&f, "print(1)").unwrap();
    std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let o = as_nobody(&["run", f.to_str().unwrap()]);
    assert_usage(&o, "Permission denied");
}

#[test]
fn bad_timeouts() {
    for t in ["-1", "0", "nan", "inf", "1e9"] {
        for args in [
            vec!["run", "--timeout", t, "-l", "python3", "-e", "print(1)"],
            vec!["run", "-l", "python3", "-e", "print(1)", "--timeout", t],
        ] {
            assert_usage(&sandbox(&args, &[]), "--timeout must be a positive number");
        }
    }
    let arg = "--timeout=-2";
    assert_usage(
        &sandbox(&["run", arg, "-l", "python3", "-e", "print(1)"], &[]),
        "got -2",
    );
    assert_usage(
        &sandbox(
            &["run", "--timeout", "soon", "-l", "python3", "-e", "1"],
            &[],
        ),
        "invalid value 'soon'",
    );
}

#[test]
fn bad_limits() {
    for (flag, value) in [
        ("--memory", "-5"),
        ("--memory", "8"),
        ("--max-processes", "0"),
        ("--max-output", "-1"),
        ("--tmp-size", "0"),
    ] {
        assert_usage(
            &sandbox(&["run", flag, value, "-l", "python3", "-e", "1"], &[]),
            &format!("{flag} must be between"),
        );
    }
}

#[test]
fn a_file_of_20_mb() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("big.py");
    std::fs::write(&f, "#".repeat(20 << 20)).unwrap();
    assert_usage(
        &sandbox(&["run", f.to_str().unwrap()], &[]),
        "snippets are limited to 16777216 bytes",
    );
    let o = sandbox_with_stdin(&["run", "-l", "python3", "-"], &vec![b'#'; 20 << 20], &[]);
    assert_usage(&o, "snippets are limited to 16777216 bytes");
}

#[test]
fn nothing_or_too_much_to_run() {
    assert_usage(&sandbox(&["run", "-l", "python3"], &[]), "nothing to run");
    assert_usage(
        &sandbox(&["run", "-l", "python3", "-e", "1", "x.py"], &[]),
        "either a file or --eval",
    );
    let o = sandbox(&["run", "--no-such-flag", "x.py"], &[]);
    assert_eq!(code(&o), 2);
}

#[test]
fn an_interpreter_that_does_not_run_is_a_configuration_error() {
    let o = sandbox(
        &["run", "-l", "python3", "-e", "print(1)"],
        &[("PYTHON_PATH", "/nonexistent/python3")],
    );
    assert_usage(&o, "/nonexistent/python3");
}

// --- the sandbox cannot start: 125 ---

#[test]
fn an_unwritable_state_directory_exits_125() {
    let o = sandbox(
        &["run", "-l", "python3", "-e", "print(1)"],
        &[("SANDBOX_STATE_DIR", "/proc/sandbox-state")],
    );
    assert_eq!(code(&o), 125, "{}", stderr(&o));
    assert!(stderr(&o).contains("SANDBOX_STATE_DIR"), "{}", stderr(&o));
}

#[test]
fn help_documents_the_exit_codes() {
    let o = sandbox(&["run", "--help"], &[]);
    assert_eq!(code(&o), 0);
    let h = stdout(&o);
    for needle in [
        "124",
        "125",
        "--server",
        "--key",
        "--timeout",
        "--memory",
        "--network",
        "--json",
        "[env: API_KEY",
        "--stdin <FILE>",
        "--env <NAME=VALUE>",
        "--env-file <FILE>",
        "--file <PATH[:DEST]>",
        "--dir <DIR[:DEST]>",
        "--out <DIR>",
        "--max-input <MB>",
        "[ARGS]...",
        "-- --since 2024 < in.csv",
    ] {
        assert!(h.contains(needle), "{needle} missing from:\n{h}");
    }
    assert!(!h.contains("API_KEY=secret-value"));
}

// --- --server: the same output and exit codes from a remote `sandbox serve` ---

#[tokio::test(flavor = "multi_thread")]
async fn remote_runs_match_local_ones() {
    let server = Server::start(&[("WORKER_TIMEOUT", "1"), ("API_KEY", "k-remote")]).await;
    let base = server.base.clone();
    let key = [("API_KEY", "k-remote")];

    let o = sandbox(
        &[
            "run",
            "--server",
            &base,
            "-l",
            "python3",
            "-e",
            "import sys; print('hi'); print('e', file=sys.stderr); sys.exit(5)",
        ],
        &key,
    );
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert_eq!(stdout(&o), "hi\n");
    assert_eq!(stderr(&o), "e\n");

    // --key on the command line, a file by extension, a URL without scheme.
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "app.js", "console.log('remote js')");
    let bare = base.trim_start_matches("http://").to_string();
    let o = sandbox(&["run", "--server", &bare, "--key", "k-remote", &f], &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "remote js\n");

    // The server's timeout: 124, and --json infers the limit.
    let o = sandbox(
        &[
            "run",
            "--server",
            &base,
            "--json",
            "-l",
            "python3",
            "-e",
            "while True: pass",
        ],
        &key,
    );
    assert_eq!(code(&o), 124, "{}", stderr(&o));
    let v = json_of(&o);
    assert_eq!(v["limit"], "timeout");
    assert_eq!(v["exit_code"], -1);
    assert!(v["duration_ms"].as_f64().unwrap() >= 900.0, "{v}");
    let o = sandbox(
        &[
            "run",
            "--server",
            &base,
            "-l",
            "python3",
            "-e",
            "while True: pass",
        ],
        &key,
    );
    assert_eq!(code(&o), 124);
    assert!(stderr(&o).contains("sandbox: timeout"), "{}", stderr(&o));

    // Stdin works remotely too.
    let o = sandbox_with_stdin(
        &["run", "--server", &base, "-l", "python3", "-"],
        b"print(6 * 7)",
        &key,
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "42\n");

    // The server from the variable, and the client is this process whatever the engine
    // (macOS's default, docker, here with no engine to reach): no container is asked.
    let o = sandbox(
        &["run", "-l", "python3", "-e", "print('via env')"],
        &[
            ("API_KEY", "k-remote"),
            ("SANDBOX_SERVER", base.as_str()),
            ("SANDBOX_ENGINE", "docker"),
            ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "via env\n");

    // A user without root can use a server.
    let o = Command::new(bin())
        .args([
            "run",
            "--server",
            &base,
            "-l",
            "nodejs",
            "-e",
            "console.log(3)",
        ])
        .env("API_KEY", "k-remote")
        .current_dir("/")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "3\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_failures_have_their_exit_codes() {
    let server = Server::start(&[("ENABLE_NETWORK", "false")]).await;
    let base = server.base.clone();

    // Wrong key: the sandbox did not run the snippet -> 125, saying which key to set.
    let o = sandbox(
        &[
            "run", "--server", &base, "--key", "wrong", "-l", "python3", "-e", "print(1)",
        ],
        &[],
    );
    assert_eq!(code(&o), 125, "{}", stderr(&o));
    assert!(stderr(&o).contains("refused the API key"), "{}", stderr(&o));

    // The default key is the server's default.
    let o = sandbox(
        &["run", "--server", &base, "-l", "python3", "-e", "print(1)"],
        &[],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    // The server refuses network: bad input -> 2.
    let o = sandbox(
        &[
            "run",
            "--server",
            &base,
            "--network",
            "-l",
            "python3",
            "-e",
            "print(1)",
        ],
        &[],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("network is disabled"), "{}", stderr(&o));

    // Local limits do not travel: refused rather than silently ignored.
    let o = sandbox(
        &[
            "run",
            "--server",
            &base,
            "--timeout",
            "2",
            "-l",
            "python3",
            "-e",
            "1",
        ],
        &[],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("local runs only"), "{}", stderr(&o));
    drop(server);

    // Nobody listening -> 125.
    let port = common::free_port();
    let o = sandbox(
        &[
            "run",
            "--server",
            &format!("http://127.0.0.1:{port}"),
            "-l",
            "python3",
            "-e",
            "1",
        ],
        &[],
    );
    assert_eq!(code(&o), 125, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot reach the sandbox server"),
        "{}",
        stderr(&o)
    );
    // A scheme other than http and https is refused up front (https: tests/remote_tls.rs).
    let o = sandbox(
        &[
            "run",
            "--server",
            "ftp://127.0.0.1:1",
            "-l",
            "python3",
            "-e",
            "1",
        ],
        &[],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
}

/// Through `--server` a job has the world a local run gives it: its script at /job (so a
/// traceback shows its source lines), /job as its cwd, `SANDBOX_OUT`, the same
/// /etc/resolv.conf; Dify's own endpoint is left as it was.
#[tokio::test(flavor = "multi_thread")]
async fn a_remote_job_has_the_world_of_a_local_one() {
    let server = Server::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let job = write(
        dir.path(),
        "job.py",
        "import os, sys\nprint(os.getcwd(), os.environ.get('SANDBOX_OUT'), sys.argv)\nprint(repr(open('/etc/resolv.conf').read()))\ndef f():\n    raise ValueError('no')\nf()\n",
    );
    let local = sandbox(&["run", &job, "--", "a"], &[]);
    let remote = sandbox(&["run", "--server", &server.base, &job, "--", "a"], &[]);
    assert_eq!(code(&local), 1, "{}", stderr(&local));
    assert!(
        stdout(&local).starts_with("/job /tmp/out ['job.py', 'a']\n"),
        "{}",
        stdout(&local)
    );
    assert_eq!(
        (code(&remote), stdout(&remote), stderr(&remote)),
        (code(&local), stdout(&local), stderr(&local))
    );
    assert!(
        stderr(&remote).contains("    raise ValueError('no')\n"),
        "source lines: {}",
        stderr(&remote)
    );
    // Node, an ES module by its extension, the same way.
    let mjs = write(
        dir.path(),
        "job.mjs",
        "import fs from 'fs';\nconsole.log(process.cwd(), process.env.SANDBOX_OUT, typeof fs.readFileSync);\n",
    );
    let remote = sandbox(&["run", "--server", &server.base, &mjs], &[]);
    assert_eq!(code(&remote), 0, "{}", stderr(&remote));
    assert_eq!(stdout(&remote), "/job /tmp/out function\n");
    // Dify's endpoint: what it always gave.
    let data = server
        .python("import os\nprint(os.getcwd(), os.environ.get('SANDBOX_OUT'))")
        .await;
    assert_eq!(data["stdout"], "/tmp None\n", "{data}");
}

/// A server from before the job endpoint (here: a real one behind a proxy that answers
/// 404 there) still runs the job, through Dify's endpoint with the invocation inside the
/// code: argv, variables, stdin, exit code and line numbers alike (the source lines, not
/// being in a file there, are not shown).
#[tokio::test(flavor = "multi_thread")]
async fn a_server_without_the_job_endpoint_gets_difys() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start(&[]).await;
    let upstream = server.addr().to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let old = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                // The request line decides; anything else passes through untouched.
                let mut head = vec![0u8; 64];
                let Ok(n) = client.read(&mut head).await else {
                    return;
                };
                head.truncate(n);
                if head.starts_with(b"POST /v1/sandbox/job ") {
                    let _ = client
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
                let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                if up.write_all(&head).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let job = write(
        dir.path(),
        "job.py",
        "import os, sys\nprint(sys.argv, os.environ['MODE'], sys.stdin.read())\ndef f():\n    raise ValueError('no')\nf()\n",
    );
    let o = tokio::task::spawn_blocking(move || {
        sandbox_with_stdin(
            &["run", "--server", &old, &job, "--env", "MODE=ci", "--", "a"],
            b"in",
            &[],
        )
    })
    .await
    .unwrap();
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert_eq!(stdout(&o), "['job.py', 'a'] ci in\n");
    assert!(
        stderr(&o).contains("/job/job.py\", line 4, in f\n")
            && stderr(&o).ends_with("ValueError: no\n"),
        "{}",
        stderr(&o)
    );
}

/// A remote run's output comes as it is produced, not all at the end.
#[tokio::test(flavor = "multi_thread")]
async fn remote_output_is_streamed_as_it_comes() {
    let server = Server::start(&[("WORKER_TIMEOUT", "10")]).await;
    let base = server.base.clone();
    let (first_after, total, rest) = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(bin())
            .args([
                "run",
                "--server",
                &base,
                "-l",
                "python3",
                "-e",
                "import time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let mut out = child.stdout.take().unwrap();
        let mut buf = [0u8; 6];
        out.read_exact(&mut buf).unwrap();
        let first_after = started.elapsed();
        assert_eq!(&buf, b"first\n");
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        let total = started.elapsed();
        assert!(child.wait().unwrap().success());
        (first_after, total, rest)
    })
    .await
    .unwrap();
    assert_eq!(rest, "second\n");
    assert!(
        total - first_after >= Duration::from_millis(1500),
        "the first line came at {first_after:?}, the end at {total:?}: not streamed"
    );
}

#[test]
fn something_that_is_not_a_sandbox_server_exits_125() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Some(Ok(mut s)) = listener.incoming().next() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            );
        }
    });
    let o = sandbox(
        &[
            "run",
            "--server",
            &format!("127.0.0.1:{port}"),
            "-l",
            "python3",
            "-e",
            "1",
        ],
        &[],
    );
    assert_eq!(code(&o), 125, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("did not answer like a sandbox server"),
        "{}",
        stderr(&o)
    );
}

/// `exit()`, `quit()` and the other builtins `site` gives python3 are there, locally and
/// in runs forked by a server's fork server, and end a run as they end python3.
#[tokio::test]
async fn exit_and_quit_end_a_run_as_in_python3() {
    let cases = [
        ("print(1); exit(3)", "1\n", 3),
        ("quit()", "", 0),
        (
            "print(callable(help), callable(license)); exit('bye')",
            "True True\n",
            1,
        ),
    ];
    let server = Server::start(&[]).await;
    for (code, out, status) in cases {
        let host = Command::new("/usr/bin/python3")
            .args(["-c", code])
            .output()
            .expect("python3");
        assert_eq!(
            (stdout(&host).as_str(), host.status.code()),
            (out, Some(status))
        );
        let local = sandbox(&["run", "-l", "python3", "-e", code], &[]);
        assert_eq!(stdout(&local), out, "{code}: {}", stderr(&local));
        assert_eq!(local.status.code(), Some(status), "{code}");
        if status == 1 {
            assert_eq!(stderr(&local), "bye\n");
        }
        let forked = server.python(code).await;
        assert_eq!(forked["stdout"], out, "{code}: {forked}");
        let expected = if status == 0 {
            String::new()
        } else {
            format!("process exited with code {status}")
        };
        assert!(
            forked["error"]
                .as_str()
                .unwrap_or_default()
                .contains(&expected),
            "{code}: {forked}"
        );
    }
}

/// A process limit below what Node needs to start is refused at once, naming the
/// minimum, instead of a start that hangs until the timeout; at the minimum it runs.
#[test]
fn a_process_limit_node_cannot_start_under_is_refused_at_once() {
    let started = Instant::now();
    let o = sandbox(
        &[
            "run",
            "-l",
            "nodejs",
            "--max-processes",
            "4",
            "-e",
            "console.log(1)",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("needs at least 7 processes and threads"),
        "{}",
        stderr(&o)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let o = sandbox(
        &[
            "run",
            "-l",
            "nodejs",
            "--max-processes",
            "7",
            "-e",
            "console.log(1)",
        ],
        &[],
    );
    assert_eq!(
        (o.status.code(), stdout(&o).as_str()),
        (Some(0), "1\n"),
        "{}",
        stderr(&o)
    );
}

/// A limit the snippet caught and went on past is still named: in `--json`'s `limit` and
/// `error` and on stderr, the run's own status kept (0). The API leaves `error` empty,
/// since Dify takes a non-empty one for a failed run.
#[tokio::test]
async fn a_caught_thread_limit_is_still_named() {
    let code = "import threading, time\nts = []\ntry:\n    for i in range(100):\n        t = threading.Thread(target=time.sleep, args=(0.5,)); t.start(); ts.append(t)\nexcept RuntimeError as e:\n    print('caught')\nfor t in ts: t.join()";
    let o = sandbox(
        &[
            "run",
            "--json",
            "--max-processes",
            "8",
            "-l",
            "python3",
            "-e",
            code,
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).expect("json");
    assert_eq!(v["stdout"], "caught\n", "{v}");
    assert_eq!(v["limit"], "processes", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("process limit reached"),
        "{v}"
    );
    let s = Server::start(&[("MAX_PROCESSES", "8")]).await;
    let data = s.python(code).await;
    assert_eq!(data["stdout"], "caught\n", "{data}");
    assert_eq!(data["error"], "", "{data}");
}

/// How a job ended: its status as a shell reports it (128 + the signal that ended it),
/// its stdout and its stderr.
type Ended = (Option<i32>, String, String);

/// Run `cmd`; with `interrupt`, once the job printed its first line, send it SIGINT as a
/// CI runner's cancel or a Ctrl-C would.
fn ended(mut cmd: Command, interrupt: bool) -> Ended {
    use std::os::unix::process::ExitStatusExt;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let mut out = child.stdout.take().expect("stdout");
    let mut first = Vec::new();
    if interrupt {
        let mut byte = [0u8; 1];
        while out.read(&mut byte).expect("read") == 1 {
            first.push(byte[0]);
            if byte[0] == b'\n' {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        common::nix_kill(child.id(), "INT").expect("kill -INT");
    }
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).expect("read");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read");
    let status = child.wait().expect("wait");
    first.extend(rest);
    (
        status.code().or(status.signal().map(|n| 128 + n)),
        String::from_utf8_lossy(&first).into_owned(),
        err,
    )
}

/// The same jobs through the interpreter itself and through `sandbox run` (as root, as a
/// user without root, and through `--server` to servers with and without the Python
/// fork server): the same exit status, stdout and stderr, once the job's directory is
/// named alike. A package.json does not travel to a server: that job runs locally only
/// (listed in the README).
#[test]
fn a_job_ends_as_under_the_interpreter_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir(d.join("pkg")).expect("mkdir");
    let files: &[(&str, &str)] = &[
        (
            "term.py",
            "import os, signal\nprint('a', flush=True)\nos.kill(os.getpid(), signal.SIGTERM)\nprint('b')\n",
        ),
        (
            "abort.py",
            "import os\nprint('a', flush=True)\nos.abort()\n",
        ),
        ("exit.py", "import sys\nprint('a')\nsys.exit(4)\n"),
        ("quit.py", "print('a')\nexit(5)\n"),
        ("raise.py", "def f():\n    raise ValueError('no')\nf()\n"),
        (
            "int.py",
            "import time\nprint('a', flush=True)\ntime.sleep(10)\nprint('b')\n",
        ),
        (
            "handler.py",
            "import signal, sys, time\ndef on_int(*_):\n    print('handled', flush=True)\n    sys.exit(4)\nsignal.signal(signal.SIGINT, on_int)\nprint('a', flush=True)\ntime.sleep(10)\n",
        ),
        (
            "job.mjs",
            "import fs from 'fs';\nconsole.log(typeof fs.readFileSync, typeof require);\n",
        ),
        ("job.cjs", "console.log(typeof require, typeof module);\n"),
        ("exitcode.js", "console.log('a');\nprocess.exitCode = 6;\n"),
        (
            "term.js",
            "console.log('a');\nprocess.kill(process.pid, 'SIGTERM');\nsetTimeout(() => console.log('b'), 500);\n",
        ),
        (
            "int.js",
            "console.log('a');\nsetTimeout(() => console.log('b'), 10000);\n",
        ),
        (
            "handler.js",
            "process.on('SIGINT', () => { console.log('handled'); process.exit(4); });\nconsole.log('a');\nsetTimeout(() => console.log('b'), 10000);\n",
        ),
        ("pkg/package.json", "{\"type\": \"module\"}\n"),
        (
            "pkg/main.js",
            "import path from 'path';\nconsole.log(path.basename(import.meta.url));\n",
        ),
    ];
    for (name, text) in files {
        std::fs::write(d.join(name), text).expect("write");
    }
    // A user without root reads the jobs and keeps its state in a home of its own.
    use std::os::unix::fs::PermissionsExt;
    for p in [d.to_path_buf(), d.join("pkg")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let home = d.join("home");
    std::fs::create_dir(&home).expect("mkdir");
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).expect("chown");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let python = [("PYTHON_PATH", "/usr/bin/python3")];
    let forking = rt.block_on(Server::start(&[
        python[0],
        ("PYTHON_FORK_SERVER", "true"),
        ("WORKER_TIMEOUT", "20"),
    ]));
    let fresh = rt.block_on(Server::start(&[
        python[0],
        ("PYTHON_FORK_SERVER", "false"),
        ("WORKER_TIMEOUT", "20"),
    ]));
    let normal = |s: &str| {
        s.replace(&format!("{}/pkg/", d.display()), "/job/")
            .replace(&format!("{}/", d.display()), "/job/")
    };
    for (name, _) in files.iter().filter(|(n, _)| !n.ends_with(".json")) {
        let path = d.join(name).display().to_string();
        let interrupt = name.starts_with("int.") || name.starts_with("handler.");
        let program = if name.ends_with(".py") {
            "/usr/bin/python3"
        } else {
            "node"
        };
        let mut host = Command::new(program);
        host.arg(&path).current_dir(d);
        let (code, out, err) = ended(host, interrupt);
        let want: Ended = (code, out, normal(&err));
        let mut files_args = Vec::new();
        if *name == "pkg/main.js" {
            files_args = vec![
                "--file".to_string(),
                d.join("pkg/package.json").display().to_string(),
            ];
        }
        let sandbox_run = |extra: &[String]| {
            let mut c = Command::new(bin());
            c.arg("run")
                .args(extra)
                .arg(&path)
                .current_dir(d)
                .envs(python);
            c
        };
        let mut ways: Vec<(&str, Command)> = vec![("root", sandbox_run(&files_args))];
        let mut nobody = sandbox_run(&files_args);
        nobody
            .uid(65534)
            .gid(65534)
            .env("HOME", &home)
            .env("XDG_STATE_HOME", &home);
        ways.push(("rootless", nobody));
        if files_args.is_empty() {
            for (label, server) in [("fork server", &forking), ("no fork server", &fresh)] {
                let args = ["--server".to_string(), server.base.clone()];
                ways.push((label, sandbox_run(&args)));
            }
        }
        for (how, cmd) in ways {
            assert_eq!(ended(cmd, interrupt), want, "{name} ({how})");
        }
    }
}
