//! `sandbox run` as a CI job uses it, for real (root, real interpreters, real sandbox):
//! stdin streamed in, arguments after `--`, only the variables named, input files at
//! /job, output files back from /tmp/out, and the same through `--server`.
//!
//! ```text
//! $ sandbox run job.py --file helper.py --env MODE=ci --out out -- "a b" < data
//!     -> sys.argv ['job.py', 'a b'], stdin = data, cwd /job, out/<what the run left>
//! $ sandbox run leak.py --out out    (a link to /etc/passwd in /tmp/out)
//!     -> 1, "sandbox: --out: /tmp/out/passwd: a symbolic link, which is never followed"
//! $ sandbox run --server URL job.py --file x   -> 2, "--file applies to local runs only"
//! ```

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{Server, bin, sandbox, sandbox_with_stdin, stderr, stdout};
use serde_json::Value;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

/// `sandbox run --out DIR <extra> -l python3 -e <snippet>`.
fn python_with_out(out: &Path, extra: &[&str], snippet: &str) -> Output {
    let mut args = vec!["run", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend(["-l", "python3", "-e", snippet]);
    sandbox(&args, &[])
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Bytes that do not repeat within a pipe's buffer (xorshift).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// sha256 of `data`, by coreutils.
fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

const PY_DIGEST: &str = "import sys, hashlib\nd = sys.stdin.buffer.read()\nprint(len(d), hashlib.sha256(d).hexdigest())";
const JS_DIGEST: &str = "const c = []; process.stdin.on('data', d => c.push(d)); process.stdin.on('end', () => { const b = Buffer.concat(c); console.log(b.length, require('crypto').createHash('sha256').update(b).digest('hex')); });";

#[test]
fn stdin_larger_than_a_pipe_reaches_python_and_node_whole() {
    let data = noise(1 << 20);
    let expected = format!("{} {}\n", data.len(), sha256(&data));
    for (language, snippet) in [
        ("python3", PY_DIGEST),
        ("nodejs", JS_DIGEST),
        (
            "nodejs",
            "const b = require('fs').readFileSync(0); console.log(b.length, require('crypto').createHash('sha256').update(b).digest('hex'))",
        ),
    ] {
        let o = sandbox_with_stdin(&["run", "-l", language, "-e", snippet], &data, &[]);
        assert_eq!(code(&o), 0, "{language}: {}", stderr(&o));
        assert_eq!(stdout(&o), expected, "{language}");
    }
    // --stdin FILE instead, even when the code itself comes on stdin.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.bin");
    std::fs::write(&file, &data).unwrap();
    let o = sandbox_with_stdin(
        &[
            "run",
            "-l",
            "python3",
            "--stdin",
            file.to_str().unwrap(),
            "-",
        ],
        PY_DIGEST.as_bytes(),
        &[],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), expected);
    // Code on stdin: the snippet's stdin is empty.
    let o = sandbox_with_stdin(&["run", "-l", "python3", "-"], PY_DIGEST.as_bytes(), &[]);
    assert!(stdout(&o).starts_with("0 "), "{}", stdout(&o));
}

#[test]
fn stdin_past_its_limit_is_cut_and_said_so() {
    let data = noise(3 << 20);
    let o = sandbox_with_stdin(
        &["run", "--max-input", "1", "-l", "python3", "-e", PY_DIGEST],
        &data,
        &[],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let expected = format!("{} {}\n", 1 << 20, sha256(&data[..1 << 20]));
    assert_eq!(stdout(&o), expected);
    assert!(
        stderr(&o).contains("stdin was cut after 1 MB (--max-input 1)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn arguments_after_the_double_dash_are_the_snippets_argv() {
    let dir = tempfile::tempdir().unwrap();
    let py = write(dir.path(), "job.py", "import sys\nprint(sys.argv)");
    let js = write(
        dir.path(),
        "app.js",
        "console.log(JSON.stringify(process.argv.slice(1)))",
    );
    let args = ["a b", "é 漢字", "", "--flag", "-x"];
    let mut line = vec!["run", py.as_str(), "--"];
    line.extend(args);
    let o = sandbox(&line, &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "['job.py', 'a b', 'é 漢字', '', '--flag', '-x']\n"
    );
    line[1] = js.as_str();
    let o = sandbox(&line, &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "[\"app.js\",\"a b\",\"é 漢字\",\"\",\"--flag\",\"-x\"]\n"
    );
    // Inline code is named as the interpreters name theirs.
    let o = sandbox(
        &[
            "run",
            "-l",
            "python3",
            "-e",
            "import sys; print(sys.argv)",
            "--",
            "1",
        ],
        &[],
    );
    assert_eq!(stdout(&o), "['-e', '1']\n", "{}", stderr(&o));
}

#[test]
fn only_the_variables_named_reach_the_snippet() {
    let dir = tempfile::tempdir().unwrap();
    let env_file = write(
        dir.path(),
        "ci.env",
        "# for the job\nMODE=file\nREGION=eu-west-1\n\nPASSED\n",
    );
    let probe = "import os\nfor k in ('CALLER_SECRET', 'MODE', 'REGION', 'PASSED', 'WITH_EQ'):\n    print(k, os.environ.get(k))";
    let caller = [("CALLER_SECRET", "hunter2"), ("PASSED", "from the caller")];
    let o = sandbox(
        &[
            "run",
            "--env-file",
            &env_file,
            "--env",
            "MODE=flag",
            "--env",
            "WITH_EQ=a=b",
            "-l",
            "python3",
            "-e",
            probe,
        ],
        &caller,
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "CALLER_SECRET None\nMODE flag\nREGION eu-west-1\nPASSED from the caller\nWITH_EQ a=b\n"
    );
    let o = sandbox(
        &[
            "run",
            "-l",
            "nodejs",
            "-e",
            "console.log(Object.keys(process.env).sort().join(' '))",
        ],
        &caller,
    );
    assert!(!stdout(&o).contains("CALLER_SECRET"), "{}", stdout(&o));
    // What the environment cannot hold is refused, saying why.
    for (bad, needle) in [("=x", "needs a name"), ("NAME", "")] {
        let o = sandbox(&["run", "--env", bad, "-l", "python3", "-e", "1"], &[]);
        if needle.is_empty() {
            assert_eq!(
                code(&o),
                0,
                "an unset bare name is left out: {}",
                stderr(&o)
            );
        } else {
            assert_eq!(code(&o), 2, "{}", stderr(&o));
            assert!(stderr(&o).contains(needle), "{}", stderr(&o));
        }
    }
    let bad_file = write(dir.path(), "bad.env", "OK=1\nNOT A LINE\n");
    let o = sandbox(
        &["run", "--env-file", &bad_file, "-l", "python3", "-e", "1"],
        &[],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("bad.env") && stderr(&o).contains("line 2"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn input_files_sit_beside_the_script_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("pkg")).unwrap();
    write(&src, "helper.py", "GREETING = 'from helper'\n");
    write(
        &src,
        "helper.js",
        "module.exports = { greeting: 'from helper.js' };\n",
    );
    write(&src.join("pkg"), "data.txt", "inside pkg\n");
    // Owned by another uid and private to it: the copy is still readable by the run.
    let private = write(dir.path(), "rules.json", "{\"private\": true}");
    std::os::unix::fs::chown(&private, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let job = write(
        &src,
        "job.py",
        "import os, helper\nprint(helper.GREETING, os.getcwd())\nprint(open('pkg/data.txt').read().strip(), open('conf/rules.json').read())\ntry:\n    open('new', 'w')\nexcept OSError as e:\n    print('write', e.errno)",
    );
    let dir_arg = format!("{}:.", src.display());
    let file_arg = format!("{private}:conf/rules.json");
    let o = sandbox(&["run", &job, "--dir", &dir_arg, "--file", &file_arg], &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "from helper /job\ninside pkg {\"private\": true}\nwrite 30\n",
        "30: EROFS"
    );
    // Node: require('./helper') resolves beside the script.
    let app = write(
        &src,
        "app.js",
        "console.log(require('./helper').greeting, __dirname)",
    );
    let helper = format!("{}", src.join("helper.js").display());
    let o = sandbox(&["run", &app, "--file", &helper], &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "from helper.js /job\n");
    // A --dir keeps its name by default: `from src import helper`.
    let o = sandbox(
        &[
            "run",
            "--dir",
            src.to_str().unwrap(),
            "-l",
            "python3",
            "-e",
            "from src import helper; print(helper.GREETING)",
        ],
        &[],
    );
    assert_eq!(stdout(&o), "from helper\n", "{}", stderr(&o));
    // Destinations stay inside /job.
    for dest in ["../etc/x", "/etc/x", "a/../../x"] {
        let arg = format!("{helper}:{dest}");
        let o = sandbox(&["run", "--file", &arg, "-l", "python3", "-e", "1"], &[]);
        assert_eq!(code(&o), 2, "{dest}: {}", stderr(&o));
        assert!(stderr(&o).contains("/job"), "{}", stderr(&o));
    }
    // The bound on inputs names its option.
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![0u8; (1 << 20) + 10]).unwrap();
    let o = sandbox(
        &[
            "run",
            "--max-input",
            "1",
            "--file",
            big.to_str().unwrap(),
            "-l",
            "python3",
            "-e",
            "1",
        ],
        &[],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("--max-input"), "{}", stderr(&o));
}

#[test]
fn out_copies_regular_files_and_json_lists_them() {
    let out = tempfile::tempdir().unwrap();
    let snippet = "import os\no = os.environ['SANDBOX_OUT']\nos.makedirs(o + '/reports')\nopen(o + '/reports/summary.csv', 'w').write('a,b\\n1,2\\n')\nopen(o + '/log.txt', 'w').write('done')\nprint(o)";
    let o = python_with_out(out.path(), &["--json"], snippet);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["stdout"], "/tmp/out\n");
    assert_eq!(
        v["files"],
        serde_json::json!([
            {"path": "log.txt", "bytes": 4},
            {"path": "reports/summary.csv", "bytes": 8}
        ])
    );
    for field in [
        "stdout",
        "stderr",
        "error",
        "exit_code",
        "duration_ms",
        "limit",
    ] {
        assert!(v.get(field).is_some(), "{field} kept: {v}");
    }
    let csv = std::fs::read_to_string(out.path().join("reports/summary.csv")).unwrap();
    assert_eq!(csv, "a,b\n1,2\n");
    // Without --out, an empty list.
    let o = sandbox(&["run", "--json", "-l", "python3", "-e", "1"], &[]);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["files"], serde_json::json!([]));
}

#[test]
fn out_refuses_links_and_writes_nothing_outside_its_directory() {
    let out = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("target");
    std::fs::write(&target, "untouched").unwrap();
    // DIR already holds a link where the run will write a file of the same name.
    std::os::unix::fs::symlink(&target, out.path().join("victim")).unwrap();
    let passwd = std::fs::read("/etc/passwd").unwrap();
    let snippet = "import os\no = os.environ['SANDBOX_OUT']\nos.symlink('/etc/passwd', o + '/passwd')\nos.symlink('/', o + '/root')\nopen(o + '/victim', 'w').write('from the run')\nopen(o + '/kept.txt', 'w').write('kept')";
    let o = python_with_out(out.path(), &[], snippet);
    assert_eq!(
        code(&o),
        1,
        "refused outputs fail the command: {}",
        stderr(&o)
    );
    let e = stderr(&o);
    for needle in [
        "sandbox: --out: /tmp/out/passwd: a symbolic link, which is never followed; not copied",
        "sandbox: --out: /tmp/out/root: a symbolic link",
        "sandbox: --out: /tmp/out/victim: --out already holds a link",
    ] {
        assert!(e.contains(needle), "{needle}: {e}");
    }
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
    assert_eq!(std::fs::read(out.path().join("kept.txt")).unwrap(), b"kept");
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd);
    assert_eq!(names(out.path()), vec!["kept.txt", "victim"]);
    assert!(
        std::fs::symlink_metadata(out.path().join("victim"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
    // --json says the same: the refusals in `error`, the command's status in `exit_code`.
    let again = tempfile::tempdir().unwrap();
    let o = python_with_out(again.path(), &["--json"], snippet);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["exit_code"], 1, "{v}");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("--out: /tmp/out/passwd: a symbolic link, which is never followed"),
        "{v}"
    );
}

#[test]
fn out_names_are_sanitised_and_never_leave_the_directory() {
    let out = tempfile::tempdir().unwrap();
    let parent = out.path().parent().unwrap().to_path_buf();
    let snippet = r#"import os
o = os.environ['SANDBOX_OUT']
open(o + '/line\nbreak\x1b[2J', 'w').write('x')
for name in ('../escaped', '../../escaped', 'a/../../escaped'):
    try:
        os.makedirs(os.path.dirname(o + '/' + name), exist_ok=True)
        open(o + '/' + name, 'w').write('x')
        print('wrote', os.path.normpath(o + '/' + name))
    except OSError as e:
        print('refused', name, e.errno)
"#;
    let o = python_with_out(out.path(), &[], snippet);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // '..' leaves /tmp/out inside the run: into its own /tmp, which vanishes with it.
    assert!(stdout(&o).contains("wrote /tmp/escaped"), "{}", stdout(&o));
    // `a` is the directory the third attempt made on its way up.
    assert_eq!(names(out.path()), vec!["a", "line_break_[2J"]);
    assert_eq!(std::fs::read_dir(out.path().join("a")).unwrap().count(), 0);
    assert!(!parent.join("escaped").exists());
}

#[test]
fn out_is_bounded_by_the_runs_tmp_size() {
    let out = tempfile::tempdir().unwrap();
    let snippet = r#"import os
o = os.environ['SANDBOX_OUT']
try:
    with open(o + '/sparse', 'wb') as f:
        f.truncate(10 << 30)
    print('sparse made')
except OSError as e:
    print('sparse', e.strerror)
for i in range(3):
    open(o + '/part%d' % i, 'wb').write(b'x' * 700_000)
"#;
    let o = python_with_out(out.path(), &["--tmp-size", "1", "--json"], snippet);
    let v: Value = serde_json::from_str(stdout(&o).trim())
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", stdout(&o), stderr(&o)));
    assert!(
        v["stdout"]
            .as_str()
            .unwrap()
            .starts_with("sparse File too large"),
        "the run cannot make a 10 GB file: {v}"
    );
    // The disk watch stops the run, or the copy refuses what passes the bound.
    let refused = stderr(&o).contains("past what /tmp/out may hand back");
    assert!(v["limit"] == "disk" || refused, "{v}\n{}", stderr(&o));
    assert_ne!(code(&o), 0);
    let total: u64 = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(total <= 1 << 20, "{total} bytes written");
    let listed: u64 = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(listed, total);
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_stdin_args_and_env_are_those_of_a_local_run() {
    let server = Server::start(&[]).await;
    let base = server.base.clone();
    let dir = tempfile::tempdir().unwrap();
    let py = write(
        dir.path(),
        "job.py",
        "import sys, os, hashlib\nd = sys.stdin.buffer.read()\nprint(sys.argv, os.environ.get('MODE'), os.environ.get('CALLER_SECRET'), len(d), hashlib.sha256(d).hexdigest())\nsys.exit(3)",
    );
    let js = write(
        dir.path(),
        "app.js",
        &format!(
            "{JS_DIGEST}\nconsole.log(JSON.stringify(process.argv.slice(1)), process.env.MODE, process.env.CALLER_SECRET);"
        ),
    );
    let data = noise(300_000);
    let caller = [("CALLER_SECRET", "hunter2")];
    for script in [&py, &js] {
        let local = sandbox_with_stdin(
            &["run", script, "--env", "MODE=ci", "--", "a b", "é漢"],
            &data,
            &caller,
        );
        let remote = sandbox_with_stdin(
            &[
                "run", "--server", &base, script, "--env", "MODE=ci", "--", "a b", "é漢",
            ],
            &data,
            &caller,
        );
        assert!(
            stdout(&local).contains(&sha256(&data)),
            "{script}: {}",
            stdout(&local)
        );
        assert!(
            stdout(&local).contains("a b") && stdout(&local).contains("ci"),
            "{}",
            stdout(&local)
        );
        assert_eq!(
            (stdout(&remote), stderr(&remote), code(&remote)),
            (stdout(&local), stderr(&local), code(&local)),
            "{script}"
        );
    }
    // Files do not travel to a server: refused before anything is sent.
    let f = write(dir.path(), "in.txt", "x");
    let out = dir.path().join("out");
    for (flag, value) in [
        ("--file", f.as_str()),
        ("--dir", dir.path().to_str().unwrap()),
        ("--out", out.to_str().unwrap()),
    ] {
        let o = sandbox(&["run", "--server", &base, flag, value, &py], &[]);
        assert_eq!(code(&o), 2, "{flag}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("{flag} applies to local runs only")),
            "{}",
            stderr(&o)
        );
    }
    assert!(!out.exists());
}

#[test]
fn a_restrictive_umask_does_not_lock_the_run_out() {
    let dir = tempfile::tempdir().unwrap();
    let helper = write(dir.path(), "helper.py", "X = 'helper'\n");
    let out = dir.path().join("out");
    let script = format!(
        "umask 077; exec {} run --file {helper} --out {} -l python3 -e \"import helper, os; print(helper.X, open('/etc/passwd').read().count(':') > 0); open(os.environ['SANDBOX_OUT'] + '/r', 'w').write('r')\"",
        bin(),
        out.display()
    );
    let o = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "helper True\n");
    assert_eq!(std::fs::read_to_string(out.join("r")).unwrap(), "r");
}
