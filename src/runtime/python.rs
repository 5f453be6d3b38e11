//! Python 3: discovery by asking the interpreter itself, and the bootstrap that reads the
//! snippet from fd 3 before running it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{DiscoveryError, Language, Runtime, ask, interpreter_libraries, plan_root};
use crate::isolation::spec::Profile;

/// Modules Dify's nodes rely on (jinja2 for template nodes) or its images ship.
pub const OPTIONAL_MODULES: &[&str] = &["jinja2", "requests", "httpx"];

const DISCOVER: &str = r#"
import sys, json, importlib.util
mods = {m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}
print(json.dumps({"executable": sys.executable, "base_prefix": sys.base_prefix,
  "prefix": sys.prefix, "path": [p for p in sys.path if p], "version": sys.version.split()[0],
  "modules": mods}))
"#;

/// Runs inside the sandbox, before any user code: reads the frame from fd 3 (see
/// `isolation::snippet`), acknowledges it, then runs preload and code as `__main__`.
pub const BOOTSTRAP: &str = r#"import sys
sys.path[:] = __SYS_PATH__
__FRAME__
with open(3, "rb") as _f:
    _d = _f.read()
    # Tells the sandbox the snippet arrived whole; nothing of it has run yet. (posix is
    # built in and already loaded; os would cost an import.)
    __import__("posix").write(3, b"__ACK__")
_p, _c, _fn, _a, _e = _frame(_d)
_g = {"__name__": "__main__", "__builtins__": __builtins__, "__doc__": None}
_fn = _invoke(_fn, _a, _e, _g)
del _f, _d, _a, _e
try:
    if _p:
        exec(compile(_p, "<preload>", "exec"), _g)
    exec(compile(_c, _fn, "exec"), _g)
except SystemExit:
    raise
except BaseException as _x:
    # Show the snippet's frames only, not this bootstrap's.
    import traceback
    traceback.print_exception(type(_x), _x, _x.__traceback__.tb_next)
    if isinstance(_x, KeyboardInterrupt):
        # As python3 ends on an uncaught KeyboardInterrupt: killed by SIGINT (130).
        import os, signal
        sys.stdout.flush(); sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(1)
"#;

/// The frame's decoder, shared with the fork server (`zygote.py`).
pub const FRAME: &str = include_str!("frame.py");

#[derive(Deserialize)]
struct Answer {
    executable: String,
    base_prefix: String,
    prefix: String,
    path: Vec<String>,
    version: String,
    modules: std::collections::BTreeMap<String, bool>,
}

/// Prefixes shared with the rest of the system: never bound whole.
fn is_system_prefix(p: &Path) -> bool {
    matches!(p.to_str(), Some("/" | "/usr" | "/usr/local"))
}

pub fn discover(python: &str, system_files: &[PathBuf]) -> Result<Runtime, DiscoveryError> {
    let mut args = vec!["-I", "-c", DISCOVER];
    args.extend_from_slice(OPTIONAL_MODULES);
    let a: Answer = ask(python, &args, "python_path", "PYTHON_PATH")?;
    let executable = PathBuf::from(&a.executable);
    let mut own: Vec<PathBuf> = a.path.iter().map(PathBuf::from).collect();
    for prefix in [&a.base_prefix, &a.prefix] {
        let p = PathBuf::from(prefix);
        if !is_system_prefix(&p) {
            own.push(p);
        }
    }
    let libraries = interpreter_libraries(&executable);
    let root = plan_root(&executable, &libraries, &own, system_files);
    Ok(Runtime {
        language: Language::Python3,
        program: executable,
        version: a.version,
        root,
        profile: Profile::Python,
        modules: a.modules.into_iter().collect(),
        search_path: a.path,
        env: Vec::new(),
    })
}

/// The bootstrap with the interpreter's own sys.path written in: with `-S` the `site`
/// module (and the .pth files it would execute at every start) is skipped, which halves
/// start-up, yet every discovered path, site-packages included, stays importable.
pub fn bootstrap(sys_path: &[String]) -> String {
    let list = serde_json::to_string(sys_path).unwrap_or_else(|_| "[]".into());
    crate::isolation::snippet::with_markers(
        &BOOTSTRAP
            .replace("__FRAME__", FRAME)
            .replace("__SYS_PATH__", &list),
    )
}

pub fn argv(program: &Path, sys_path: &[String]) -> Vec<String> {
    // -I: ignore PYTHON* variables and the user site; -S: no site (see bootstrap);
    // -B: the root is read-only anyway; -u: output reaches the server even when a
    // timeout kills the run.
    let mut argv: Vec<String> = [
        program.to_string_lossy().as_ref(),
        "-I",
        "-S",
        "-B",
        "-u",
        "-X",
        "utf8",
        "-c",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.push(bootstrap(sys_path));
    argv
}
