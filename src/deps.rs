//! Extra Python packages for snippets: `dependencies/python-requirements.txt` is
//! installed with pip into a package directory owned by the sandbox (never into the
//! interpreter's own site-packages), one generation at a time. A new generation is built
//! beside the old one and `current` is switched atomically, so runs in flight never see
//! a half-installed set; a failed install keeps the old set.
//!
//! Layout under `<state_dir>/python-packages/`: `gen-<time>-<pid>/` directories, the
//! `current` symlink, and `.lock` serialising installs across servers on one host.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dependency {
    pub name: String,
    pub version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DepsError {
    #[error(
        "cannot read the requirements file {path}: {source}. Check dependencies_path (DEPENDENCIES_PATH)"
    )]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare the package directory {path}: {source}. Make state_dir writable")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pip could not install the requirements (the previous packages stay in use): {0}")]
    Pip(String),
}

/// The package names of a pip requirements file (comments, options and markers dropped).
pub fn requirement_names(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty() && !l.starts_with('-'))
        .filter_map(|l| {
            let end = l
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
                .unwrap_or(l.len());
            let name = &l[..end];
            (!name.is_empty()).then(|| name.to_string())
        })
        .collect()
}

/// Point `link` at `target` atomically: a new link at `tmp`, renamed over the old one.
fn swap_link(link: &Path, tmp: &Path, target: &str) -> std::io::Result<()> {
    let _ = fs::remove_file(tmp);
    std::os::unix::fs::symlink(target, tmp)?;
    fs::rename(tmp, link)
}

/// pip's index options for a mirror; a plain-http mirror is also trusted, as pip
/// otherwise refuses it.
pub fn mirror_args(mirror: &str) -> Vec<String> {
    let mirror = mirror.trim();
    if mirror.is_empty() {
        return Vec::new();
    }
    let mut args = vec!["--index-url".to_string(), mirror.to_string()];
    if let Some(rest) = mirror.strip_prefix("http://") {
        let host = rest.split(['/', '?']).next().unwrap_or("");
        let host = host.rsplit('@').next().unwrap_or(host);
        let host = host.split(':').next().unwrap_or(host);
        if !host.is_empty() {
            args.push("--trusted-host".into());
            args.push(host.to_string());
        }
    }
    args
}

/// Name and version of every distribution installed in `dir` (from `*.dist-info/METADATA`).
pub fn installed_in(dir: &Path) -> Vec<Dependency> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".dist-info") {
            continue;
        }
        let Ok(meta) = fs::read_to_string(entry.path().join("METADATA")) else {
            continue;
        };
        let field = |key: &str| {
            meta.lines()
                .take_while(|l| !l.is_empty())
                .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        };
        if let (Some(name), Some(version)) = (field("Name:"), field("Version:")) {
            out.push(Dependency { name, version });
        }
    }
    out.sort_by_key(|d| d.name.to_lowercase());
    out
}

pub struct Dependencies {
    python: PathBuf,
    requirements: PathBuf,
    root: PathBuf,
    mirror: String,
    /// Chroot roots holding a copy of the package directory (the chroot level cannot
    /// bind-mount it); each new generation is copied there too, once the root is ready.
    chroot_copies: Vec<(PathBuf, crate::isolation::chroot_root::Roots)>,
    /// One install at a time in this process (the file lock covers other processes).
    busy: tokio::sync::Mutex<()>,
    /// Counts switches to a new generation, for whoever keeps modules loaded.
    generation: tokio::sync::watch::Sender<u64>,
}

const STAMP: &str = ".requirements";

impl Dependencies {
    pub fn new(
        python: PathBuf,
        requirements: PathBuf,
        state: &crate::state::StateDir,
        mirror: String,
    ) -> Result<Self, DepsError> {
        let root = state.python_packages();
        let dir_err = |source| DepsError::Dir {
            path: root.display().to_string(),
            source,
        };
        fs::create_dir_all(&root).map_err(dir_err)?;
        let deps = Self {
            python,
            requirements,
            root,
            mirror,
            chroot_copies: Vec::new(),
            busy: tokio::sync::Mutex::new(()),
            generation: tokio::sync::watch::Sender::new(0),
        };
        // Runs always find `current`, even before the first install finishes.
        if fs::symlink_metadata(deps.current()).is_err() {
            let empty = deps.root.join("gen-empty");
            fs::create_dir_all(&empty).map_err(|source| DepsError::Dir {
                path: empty.display().to_string(),
                source,
            })?;
            // Built from an empty requirements text: nothing to install for one.
            let _ = fs::write(empty.join(STAMP), "");
            deps.switch_to("gen-empty")?;
        }
        Ok(deps)
    }

    /// Also keep the copy of the package directory inside this chroot root current;
    /// installs wait for `ready` (the root's copy of the package directory is taken
    /// while it is built).
    pub fn add_chroot_copy(
        &mut self,
        chroot_root: PathBuf,
        ready: crate::isolation::chroot_root::Roots,
    ) {
        self.chroot_copies.push((chroot_root, ready));
    }

    /// The directory bound read-only into every Python root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path snippets import from (a symlink to the live generation).
    pub fn current(&self) -> PathBuf {
        self.root.join("current")
    }

    /// Changes whenever a new generation of packages goes live.
    pub fn generations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn list(&self) -> Vec<Dependency> {
        installed_in(&self.current())
    }

