//! The languages: how each interpreter is found, what its read-only root holds, and how
//! it is started so that the snippet (read from fd 3) runs only after the sandbox is in
//! place.

pub mod nodejs;
pub mod python;
pub mod root;

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::isolation::spec::{Profile, RootPlan};
pub use crate::protocol::Language;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "{what} `{path}` does not run: {reason}. Install it or set {key} to a working interpreter"
    )]
    DoesNotRun {
        what: &'static str,
        path: String,
        key: &'static str,
        reason: String,
    },
    #[error("{what} `{path}` gave an answer that could not be read: {reason}")]
    BadAnswer {
        what: &'static str,
        path: String,
        reason: String,
    },
}

/// A discovered interpreter, ready to be started inside a sandbox.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub language: Language,
    /// The path the interpreter is opened at inside the root (the host path, mirrored).
    pub program: PathBuf,
    pub version: String,
    pub root: RootPlan,
    pub profile: Profile,
    /// Optional modules and whether the interpreter can import them (Python only).
    pub modules: Vec<(String, bool)>,
    /// The interpreter's module search path as it reported it (Python's sys.path).
    pub search_path: Vec<String>,
    /// Environment variables every run of this interpreter gets (`NAME=value`).
    pub env: Vec<String>,
}

/// The system CA bundle, if this host has one where distributions put it.
pub fn system_ca_bundle() -> Option<PathBuf> {
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

impl Runtime {
    /// Make a package directory importable: `import_path` goes on the search path ahead
    /// of site-packages, so the operator's requirements win over the interpreter's own
    /// copies; `bind`, when given, is bound read-only into every root (else each run
    /// binds its own generation at `import_path`).
    pub fn add_package_dir(&mut self, bind: Option<&Path>, import_path: &Path) {
        if let Some(root) = bind {
            self.add_bind(root);
        }
        let at = self
            .search_path
            .iter()
            .position(|p| p.contains("site-packages") || p.contains("dist-packages"))
            .unwrap_or(self.search_path.len());
        self.search_path
            .insert(at, import_path.to_string_lossy().into_owned());
    }

    /// Bind `path` read-only into every root of this runtime.
    pub fn add_bind(&mut self, path: &Path) {
        if !self.root.binds.iter().any(|b| path.starts_with(b)) {
            self.root.binds.push(path.to_path_buf());
        }
    }

    /// RLIMIT_AS for a run, when it is the memory limit: only without a cgroup, and
    /// only for Python. V8 reserves far more address space than it uses, so Node is
    /// limited by its heap flag instead (see `argv`).
    pub fn address_space_limit(&self, memory_mb: u64, cgroup: bool) -> Option<u64> {
        match (cgroup, self.language) {
            (false, Language::Python3) => Some((memory_mb << 20).max(64 << 20)),
            _ => None,
        }
    }

    /// argv for a run. `memory_mb` sizes Node's heap so V8 fails cleanly before the
    /// cgroup (or RLIMIT) has to kill it.
    pub fn argv(&self, memory_mb: u64) -> Vec<String> {
        match self.language {
            Language::Python3 => python::argv(&self.program, &self.search_path),
            Language::Nodejs => nodejs::argv(&self.program, memory_mb, &self.env),
        }
    }
}

/// Run `program args...` and read the JSON line it prints, or say why it did not run.
pub(crate) fn ask<T: serde::de::DeserializeOwned>(
    program: &str,
    args: &[&str],
    what: &'static str,
    key: &'static str,
) -> Result<T, DiscoveryError> {
    let fail = |reason: String| DiscoveryError::DoesNotRun {
        what,
        path: program.to_string(),
        key,
        reason,
    };
    let out = Command::new(program)
        .args(args)
        .env_remove("PYTHONPATH")
        .env_remove("NODE_OPTIONS")
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(out.stdout.trim_ascii()).map_err(|e| DiscoveryError::BadAnswer {
        what,
        path: program.to_string(),
        reason: e.to_string(),
    })
}

/// The shared libraries the interpreter at `executable` loads (through its links).
pub(crate) fn interpreter_libraries(executable: &Path) -> Vec<PathBuf> {
    let canonical = std::fs::canonicalize(executable).unwrap_or_else(|_| executable.to_path_buf());
    root::shared_libraries(&canonical)
}

/// Build the root for an interpreter: its own paths, its shared libraries (from
/// `interpreter_libraries`) and their directories, and the system files.
pub(crate) fn plan_root(
    executable: &Path,
    libraries: &[PathBuf],
    own_paths: &[PathBuf],
    system_files: &[PathBuf],
) -> RootPlan {
    let mut b = root::RootBuilder::new();
    b.add(executable);
    for lib in libraries {
        b.add(lib);
        // The whole library directory: extension modules load more libraries from it
        // (libssl, libffi, libz ...) than the interpreter binary itself lists.
        if let Some(dir) = lib.parent() {
            b.add(dir);
        }
    }
    for p in own_paths {
        b.add(p);
    }
    if system_files.is_empty() {
        for f in root::DEFAULT_SYSTEM_FILES {
            b.add(Path::new(f));
        }
    } else {
        for f in system_files {
            b.add(f);
        }
    }
    b.build()
}
