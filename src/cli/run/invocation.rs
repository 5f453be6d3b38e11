//! How the snippet is invoked beyond its code, from the options: its name, its argv,
//! its environment and where its stdin comes from. One description for local and remote
//! runs, so both give a snippet the same `sys.argv`, `process.argv` and variables.

use std::path::{Path, PathBuf};

use super::RunArgs;
use crate::protocol::Language;
use crate::protocol::{BadVariable, Invocation, check_variable};

/// Where the code came from, which names it the way `python3` and `node` would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Script {
    /// A file, by its name (it runs as /job/<name>).
    File(String),
    /// `-e CODE`.
    Eval,
    /// `-`: the code came on stdin.
    Stdin,
}

impl Script {
    pub fn of(args: &RunArgs) -> Self {
        match &args.file {
            Some(path) if path.as_os_str() != "-" => Self::File(
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| path.to_string_lossy().into_owned()),
            ),
            Some(_) => Self::Stdin,
            None => Self::Eval,
        }
    }

    /// The snippet's argv[0]: the file's name, `-e` or `-`.
    pub fn argv0(&self) -> &str {
        match self {
            Self::File(name) => name,
            Self::Eval => "-e",
            Self::Stdin => "-",
        }
    }

    /// The name the code is compiled under, as the interpreter names its own: a file
    /// by its path in the run (under /job when the run has one), inline code and stdin
    /// by the interpreter's own words.
    /// Node's inline code that is an ES module (`--input-type module`) is named `.mjs`,
    /// which is what the bootstrap runs as a module.
    pub fn filename(&self, language: Language, job: bool, module: bool) -> String {
        let ext = if module { ".mjs" } else { "" };
        match (self, language) {
            (Self::File(name), _) if job => format!("{}/{name}", crate::protocol::JOB_MOUNT),
            (Self::File(name), _) => name.clone(),
            (Self::Eval, Language::Python3) => "<string>".into(),
            (Self::Stdin, Language::Python3) => "<stdin>".into(),
            (Self::Eval, Language::Nodejs) => format!("[eval]{ext}"),
            (Self::Stdin, Language::Nodejs) => format!("[stdin]{ext}"),
        }
    }
}

/// Why the snippet's environment cannot be built from what was given.
#[derive(Debug, thiserror::Error)]
pub(super) enum EnvError {
    #[error("--env-file {}: {source}; check the path and that it is UTF-8 text", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--env-file {}: {line}", path.display())]
    Line { path: PathBuf, line: BadLine },
    #[error("{origin}: {variable}")]
    Variable {
        origin: String,
        variable: BadVariable,
    },
}

/// A line of an env file that is not `NAME=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {number}: {text:?} is not NAME=VALUE (a name without spaces, then '=')")]
pub(super) struct BadLine {
    number: usize,
    text: String,
}

/// Why `--stdin FILE` cannot be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum StdinError {
    #[error("--stdin {}: {source}; check the path and its permissions", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--stdin {}: a directory; give a file", .0.display())]
    Directory(PathBuf),
}

/// The snippet's invocation: its name, argv (the script's name, then what follows `--`)
/// and environment. `job`: whether the run has /job.
pub(super) fn invocation(
    args: &RunArgs,
    language: Language,
    job: bool,
) -> Result<Invocation, EnvError> {
    let script = Script::of(args);
    let mut argv = vec![script.argv0().to_string()];
    argv.extend(args.args.iter().cloned());
    Ok(Invocation {
        filename: script.filename(language, job, args.input_type.as_deref() == Some("module")),
        argv,
        env: environment(args, |name| std::env::var(name).ok())?,
    })
}

