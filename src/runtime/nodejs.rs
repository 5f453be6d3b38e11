//! Node.js: discovery, and a bootstrap that has finished all of its own work (reading
//! fd 3) before the snippet is compiled, so nothing the snippet redefines (a global
//! `parseInt`, `JSON`, `require`) can change what the bootstrap does.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{DiscoveryError, Language, Runtime, ask, interpreter_libraries, plan_root};
use crate::isolation::spec::Profile;

const DISCOVER: &str =
    "console.log(JSON.stringify({exec: process.execPath, version: process.version}))";

/// Reads the frame from fd 3 (see `isolation::snippet`), acknowledges it, applies the
/// snippet's argv and environment, then runs preload and code. The code is an ES module
/// or a script as Node would decide: `.mjs` a module, `.cjs` a script, `.js` by the
/// nearest `package.json`'s "type" (its inputs under /job); a module is imported from
/// its file when it has one, else from its text. A script runs in the main context, and
/// with an absolute filename (`/job/app.js`) gets a `require` that resolves beside it,
/// and `__filename` / `__dirname`.
const BOOTSTRAP: &str = r#"'use strict';
{
  const fs = require('fs');
  const vm = require('vm');
  // Made ready while the worker waits, so a snippet does not pay for them: the output
  // streams and the formatter behind console.log, which Node builds on first use.
  process.stdout;
  process.stderr;
  require('util').format('%s %d %j %o', 's', 1, {}, [1]);
  const d = fs.readFileSync(3);
  // Tells the sandbox the snippet arrived whole; nothing of it has run yet.
  fs.writeSync(3, '__ACK__');
  // Once the 'exit' listeners have run, the output is complete: close it and announce
  // the exit status on fd 3, so the answer does not wait for V8's teardown. Not after an
  // uncaught exception: Node prints it after 'exit'.
  let fatal = false;
  process.on('uncaughtExceptionMonitor', () => { fatal = true; });
  const emit = process.emit;
  process.emit = function (event, ...rest) {
    const result = emit.call(this, event, ...rest);
    if (event === 'exit' && !fatal) {
      try {
        const code = Number(process.exitCode ?? rest[0] ?? 0) & 0xff;
        fs.closeSync(1);
        fs.closeSync(2);
        fs.writeSync(3, '__ENDED__' + code);
        fs.closeSync(3);
      } catch {}
    }
    return result;
  };
  let i = d.indexOf(10);
  const [p, a, e] = d.subarray(0, i).toString().split(' ').map(Number);
  const v = [];
  for (i += 1; v.length < 1 + a + e; ) {
    const j = d.indexOf(10, i);
    const k = j + 1 + Number(d.subarray(i, j).toString());
    v.push(d.subarray(j + 1, k).toString('utf8'));
    i = k;
  }
  const filename = v[0] || 'code.js';
  if (a > 0) process.argv = [process.execPath, ...v.slice(1, 1 + a)];
  for (const kv of v.slice(1 + a)) {
    const eq = kv.indexOf('=');
    process.env[kv.slice(0, eq)] = kv.slice(eq + 1);
  }
  const path = require('path');
  const isModule = (() => {
    if (filename.endsWith('.mjs')) return true;
    if (!filename.endsWith('.js') || !filename.startsWith('/')) return false;
    for (let dir = path.dirname(filename); ; dir = path.dirname(dir)) {
      try {
        return JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')).type === 'module';
      } catch (e) {
        if (e.code !== 'ENOENT') return false;
      }
      if (dir === '/') return false;
    }
  })();
  const preload = d.subarray(i, i + p).toString('utf8');
  const code = d.subarray(i + p).toString('utf8');
  if (p > 0) new vm.Script(preload, { filename: 'preload.js' }).runInThisContext();
  if (isModule) {
    const url = filename.startsWith('/') && fs.existsSync(filename)
      ? require('url').pathToFileURL(filename).href
      : 'data:text/javascript;base64,' + Buffer.from(code).toString('base64');
    // A module sees none of the CommonJS names `node -e` gives this bootstrap.
    for (const name of ['require', 'module', 'exports', '__filename', '__dirname']) {
      try { delete globalThis[name]; } catch {}
    }
    // An error the module throws goes unhandled, and Node reports it as `node file.mjs`
    // would.
    import(url);
  } else {
    if (filename.startsWith('/')) {
      globalThis.require = require('module').createRequire(filename);
      globalThis.__filename = filename;
      globalThis.__dirname = path.dirname(filename);
    }
    new vm.Script(code, { filename }).runInThisContext();
  }
}
"#;

