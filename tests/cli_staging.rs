//! `sandbox run`'s staging of inputs (`--file`, `--dir`) and copy back (`--out`) against
//! hostile trees, for real (root, real interpreters): a link in an input tree never makes
//! the command write, or read, outside what it was given.
//!
//! ```text
//! repo/lib/evil -> /host/dir, repo/data/evil/payload.txt
//! $ sandbox run --dir repo/lib:. --dir repo/data:. ...
//!     -> 2, "--dir repo/lib:.: repo/lib/evil is a link leading outside repo/lib ..."
//!        and /host/dir stays empty
//! repo/lib/alias.py -> helper.py, repo/lib/sub -> pkg
//!     -> /job/alias.py and /job/sub are a copied file and directory, not links
//! ```

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{sandbox, stderr, stdout};

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Every entry below `dir`, links included, as paths relative to it.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                todo.push(p.clone());
            }
            found.push(p.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    found.sort();
    found
}

/// `sandbox run <inputs> -l python3 -e <snippet>`.
fn python(inputs: &[String], snippet: &str) -> Output {
    let mut args: Vec<&str> = vec!["run"];
    args.extend(inputs.iter().map(String::as_str));
    args.extend(["-l", "python3", "-e", snippet]);
    sandbox(&args, &[])
}

fn arg(flag: &str, path: &Path, dest: Option<&str>) -> [String; 2] {
    let value = match dest {
        Some(d) => format!("{}:{d}", path.display()),
        None => path.display().to_string(),
    };
    [flag.to_string(), value]
}

/// The state directory's `runs/` is left empty: no stage outlives its command.
fn assert_no_stage_left(state: &Path) {
    let runs = state.join("runs");
    if runs.exists() {
        assert_eq!(tree(&runs), Vec::<PathBuf>::new(), "stages left behind");
    }
}

/// `sandbox run` with its own state directory (so the stage can be checked for leftovers).
fn python_in(state: &Path, inputs: &[String], snippet: &str) -> Output {
    let mut args: Vec<&str> = vec!["run"];
    args.extend(inputs.iter().map(String::as_str));
    args.extend(["-l", "python3", "-e", snippet]);
    sandbox(&args, &[("SANDBOX_STATE_DIR", state.to_str().unwrap())])
}

