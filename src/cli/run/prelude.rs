//! What `--server` sends in place of the code: Dify's protocol carries code only, so the
//! snippet's argv, environment and stdin travel inside it. The code becomes a short
//! launcher that sets `sys.argv`, `os.environ` and `sys.stdin` (Python) or
//! `process.argv`, `process.env` and `process.stdin` (Node), then compiles and runs the
//! original code, carried base64-encoded, under the same name a local run gives it. The
//! original is compiled on its own, so its line numbers, `from __future__` imports and
//! `'use strict'` stay what they are locally.
//!
//! What a remote snippet cannot have: stdin read from descriptor 0 itself (`os.read(0)`,
//! `fs.readFileSync(0)`) sees the server's empty stdin; only the streams above carry it.

use base64::Engine as _;
use serde::Serialize;

use crate::protocol::Invocation;
use crate::protocol::Language;

/// The small part of the launcher's data, as JSON.
#[derive(Serialize)]
struct Meta<'a> {
    argv: &'a [String],
    env: &'a [(String, String)],
    filename: &'a str,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

const PYTHON: &str = r#"import base64 as _b, io as _i, json as _j, os as _o, sys as _s
_m = _j.loads(_b.b64decode("__META__"))
_s.argv = _m["argv"]
_o.environ.update(_m["env"])
_s.stdin = _i.TextIOWrapper(_i.BytesIO(_b.b64decode("__STDIN__")), encoding="utf-8", errors="surrogateescape")
_g = {"__name__": "__main__", "__builtins__": __builtins__, "__doc__": None}
if _m["filename"].startswith("/"):
    _g["__file__"] = _m["filename"]
try:
    exec(compile(_b.b64decode("__CODE__"), _m["filename"], "exec"), _g)
except SystemExit:
    raise
except BaseException as _e:
    import traceback
    # The snippet's frames only, as a local run shows them.
    traceback.print_exception(type(_e), _e, _e.__traceback__.tb_next)
    _s.exit(1)
"#;

const NODE: &str = r#"{
  const m = JSON.parse(Buffer.from('__META__', 'base64').toString('utf8'));
  process.argv = [process.execPath, ...m.argv];
  for (const [k, v] of m.env) process.env[k] = v;
  const stdin = new (require('stream').Readable)({ read() {} });
  const data = Buffer.from('__STDIN__', 'base64');
  if (data.length > 0) stdin.push(data);
  stdin.push(null);
  Object.defineProperty(process, 'stdin', { value: stdin, configurable: true, enumerable: true, writable: true });
  require('vm').runInThisContext(Buffer.from('__CODE__', 'base64').toString('utf8'), { filename: m.filename });
}
"#;

/// The code to send for `code`, run as `how` says with `stdin` as its input.
pub(super) fn launcher(language: Language, code: &str, how: &Invocation, stdin: &[u8]) -> String {
    let meta = Meta {
        argv: &how.argv,
        env: &how.env,
        filename: &how.filename,
    };
    // Serialising strings and pairs cannot fail.
    let meta = serde_json::to_vec(&meta).unwrap_or_default();
    let template = match language {
        Language::Python3 => PYTHON,
        Language::Nodejs => NODE,
    };
    // Base64 holds neither quotes nor the placeholders' underscores: the order of the
    // replacements cannot matter.
    template
        .replace("__META__", &b64(&meta))
        .replace("__STDIN__", &b64(stdin))
        .replace("__CODE__", &b64(code.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_launcher_carries_everything_encoded() {
        let how = Invocation {
            filename: "/job/job.py".into(),
            argv: vec!["job.py".into(), "a \"b\"".into()],
            env: vec![("MODE".into(), "ci'\n".into())],
        };
        let py = launcher(Language::Python3, "print('x')", &how, b"in");
        assert!(py.contains(&b64(b"print('x')")) && py.contains(&b64(b"in")));
        assert!(!py.contains("print('x')") && !py.contains("ci'"), "{py}");
        assert!(!py.contains("__META__") && !py.contains("__CODE__") && !py.contains("__STDIN__"));
        let js = launcher(Language::Nodejs, "console.log(1)", &how, b"");
        assert!(
            js.contains("Buffer.from('', 'base64')"),
            "empty stdin: {js}"
        );
        assert!(js.contains(&b64(b"console.log(1)")));
    }
}