/// The variables of `--env-file` files, then of `--env`, in that order; a name given
/// again takes the later value. A bare NAME takes this command's own value (`lookup`),
/// and is left out when that is unset.
pub(super) fn environment(
    args: &RunArgs,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, EnvError> {
    let mut given: Vec<(String, Option<String>, String)> = Vec::new();
    for file in &args.env_file {
        let text = std::fs::read_to_string(file).map_err(|source| EnvError::Read {
            path: file.clone(),
            source,
        })?;
        let lines = parse_env_file(&text).map_err(|line| EnvError::Line {
            path: file.clone(),
            line,
        })?;
        for (line, name, value) in lines {
            given.push((name, value, format!("{}:{line}", file.display())));
        }
    }
    for raw in &args.env {
        let (name, value) = assignment(raw);
        given.push((name, value, format!("--env {raw}")));
    }
    let mut env: Vec<(String, String)> = Vec::new();
    for (name, value, origin) in given {
        let value = match value {
            Some(v) => v,
            None => match lookup(&name) {
                Some(v) => v,
                None => continue,
            },
        };
        if let Err(variable) = check_variable(&name, &value) {
            return Err(EnvError::Variable { origin, variable });
        }
        match env.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => env.push((name, value)),
        }
    }
    Ok(env)
}

/// `NAME=VALUE` split at its first `=`; a bare `NAME` has no value.
fn assignment(raw: &str) -> (String, Option<String>) {
    match raw.split_once('=') {
        Some((name, value)) => (name.to_string(), Some(value.to_string())),
        None => (raw.to_string(), None),
    }
}

/// An env file: one `NAME=VALUE` (or bare `NAME`) a line, taken literally (no quotes, no
/// expansion, as Docker's `--env-file`); blank lines and `#` comments are skipped.
/// Returns (line number, name, value).
fn parse_env_file(text: &str) -> Result<Vec<(usize, String, Option<String>)>, BadLine> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (name, value) = assignment(trimmed);
        // `NAME = value` is a typo for NAME=value, not a name with spaces.
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(BadLine {
                number: i + 1,
                text: line.into(),
            });
        }
        out.push((i + 1, name, value));
    }
    Ok(out)
}

/// Where the snippet's stdin comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum StdinSource {
    /// End of input at once: the code itself came on stdin.
    Empty,
    /// This command's own stdin, streamed.
    Caller,
    /// `--stdin FILE`.
    File(PathBuf),
}

impl StdinSource {
    pub fn of(args: &RunArgs) -> Self {
        match (&args.stdin_file, Script::of(args)) {
            (Some(file), _) => Self::File(file.clone()),
            (None, Script::Stdin) => Self::Empty,
            (None, _) => Self::Caller,
        }
    }

    /// Open the source (`--stdin FILE` is checked here, before anything runs).
    pub fn open(&self) -> Result<Option<Box<dyn std::io::Read + Send>>, StdinError> {
        match self {
            Self::Empty => Ok(None),
            Self::Caller => Ok(Some(Box::new(std::io::stdin()))),
            Self::File(path) => open_file(path).map(|f| Some(Box::new(f) as _)),
        }
    }
}