#[test]
fn a_link_in_an_input_tree_never_redirects_a_later_input_outside_the_stage() {
    let work = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    // Stands for /etc/cron.d or /root/.ssh.
    let host = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    write(&repo.join("data/evil/payload.txt"), "* * * * * root id\n");
    write(&repo.join("x.txt"), "x\n");
    std::fs::create_dir_all(repo.join("lib")).unwrap();
    write(&repo.join("lib/ok.py"), "OK = 1\n");
    let (lib, data) = (repo.join("lib"), repo.join("data"));
    let relative = pathdiff(host.path(), &lib);
    for target in [host.path().to_path_buf(), relative] {
        let _ = std::fs::remove_file(lib.join("evil"));
        symlink(&target, lib.join("evil")).unwrap();
        let attempts: [Vec<String>; 2] = [
            [
                arg("--dir", &lib, Some(".")),
                arg("--dir", &data, Some(".")),
            ]
            .concat(),
            [
                arg("--dir", &lib, None),
                arg("--file", &repo.join("x.txt"), Some("lib/evil/x.txt")),
            ]
            .concat(),
        ];
        for inputs in &attempts {
            let o = python_in(state.path(), inputs, "print('ran')");
            let e = stderr(&o);
            assert_eq!(code(&o), 2, "{inputs:?}: {e}");
            assert_eq!(stdout(&o), "", "the run never starts");
            let named = format!(
                "{} is a link leading outside {}",
                lib.join("evil").display(),
                lib.display()
            );
            assert!(e.contains(&named), "{named}: {e}");
            assert!(
                e.contains(&target.display().to_string()),
                "the target is named: {e}"
            );
            assert!(e.contains("--file PATH:DEST"), "says what to do: {e}");
            assert_eq!(tree(host.path()), Vec::<PathBuf>::new(), "{inputs:?}");
            assert_no_stage_left(state.path());
        }
    }
    // A link to a file outside is refused the same way: nothing of the host is read.
    std::fs::remove_file(lib.join("evil")).unwrap();
    write(&host.path().join("id_rsa"), "secret");
    symlink(host.path().join("id_rsa"), lib.join("key")).unwrap();
    let o = python_in(
        state.path(),
        &arg("--dir", &lib, None),
        "print(open('lib/key').read())",
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(!stdout(&o).contains("secret"));
    assert!(
        stderr(&o).contains("key is a link leading outside"),
        "{}",
        stderr(&o)
    );
    assert_no_stage_left(state.path());
}

/// `to` relative to directory `from` (both absolute, no links in them).
fn pathdiff(to: &Path, from: &Path) -> PathBuf {
    let (to, from): (Vec<_>, Vec<_>) = (to.components().collect(), from.components().collect());
    let common = to.iter().zip(&from).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..from.len() {
        rel.push("..");
    }
    for c in &to[common..] {
        rel.push(c);
    }
    rel
}

#[test]
fn links_inside_an_input_tree_are_copied_as_what_they_name() {
    let work = tempfile::tempdir().unwrap();
    let lib = work.path().join("lib");
    write(&lib.join("helper.py"), "GREETING = 'hi'\n");
    write(&lib.join("pkg/data.txt"), "in pkg\n");
    symlink("helper.py", lib.join("alias.py")).unwrap();
    symlink("pkg", lib.join("sub")).unwrap();
    // Through a link to a directory, then up again: still inside lib.
    symlink("sub/../helper.py", lib.join("round.py")).unwrap();
    let data = work.path().join("data");
    write(&data.join("sub/more.txt"), "merged\n");
    let snippet = r#"import os
for p in ('alias.py', 'sub', 'round.py', 'sub/data.txt', 'sub/more.txt'):
    print(p, os.path.islink(p), os.path.isdir(p))
print(open('alias.py').read().strip(), open('round.py').read().strip())
print(open('sub/data.txt').read().strip(), open('sub/more.txt').read().strip())
import alias; print(alias.GREETING)
"#;
    let inputs = [
        arg("--dir", &lib, Some(".")),
        arg("--dir", &data, Some(".")),
    ]
    .concat();
    let o = python(&inputs, snippet);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "alias.py False False\nsub False True\nround.py False False\nsub/data.txt False False\nsub/more.txt False False\n\
         GREETING = 'hi' GREETING = 'hi'\nin pkg merged\nhi\n"
    );
    // The input tree itself is left as it was.
    assert!(
        std::fs::symlink_metadata(lib.join("sub"))
            .unwrap()
            .is_symlink()
    );
    assert!(!lib.join("pkg/more.txt").exists());
}

#[test]
fn loops_absolute_and_dangling_links_are_refused_by_name() {
    let work = tempfile::tempdir().unwrap();
    let lib = work.path().join("lib");
    write(&lib.join("a/x.txt"), "x");
    let cases = [
        ("a/loop", PathBuf::from(".."), "a directory that holds it"),
        ("abs", lib.join("a/x.txt"), "leading outside"),
        ("gone", PathBuf::from("nothing-here"), "names nothing"),
    ];
    for (name, target, why) in cases {
        let link = lib.join(name);
        symlink(&target, &link).unwrap();
        let o = python(&arg("--dir", &lib, None), "print('ran')");
        let e = stderr(&o);
        assert_eq!(code(&o), 2, "{name}: {e}");
        assert!(
            e.contains(&format!("{} is a link", link.display())),
            "{name}: {e}"
        );
        assert!(e.contains(why), "{name}: {why}: {e}");
        std::fs::remove_file(&link).unwrap();
    }
    let o = python(
        &arg("--dir", &lib, None),
        "print(open('lib/a/x.txt').read())",
    );
    assert_eq!((code(&o), stdout(&o)), (0, "x\n".into()), "{}", stderr(&o));
}

