//! Without root: `sandbox run` and `sandbox doctor` as an ordinary user (nobody), for
//! real. Runs go into a user namespace of their own, then the same namespaces, root and
//! seccomp filter as under root; rlimits stand in for cgroups.
//!
//! ```text
//! $ (as nobody) sandbox run -l python3 -e 'print(1)'   -> 0, "1"
//! $ (as nobody) sandbox run job.py --file helper.py --out out -- a < data
//!                                                      -> 0, stdin, argv, /job, out/
//! $ (as nobody) sandbox doctor                         -> 0, "serve would isolate runs with: rootless ..."
//! ```

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{Server, bin, stderr, stdout};
use serde_json::Value;

const NOBODY: u32 = 65534;

/// A home of nobody's own (the rootless state directory goes there) and the system
/// interpreters: the test's own ones may live where nobody cannot read.
struct User {
    home: tempfile::TempDir,
}

impl User {
    fn new() -> Self {
        let home = tempfile::Builder::new()
            .prefix("rootless-home")
            .tempdir_in("/tmp")
            .unwrap();
        std::os::unix::fs::chown(home.path(), Some(NOBODY), Some(NOBODY)).unwrap();
        Self { home }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .env_clear()
            .env("HOME", self.home.path())
            .env("PATH", "/usr/bin:/bin")
            .env("PYTHON_PATH", "/usr/bin/python3")
            .env("NODEJS_PATH", "/usr/bin/node")
            .current_dir("/")
            .uid(NOBODY)
            .gid(NOBODY);
        cmd
    }