fn open_file(path: &Path) -> Result<std::fs::File, StdinError> {
    let file = std::fs::File::open(path).map_err(|source| StdinError::Open {
        path: path.into(),
        source,
    })?;
    match file.metadata() {
        Ok(m) if m.is_dir() => Err(StdinError::Directory(path.into())),
        _ => Ok(file),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn args(line: &[&str]) -> RunArgs {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let mut all = vec!["run"];
        all.extend_from_slice(line);
        Cli::try_parse_from(all).expect("parses").run
    }

    #[test]
    fn env_files_are_name_value_lines_with_comments() {
        let text = "# settings\n\nMODE=ci\r\n  INDENTED=1\nEMPTY=\nURL=http://h/?a=b#c\nPASS\n";
        let got = parse_env_file(text).expect("parses");
        let pairs: Vec<(String, Option<String>)> =
            got.iter().map(|(_, n, v)| (n.clone(), v.clone())).collect();
        assert_eq!(
            pairs,
            vec![
                ("MODE".into(), Some("ci".into())),
                ("INDENTED".into(), Some("1".into())),
                ("EMPTY".into(), Some("".into())),
                ("URL".into(), Some("http://h/?a=b#c".into())),
                ("PASS".into(), None),
            ]
        );
        assert_eq!(got[0].0, 3, "line numbers count from 1");
        let e = parse_env_file("OK=1\nBAD NAME=2\n").expect_err("a space in the name");
        assert_eq!(e.number, 2);
        assert!(e.to_string().starts_with("line 2:"), "{e}");
        assert!(parse_env_file("=x\n").is_err());
    }

    #[test]
    fn the_environment_is_only_what_is_named_later_values_win() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ci.env");
        std::fs::write(&file, "MODE=file\nFROM_FILE=1\nHOME_NAME\n").unwrap();
        let f = file.to_str().unwrap();
        let a = args(&[
            "--env-file",
            f,
            "--env",
            "MODE=flag",
            "--env",
            "UNSET",
            "--env",
            "X=a=b",
        ]);
        let lookup = |n: &str| (n == "HOME_NAME").then(|| "from the caller".to_string());
        let env = environment(&a, lookup).expect("valid");
        assert_eq!(
            env,
            vec![
                ("MODE".into(), "flag".into()),
                ("FROM_FILE".into(), "1".into()),
                ("HOME_NAME".into(), "from the caller".into()),
                ("X".into(), "a=b".into()),
            ]
        );
        let e = environment(&args(&["--env", "=v"]), |_| None).expect_err("no name");
        assert!(
            matches!(
                &e,
                EnvError::Variable {
                    variable: BadVariable::NoName,
                    ..
                }
            ),
            "{e}"
        );
        let e = e.to_string();
        assert!(e.contains("--env =v") && e.contains("needs a name"), "{e}");
        std::fs::write(&file, "A=x\0y\n").unwrap();
        let e = environment(&args(&["--env-file", f]), |_| None)
            .expect_err("NUL")
            .to_string();
        assert!(e.contains("ci.env:1") && e.contains("NUL"), "{e}");
        let e = environment(&args(&["--env-file", "/nonexistent/ci.env"]), |_| None)
            .expect_err("missing");
        assert!(matches!(e, EnvError::Read { .. }), "{e}");
    }

    #[test]
    fn argv_and_names_follow_the_interpreters() {
        let a = args(&["dir/job.py", "--", "a b", "é"]);
        let how = invocation(&a, Language::Python3, true).expect("valid");
        assert_eq!(how.argv, vec!["job.py", "a b", "é"]);
        assert_eq!(how.filename, "/job/job.py");
        let how = invocation(&a, Language::Python3, false).expect("valid");
        assert_eq!(how.filename, "job.py");
        let a = args(&["-e", "1", "--", "x"]);
        let how = invocation(&a, Language::Nodejs, true).expect("valid");
        assert_eq!(
            (how.argv.clone(), how.filename),
            (vec!["-e".into(), "x".into()], "[eval]".into())
        );
        assert_eq!(
            Script::of(&args(&["-"])).filename(Language::Python3, true, false),
            "<stdin>"
        );
    }

    #[test]
    fn stdin_comes_from_the_caller_unless_the_code_did() {
        assert_eq!(StdinSource::of(&args(&["job.py"])), StdinSource::Caller);
        assert_eq!(StdinSource::of(&args(&["-e", "1"])), StdinSource::Caller);
        assert_eq!(StdinSource::of(&args(&["-"])), StdinSource::Empty);
        assert_eq!(
            StdinSource::of(&args(&["-", "--stdin", "in.txt"])),
            StdinSource::File("in.txt".into())
        );
        let e = StdinSource::File("/nonexistent/in".into())
            .open()
            .err()
            .expect("missing");
        assert!(matches!(e, StdinError::Open { .. }), "{e}");
        assert!(e.to_string().contains("--stdin /nonexistent/in"), "{e}");
        let e = StdinSource::File("/".into())
            .open()
            .err()
            .expect("a directory");
        assert!(matches!(e, StdinError::Directory(_)), "{e}");
    }
}