    fn read_requirements(&self) -> Result<String, DepsError> {
        match fs::read_to_string(&self.requirements) {
            Ok(t) => Ok(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(source) => Err(DepsError::Read {
                path: self.requirements.display().to_string(),
                source,
            }),
        }
    }

    /// Install the requirements into a new generation and switch to it. With `force`
    /// false, nothing happens when the live generation was built from the same text.
    pub async fn install(&self, force: bool) -> Result<(), DepsError> {
        let _busy = self.busy.lock().await;
        for (copy, ready) in &self.chroot_copies {
            ready.wait(copy).await.map_err(|e| DepsError::Dir {
                path: copy.display().to_string(),
                source: std::io::Error::other(e),
            })?;
        }
        let text = self.read_requirements()?;
        let live = fs::read_to_string(self.current().join(STAMP)).ok();
        let nothing_requested = requirement_names(&text).is_empty();
        if live.as_deref() == Some(text.as_str()) && (!force || nothing_requested) {
            return Ok(());
        }
        let lock_path = self.root.join(".lock");
        let lock_file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| DepsError::Dir {
                path: lock_path.display().to_string(),
                source,
            })?;
        let lock = tokio::task::spawn_blocking(move || {
            nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        })
        .await
        .map_err(|e| DepsError::Pip(e.to_string()))?
        .map_err(|(_, errno)| DepsError::Dir {
            path: lock_path.display().to_string(),
            source: errno.into(),
        })?;

        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let name = format!("gen-{stamp}-{}", std::process::id());
        let dir = self.root.join(&name);
        fs::create_dir_all(&dir).map_err(|source| DepsError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let result = if nothing_requested {
            Ok(())
        } else {
            self.pip(&dir).await
        };
        match result {
            Ok(()) => {
                fs::write(dir.join(STAMP), &text).map_err(|source| DepsError::Dir {
                    path: dir.display().to_string(),
                    source,
                })?;
                for (copy, _) in &self.chroot_copies {
                    let inside = crate::isolation::rootfs::inside(copy, &dir);
                    let link = crate::isolation::rootfs::inside(copy, &self.current());
                    crate::isolation::chroot_root::copy_tree(&dir, &inside)
                        .and_then(|_| swap_link(&link, &link.with_extension("new"), &name))
                        .map_err(|source| DepsError::Dir {
                            path: inside.display().to_string(),
                            source,
                        })?;
                }
                self.switch_to(&name)?;
                self.generation.send_modify(|g| *g += 1);
                self.remove_old(&name);
                tracing::info!(generation = %name, packages = installed_in(&dir).len(), "python dependencies installed");
                drop(lock);
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                tracing::error!(error = %e, "python dependencies: install failed; keeping the previous set");
                Err(e)
            }
        }
    }

    async fn pip(&self, target: &Path) -> Result<(), DepsError> {
        let mut cmd = tokio::process::Command::new(&self.python);
        cmd.args([
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--target",
        ])
        .arg(target)
        .arg("-r")
        .arg(&self.requirements)
        .args(mirror_args(&self.mirror))
        .env_remove("PYTHONPATH")
        .stdin(Stdio::null())
        .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(900), cmd.output())
            .await
            .map_err(|_| DepsError::Pip("pip did not finish within 15 minutes".into()))?
            .map_err(|e| {
                DepsError::Pip(format!("cannot run {} -m pip: {e}", self.python.display()))
            })?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(6)..].join("\n");
        Err(DepsError::Pip(format!("{} ({})", tail.trim(), out.status)))
    }

    /// Point `current` at `name` atomically (rename over the old link).
    fn switch_to(&self, name: &str) -> Result<(), DepsError> {
        let tmp = self.root.join(format!(".current-{}", std::process::id()));
        swap_link(&self.current(), &tmp, name).map_err(|source| DepsError::Dir {
            path: self.current().display().to_string(),
            source,
        })
    }

    /// Keep the live generation and the one before it (runs that started on it may
    /// still be importing); remove the rest.
    fn remove_old(&self, live: &str) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        let mut gens: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("gen-") && n != live && n != "gen-empty")
            .collect();
        gens.sort();
        gens.pop();
        for g in gens {
            let _ = fs::remove_dir_all(self.root.join(g));
        }
    }

    /// Install at start, then every `interval`.
    pub fn spawn_updater(self: std::sync::Arc<Self>, interval: Duration) {
        tokio::spawn(async move {
            let _ = self.install(false).await;
            if interval.is_zero() {
                return;
            }
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                let _ = self.install(true).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirement_lines_yield_names() {
        let text = "# comment\njinja2>=3.0\nrequests==2.31.0 ; python_version>'3'\n-r other.txt\n\nhttpx[http2]\nmy_pkg.sub\n";
        assert_eq!(
            requirement_names(text),
            vec!["jinja2", "requests", "httpx", "my_pkg.sub"]
        );
    }

    #[test]
    fn http_mirrors_are_trusted_https_ones_are_not() {
        assert!(mirror_args("").is_empty());
        assert_eq!(
            mirror_args("http://user:pw@mirror.local:8080/simple"),
            vec![
                "--index-url",
                "http://user:pw@mirror.local:8080/simple",
                "--trusted-host",
                "mirror.local"
            ]
        );
        assert_eq!(
            mirror_args("https://pypi.example/simple"),
            vec!["--index-url", "https://pypi.example/simple"]
        );
    }

    #[test]
    fn metadata_gives_names_and_versions() {
        let dir = tempfile::tempdir().unwrap();
        let info = dir.path().join("six-1.16.0.dist-info");
        fs::create_dir(&info).unwrap();
        fs::write(
            info.join("METADATA"),
            "Metadata-Version: 2.1\nName: six\nVersion: 1.16.0\n\nName: not-this\n",
        )
        .unwrap();
        fs::create_dir(dir.path().join("six")).unwrap();
        assert_eq!(
            installed_in(dir.path()),
            vec![Dependency {
                name: "six".into(),
                version: "1.16.0".into()
            }]
        );
    }
}
