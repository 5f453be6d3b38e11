//! Node.js: discovery, and a bootstrap that has finished all of its own work (reading
//! fd 3) before the snippet is compiled, so nothing the snippet redefines (a global
//! `parseInt`, `JSON`, `require`) can change what the bootstrap does.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{DiscoveryError, Language, Runtime, ask, plan_root};
use crate::isolation::spec::Profile;

const DISCOVER: &str =
    "console.log(JSON.stringify({exec: process.execPath, version: process.version}))";

/// Reads the frame from fd 3 (see `isolation::snippet`), acknowledges it, then runs
/// preload and code as scripts in the main context, in that order.
const BOOTSTRAP: &str = r#"'use strict';
{
  const fs = require('fs');
  const vm = require('vm');
  const d = fs.readFileSync(3);
  // Tells the sandbox the snippet arrived whole; nothing of it has run yet.
  fs.writeSync(3, '__ACK__');
  fs.closeSync(3);
  const nl = d.indexOf(10);
  const n = Number(d.subarray(0, nl).toString());
  const preload = d.subarray(nl + 1, nl + 1 + n).toString('utf8');
  const code = d.subarray(nl + 1 + n).toString('utf8');
  const scripts = [];
  if (n > 0) scripts.push(new vm.Script(preload, { filename: 'preload.js' }));
  scripts.push(new vm.Script(code, { filename: 'code.js' }));
  for (const s of scripts) s.runInThisContext();
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
    let root = plan_root(&executable, &[], system_files);
    Ok(Runtime {
        language: Language::Nodejs,
        program: executable,
        version: a.version,
        root,
        profile: Profile::Nodejs,
        modules: Vec::new(),
        search_path: Vec::new(),
        // Node trusts only its built-in CAs unless told otherwise; the host's bundle
        // (bound into the root) carries the operator's own CAs, such as a proxy's.
        env: super::system_ca_bundle()
            .map(|p| vec![format!("NODE_EXTRA_CA_CERTS={}", p.display())])
            .unwrap_or_default(),
    })
}

/// Heap for V8's old generation: three quarters of the run's memory, the rest is left
/// for code space, buffers and the runtime itself.
pub fn heap_mb(memory_mb: u64) -> u64 {
    (memory_mb * 3 / 4).max(16)
}

pub fn argv(program: &Path, memory_mb: u64) -> Vec<String> {
    vec![
        program.to_string_lossy().into_owned(),
        format!("--max-old-space-size={}", heap_mb(memory_mb)),
        "-e".into(),
        BOOTSTRAP.replace(
            "__ACK__",
            &char::from(crate::isolation::snippet::ACK).to_string(),
        ),
    ]
}