    fn sandbox(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// With `input` on stdin and `env` added, from `dir`.
    fn sandbox_with(
        &self,
        args: &[&str],
        input: &[u8],
        env: &[(&str, &str)],
        dir: &Path,
    ) -> Output {
        let mut cmd = self.command(args);
        cmd.envs(env.iter().copied()).current_dir(dir);
        common::feed(cmd, input)
    }

    /// A file of nobody's own (mode 0600) under its home.
    fn file(&self, rel: &str, text: &[u8]) -> String {
        let p = self.home.path().join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
            std::os::unix::fs::chown(parent, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        std::os::unix::fs::chown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        p.to_str().unwrap().to_string()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["run", "--json"];
        all.extend_from_slice(args);
        let o = self.sandbox(&all);
        serde_json::from_str(stdout(&o).trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(&o), stderr(&o)))
    }
}

#[test]
fn a_user_without_root_runs_python_and_node() {
    let u = User::new();
    let o = u.sandbox(&[
        "run",
        "-l",
        "python3",
        "-e",
        "import os\nstatus = open('/proc/self/status').read()\ncaps = [l for l in status.splitlines() if l.startswith('Cap')]\nprint(os.getuid(), os.getgid(), sorted(os.listdir('/')))\nprint(caps)",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let first: Vec<&str> = out.lines().next().unwrap().splitn(3, ' ').collect();
    let uid: u32 = first[0].parse().unwrap();
    assert!((10000..11000).contains(&uid), "a pool uid inside: {out}");
    assert_eq!(first[0], first[1], "{out}");
    // /job: the run's own directory (its script and inputs), read-only.
    assert_eq!(
        first[2], "['dev', 'etc', 'job', 'lib', 'lib64', 'proc', 'tmp', 'usr']",
        "{out}"
    );
    // No capability left in any set: the namespace's were dropped at exec.
    assert!(
        out.contains("'CapInh:\\t0000000000000000', 'CapPrm:\\t0000000000000000', 'CapEff:\\t0000000000000000'"),
        "{out}"
    );
    assert!(out.contains("'CapAmb:\\t0000000000000000'"), "{out}");

    let o = u.sandbox(&["run", "-l", "nodejs", "-e", "console.log(6 * 7)"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "42\n");
}

#[test]
fn rootless_runs_are_contained() {
    let u = User::new();
    std::fs::write(u.home.path().join("secret"), "mine").unwrap();
    let home = u.home.path().display().to_string();
    let code = format!(
        r#"
import os, socket
def attempt(name, f):
    try:
        f()
        print(name, "ok")
    except OSError as e:
        print(name, e.errno)
attempt("fork", os.fork)
attempt("exec", lambda: os.execv("/usr/bin/python3", ["python3", "-c", "1"]))
attempt("socket", lambda: socket.socket())
attempt("setuid0", lambda: os.setuid(0))
attempt("write /usr", lambda: open("/usr/x", "w"))
attempt("shadow", lambda: open("/etc/shadow"))
attempt("home", lambda: open("{home}/secret"))
attempt("kill 1 of the host", lambda: os.kill(1, 0))
print("pids", sorted(p for p in os.listdir("/proc") if p.isdigit()))
open("/tmp/rootless-trace", "w").write("x")
"#
    );
    let o = u.sandbox(&["run", "-l", "python3", "-e", &code]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    for line in [
        "fork 1",
        "exec 1",
        "socket 1",
        "setuid0 1",
        "write /usr 30",
        "shadow 2",
        "home 2",
        "pids ['1', '2']",
    ] {
        assert!(out.contains(&format!("{line}\n")), "{line}: {out}");
    }
    // pid 1 is the run's own init (the snippet is 2): the host's init is out of sight.
    assert!(out.contains("kill 1 of the host ok\n"), "{out}");
    assert!(!std::path::Path::new("/tmp/rootless-trace").exists());
}

#[test]
fn rootless_limits_hold() {
    let u = User::new();
    // (options, Python snippet, the limit `--json` must name)
    let cases: [(&[&str], &str, &str); 3] = [
        (&["--memory", "64"], "x = bytearray(256 << 20)", "memory"),
        (
            &[],
            "import threading, time\nfor _ in range(500):\n    threading.Thread(target=time.sleep, args=(2,)).start()",
            "processes",
        ),
        (
            &["--max-output", "1000"],
            "while True: print('x' * 100)",
            "output",
        ),
    ];
    for (options, code, limit) in cases {
        let mut args = options.to_vec();
        args.extend(["-l", "python3", "-e", code]);
        let v = u.json(&args);
        assert_eq!(v["limit"], limit, "{v}");
    }
    let o = u.sandbox(&["run", "--timeout", "1", "-l", "nodejs", "-e", "for(;;){}"]);
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
}

#[test]
fn a_node_memory_bomb_outside_the_heap_ends_as_a_memory_limit() {
    let u = User::new();
    // Buffers live outside V8's heap: its heap flag does not see them, and RLIMIT_AS
    // cannot be given to Node. The run's resident memory is watched instead.
    let v = u.json(&[
        "--memory",
        "256",
        "--timeout",
        "20",
        "-l",
        "nodejs",
        "-e",
        "const b = []; for (;;) { const x = Buffer.alloc(16 << 20); x.fill(1); b.push(x); }",
    ]);
    assert_eq!(v["limit"], "memory", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("memory limit exceeded"),
        "{v}"
    );
    assert!(v["duration_ms"].as_f64().unwrap_or(1e9) < 15_000.0, "{v}");
}

#[test]
fn networked_runs_without_root_are_refused_with_the_reason() {
    let u = User::new();
    let o = u.sandbox(&["run", "--network", "-l", "python3", "-e", "print(1)"]);
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("network_isolation: shared") && e.contains("root"),
        "{e}"
    );
}

#[test]
fn doctor_as_a_user_names_the_rootless_level() {
    let u = User::new();
    let o = u.sandbox(&["doctor", "--json"]);
    let v: Value = serde_json::from_str(stdout(&o).trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(&o), stderr(&o)));
    assert_eq!(o.status.code(), Some(0), "{v:#}");
    let privileges = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "privileges")
        .unwrap();
    assert_eq!(privileges["status"], "warning", "{privileges}");
    assert!(
        v["isolation"].as_str().unwrap().starts_with("rootless"),
        "{v:#}"
    );
}

#[tokio::test]
async fn serve_as_a_user_answers_with_warm_rootless_workers() {
    let u = User::new();
    let home = u.home.path().to_str().unwrap().to_string();
    let s = Server::start_as(
        NOBODY,
        &[
            ("HOME", &home),
            ("PYTHON_PATH", "/usr/bin/python3"),
            ("NODEJS_PATH", "/usr/bin/node"),
            ("WARM_WORKERS", "1"),
        ],
    )
    .await;
    // More runs than warm workers: taken from the pool, then started on demand.
    let cases = [
        (
            "python3",
            "import os\nprint(os.getuid() != 0, sorted(p for p in os.listdir('/proc') if p.isdigit()))",
            // The run and its init.
            "True ['1', '2']\n",
        ),
        (
            "nodejs",
            "try { require('child_process').execSync('id') } catch (e) { console.log(e.code) }",
            "EPERM\n",
        ),
    ];
    for _ in 0..3 {
        for (language, code, expected) in cases {
            let data = s.run(language, code).await;
            assert_eq!(data["stdout"], expected, "{language}: {data}");
        }
    }
    assert!(s.healthy().await);
}

#[test]
fn a_user_without_root_runs_a_ci_job_with_stdin_arguments_variables_and_files() {
    let u = User::new();
    let work = u.home.path().join("work");
    u.file("work/helper.py", b"NAME = 'helper'\n");
    u.file("work/lib/helper.js", b"module.exports = 'helper.js';\n");
    let job = u.file(
        "work/job.py",
        b"import sys, os, hashlib, helper\nd = sys.stdin.buffer.read()\nprint(sys.argv, helper.NAME, os.getcwd(), os.environ.get('MODE'), os.environ.get('CALLER_SECRET'))\nprint(len(d), hashlib.sha256(d).hexdigest())\nout = os.environ['SANDBOX_OUT']\nopen(out + '/result.txt', 'w').write('ok')\nos.symlink('/etc/passwd', out + '/passwd')\nos.mkdir(out + '/locked')\nopen(out + '/locked/f', 'w').write('x')\nos.chmod(out + '/locked', 0o500)",
    );
    // 1 MiB that does not repeat, checksummed by the test through coreutils.
    let mut x: u32 = 2_463_534_242;
    let data: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let mut sum = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    sum.stdin.take().unwrap().write_all(&data).unwrap();
    let digest = String::from_utf8_lossy(&sum.wait_with_output().unwrap().stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    // The output directory holds a link already; the run's file of that name is refused.
    let out = u.home.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::os::unix::fs::chown(&out, Some(NOBODY), Some(NOBODY)).unwrap();
    let o = u.sandbox_with(
        &[
            "run",
            &job,
            "--file",
            "helper.py",
            "--env",
            "MODE=ci",
            "--out",
            "../out",
            "--",
            "a b",
            "é",
        ],
        &data,
        &[("CALLER_SECRET", "hunter2")],
        &work,
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "the refused link fails the command: {}",
        stderr(&o)
    );
    assert_eq!(
        stdout(&o),
        format!(
            "['job.py', 'a b', 'é'] helper /job ci None\n{} {digest}\n",
            1 << 20
        )
    );
    assert!(
        stderr(&o).contains("/tmp/out/passwd: a symbolic link, which is never followed"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("result.txt")).unwrap(),
        "ok"
    );
    assert!(!out.join("passwd").exists());
    assert_eq!(std::fs::read_to_string(out.join("locked/f")).unwrap(), "x");
    // Node: require('./helper') beside the script, from an input directory.
    let app = u.file(
        "work/lib/app.js",
        b"console.log(require('./helper'), process.argv.slice(2))",
    );
    let o = u.sandbox_with(&["run", &app, "--dir", "lib:.", "--", "x"], b"", &[], &work);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "helper.js [ 'x' ]\n");
    // Nothing of the runs is left in the state directory, not even what the run locked.
    let runs = u.home.path().join(".local/state/sandbox/runs");
    assert_eq!(std::fs::read_dir(runs).unwrap().count(), 0);
}