#[test]
fn a_path_given_on_the_command_line_is_followed_like_cp() {
    let work = tempfile::tempdir().unwrap();
    let real = work.path().join("real");
    write(&real.join("conf.json"), "{}");
    write(&real.join("inner/v.txt"), "v");
    symlink(real.join("conf.json"), work.path().join("conf-link.json")).unwrap();
    symlink(&real, work.path().join("dir-link")).unwrap();
    let inputs = [
        arg("--file", &work.path().join("conf-link.json"), None),
        arg("--dir", &work.path().join("dir-link"), Some("d")),
    ]
    .concat();
    let snippet = "import os\nprint(os.path.islink('conf-link.json'), open('conf-link.json').read(), open('d/inner/v.txt').read(), os.path.islink('d'))";
    let o = python(&inputs, snippet);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "False {} v False\n");
}

#[test]
fn overlapping_destinations_are_merged_or_refused_inside_the_stage() {
    let work = tempfile::tempdir().unwrap();
    let host = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    write(&a.join("x/one.txt"), "1");
    let b = work.path().join("b");
    write(&b.join("x/two.txt"), "2");
    let f = work.path().join("f.txt");
    write(&f, "f");
    let c = work.path().join("c");
    write(&c.join("x"), "a file named x");
    // Two directories into one: merged.
    let inputs = [arg("--dir", &a, Some(".")), arg("--dir", &b, Some("."))].concat();
    let o = python(&inputs, "import os; print(sorted(os.listdir('x')))");
    assert_eq!(stdout(&o), "['one.txt', 'two.txt']\n", "{}", stderr(&o));
    // A file onto a directory, a directory onto a file, a file below a file: refused.
    // (Every --dir is staged before every --file.)
    let refused: [(Vec<String>, &str); 3] = [
        (
            [arg("--dir", &a, Some(".")), arg("--file", &f, Some("x"))].concat(),
            "/job/x is already a directory",
        ),
        (
            [arg("--dir", &c, Some(".")), arg("--dir", &a, Some("."))].concat(),
            "/job/x is already a file",
        ),
        (
            [arg("--file", &f, Some("x")), arg("--file", &f, Some("x/y"))].concat(),
            "/job/x is already a file",
        ),
    ];
    for (inputs, needle) in refused {
        let o = python(&inputs, "print('ran')");
        assert_eq!(code(&o), 2, "{inputs:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{needle}: {}", stderr(&o));
    }
    assert_eq!(tree(host.path()), Vec::<PathBuf>::new());
}

#[test]
fn a_link_planted_below_out_is_never_followed() {
    let out = tempfile::tempdir().unwrap();
    let host = tempfile::tempdir().unwrap();
    symlink(host.path(), out.path().join("reports")).unwrap();
    std::fs::create_dir(out.path().join("logs")).unwrap();
    symlink(host.path(), out.path().join("logs/today")).unwrap();
    let snippet = "import os\no = os.environ['SANDBOX_OUT']\nfor d in ('reports', 'logs/today'):\n    os.makedirs(o + '/' + d)\n    open(o + '/' + d + '/r.txt', 'w').write('r')\nopen(o + '/kept.txt', 'w').write('k')";
    let o = sandbox(
        &[
            "run",
            "--out",
            out.path().to_str().unwrap(),
            "-l",
            "python3",
            "-e",
            snippet,
        ],
        &[],
    );
    assert_eq!(code(&o), 1, "refusals fail the command: {}", stderr(&o));
    let e = stderr(&o);
    for needle in [
        "/tmp/out/reports: --out already holds a link",
        "/tmp/out/logs/today: --out already holds a link",
    ] {
        assert!(e.contains(needle), "{needle}: {e}");
    }
    assert_eq!(tree(host.path()), Vec::<PathBuf>::new());
    assert_eq!(
        std::fs::read_to_string(out.path().join("kept.txt")).unwrap(),
        "k"
    );
}