#[derive(Deserialize)]
struct Answer {
    exec: String,
    version: String,
}

pub fn discover(node: &str, system_files: &[PathBuf]) -> Result<Runtime, DiscoveryError> {
    let a: Answer = ask(node, &["-e", DISCOVER], "nodejs_path", "NODEJS_PATH")?;
    let executable = PathBuf::from(&a.exec);
    // A distribution's Node (a shared libnode) reads some built-in modules from files of
    // other packages: their directories join its root.
    let libraries = interpreter_libraries(&executable);
    let builtins: Vec<PathBuf> = super::root::node_builtin_scripts(&libraries)
        .iter()
        .filter_map(|script| script.parent().map(Path::to_path_buf))
        .collect();
    let root = plan_root(&executable, &libraries, &builtins, system_files);
    Ok(Runtime {
        language: Language::Nodejs,
        program: executable,
        version: a.version,
        root,
        profile: Profile::Nodejs,
        modules: Vec::new(),
        search_path: Vec::new(),
        // Node trusts only its built-in CAs unless told otherwise; the host's bundle
        // (bound into the root) carries the operator's own CAs, such as a proxy's. Read
        // through OpenSSL's store (see `argv`), it is loaded by the first TLS connection;
        // NODE_EXTRA_CA_CERTS would parse all of it at every start, which is two thirds
        // of a bare Node start's CPU (74 ms instead of 24 ms here).
        env: super::system_ca_bundle()
            .map(|p| vec![format!("{CA_FILE_ENV}={}", p.display())])
            .unwrap_or_default(),
    })
}

/// Heap for V8's old generation: three quarters of the run's memory, the rest is left
/// for code space, buffers and the runtime itself.
pub fn heap_mb(memory_mb: u64) -> u64 {
    (memory_mb * 3 / 4).max(16)
}

/// OpenSSL's variable naming its CA file.
const CA_FILE_ENV: &str = "SSL_CERT_FILE";

/// The command line of a run; `env` is the run's environment.
pub fn argv(program: &Path, memory_mb: u64, env: &[String]) -> Vec<String> {
    let mut argv = vec![
        program.to_string_lossy().into_owned(),
        format!("--max-old-space-size={}", heap_mb(memory_mb)),
    ];
    if env
        .iter()
        .any(|e| e.starts_with(&format!("{CA_FILE_ENV}=")))
    {
        // Trust OpenSSL's store, which SSL_CERT_FILE points at the host's bundle.
        argv.push("--use-openssl-ca".into());
    }
    argv.extend([
        "-e".into(),
        crate::isolation::snippet::with_markers(BOOTSTRAP),
    ]);
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_bundle_is_trusted_through_openssl_only_when_named() {
        let with = argv(
            Path::new("/usr/bin/node"),
            256,
            &["SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt".to_string()],
        );
        assert_eq!(with[1], "--max-old-space-size=192");
        assert_eq!(with[2], "--use-openssl-ca");
        assert_eq!(with[3], "-e");
        let without = argv(Path::new("/usr/bin/node"), 256, &[]);
        assert!(!without.iter().any(|a| a == "--use-openssl-ca"));
        assert_eq!(without[2], "-e");
    }
}
