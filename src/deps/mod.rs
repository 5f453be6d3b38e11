//! Extra packages for snippets, per language: Python's from a pip requirements file
//! (`dependencies/python-requirements.txt`), Node's from a `package.json`
//! (`dependencies/package.json`). Each is installed into a package directory owned by
//! the sandbox (never into the interpreter's own), one generation at a time: a new
//! generation is built beside the old one and `current` is switched atomically, so runs
//! in flight never see a half-installed set; a failed install keeps the old set.
//!
//! pip and npm run in a jail of their own (`Installer`, carried out by the engine): an
//! unprivileged uid, a read-only root, the run network, write access to the new
//! generation only. What they leave there is sealed (root's, read-only) before it goes
//! live, and read here without following links.
//!
//! Layout under `<state_dir>/<language>-packages/`: `gen-<time>-<pid>/` directories, the
//! `current` symlink, `stage-*` (the dependency file's directory as the installer sees
//! it, during an install) and `.lock`, serialising installs across servers on one host.

pub mod node;
pub mod python;
mod tree;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::isolation::spec::{JOB_MOUNT, OUT_MOUNT};
pub use crate::protocol::envelope::Dependency;
use crate::runtime::Language;

#[derive(Debug, thiserror::Error)]
pub enum DepsError {
    #[error("cannot read the dependency file {path}: {source}. Check {key}")]
    Read {
        path: String,
        key: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare the package directory {path}: {source}. Make state_dir writable")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{manager} could not install {file} (the previous packages stay in use): {message}")]
    Install {
        manager: &'static str,
        file: String,
        message: String,
    },
}

/// One install for the engine to carry out in the installer's jail.
#[derive(Debug, Clone)]
pub struct InstallJob {
    pub language: Language,
    /// The installer, as the snippet the jail's interpreter runs.
    pub code: String,
    /// The dependency file's directory as staged: bound read-only at `/job`, the cwd.
    pub job: PathBuf,
    /// The new generation: bound writable at `/tmp/out`, the only place it may write.
    pub out: PathBuf,
}

/// Runs installers in a jail (the engine).
pub trait Installer {
    /// Run `job`; Err holds the installer's own message.
    fn install(&self, job: InstallJob) -> impl Future<Output = Result<(), String>> + Send;
}

/// What `doctor` and `/metrics` show of a language's packages.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Status {
    /// Installs that went live since the server started (the watch channel's count).
    pub generation: u64,
    /// The live generation's directory name.
    pub live: String,
    pub packages: usize,
    /// The last install tried: whether it went live, and the installer's message if not.
    pub last_ok: Option<bool>,
    pub last_error: String,
    /// Seconds since the epoch of the last install tried.
    pub last_at: u64,
}

const STAMP: &str = ".requirements";
/// The last install's result, kept for `sandbox doctor` (another process).
const LAST_INSTALL: &str = "last-install.json";
/// Beside the dependency files: wheels and sdists for pip, `npm-cache/` for npm; used
/// instead of any index when present.
pub const OFFLINE_DIR: &str = "offline";
const NPM_CACHE: &str = "npm-cache";

/// The package manager a language's set is installed with, and where things are.
#[derive(Debug, Clone)]
enum Manager {
    Pip,
    /// npm's `npm-cli.js`, when this host has npm.
    Npm(Option<PathBuf>),
}

/// The dependency file as read now: its text, its lock file's, and what decides whether
/// the live generation is still what it asks for.
struct Spec {
    text: String,
    lock: Option<String>,
    fingerprint: String,
    requested: usize,
}

/// One language's extra packages.
pub struct PackageSet {
    language: Language,
    manager: Manager,
    file: PathBuf,
    root: PathBuf,
    mirror: String,
    ca_bundle: Option<PathBuf>,
    /// Chroot roots holding a copy of the package directory (the chroot level cannot
    /// bind-mount it); each new generation is copied there too, once the root is ready.
    chroot_copies: Vec<(PathBuf, crate::isolation::chroot_root::Roots)>,
    /// One install at a time in this process (the file lock covers other processes).
    busy: tokio::sync::Mutex<()>,
    /// Counts switches to a new generation, for whoever keeps packages loaded.
    generation: tokio::sync::watch::Sender<u64>,
    status: Mutex<Status>,
    /// The files of the last install that failed: not tried again until they change
    /// (or an install is asked for), so a broken file does not loop the installer.
    failed: Mutex<Option<String>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Point `link` at `target` atomically: a new link at `tmp`, renamed over the old one.
fn swap_link(link: &Path, tmp: &Path, target: &str) -> std::io::Result<()> {
    let _ = fs::remove_file(tmp);
    std::os::unix::fs::symlink(target, tmp)?;
    fs::rename(tmp, link)
}

fn dir_err(path: &Path) -> impl FnOnce(std::io::Error) -> DepsError + '_ {
    move |source| DepsError::Dir {
        path: path.display().to_string(),
        source,
    }
}

impl PackageSet {
    /// Python's set: pip run by `python`, from the requirements file `file`.
    pub fn python(
        file: PathBuf,
        state: &crate::state::StateDir,
        mirror: String,
    ) -> Result<Self, DepsError> {
        Self::new(Language::Python3, Manager::Pip, file, state, mirror)
    }

    /// Node's set: npm (found beside `node`), from the `package.json` `file`.
    pub fn nodejs(
        node: &Path,
        file: PathBuf,
        state: &crate::state::StateDir,
        mirror: String,
    ) -> Result<Self, DepsError> {
        let npm = node::find_npm_cli(node);
        Self::new(Language::Nodejs, Manager::Npm(npm), file, state, mirror)
    }

    fn new(
        language: Language,
        manager: Manager,
        file: PathBuf,
        state: &crate::state::StateDir,
        mirror: String,
    ) -> Result<Self, DepsError> {
        let root = state.packages(language);
        fs::create_dir_all(&root).map_err(dir_err(&root))?;
        let set = Self {
            language,
            manager,
            file,
            root,
            mirror,
            ca_bundle: crate::runtime::system_ca_bundle(),
            chroot_copies: Vec::new(),
            busy: tokio::sync::Mutex::new(()),
            generation: tokio::sync::watch::Sender::new(0),
            status: Mutex::new(Status::default()),
            failed: Mutex::new(None),
        };
        // Runs always find `current`, even before the first install finishes.
        if fs::symlink_metadata(set.current()).is_err() {
            let empty = set.root.join("gen-empty");
            fs::create_dir_all(empty.join("node_modules")).map_err(dir_err(&empty))?;
            // Built from an empty dependency file: nothing to install for one.
            let _ = fs::write(empty.join(STAMP), "");
            set.switch_to("gen-empty")?;
        }
        // What a server before this one last tried (generation counts this server's).
        if let Some(last) = fs::read_to_string(set.root.join(LAST_INSTALL))
            .ok()
            .and_then(|t| serde_json::from_str::<Status>(&t).ok())
        {
            let mut s = set.status.lock().unwrap_or_else(|p| p.into_inner());
            s.last_ok = last.last_ok;
            s.last_error = last.last_error;
            s.last_at = last.last_at;
        }
        set.note_live();
        Ok(set)
    }

    /// Whether the dependency file asks for packages and this host lacks the installer
    /// (npm is packaged apart from Node).
    pub fn installer_missing(&self) -> bool {
        matches!(self.manager, Manager::Npm(None))
            && self.read_spec().is_ok_and(|s| s.requested > 0)
    }

    pub fn language(&self) -> Language {
        self.language
    }

    /// The dependency file.
    pub fn file(&self) -> &Path {
        &self.file
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

    /// The directory holding every generation.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path that leads to the live generation (a symlink).
    pub fn current(&self) -> PathBuf {
        self.root.join("current")
    }

    /// The live generation's own directory, for a run to keep whatever goes live while
    /// it runs.
    pub fn live_dir(&self) -> PathBuf {
        match fs::read_link(self.current()) {
            Ok(name) => self.root.join(name),
            Err(_) => self.current(),
        }
    }

    /// Changes whenever a new generation of packages goes live.
    pub fn generations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn list(&self) -> Vec<Dependency> {
        match self.manager {
            Manager::Pip => python::installed_in(&self.current()),
            Manager::Npm(_) => node::installed_in(&self.current()),
        }
    }

    pub fn status(&self) -> Status {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // The switches this process made, as the watch channel counts them.
        s.generation = *self.generation.borrow();
        s
    }

    fn note_live(&self) {
        let live = fs::read_link(self.current())
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        let packages = self.list().len();
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.live = live;
        s.packages = packages;
    }

    fn note_result(&self, result: &Result<bool, DepsError>) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.last_at = now_secs();
        match result {
            Ok(_) => {
                s.last_ok = Some(true);
                s.last_error.clear();
            }
            Err(e) => {
                s.last_ok = Some(false);
                s.last_error = e.to_string();
            }
        }
        if let Ok(text) = serde_json::to_string(&*s) {
            let _ = fs::write(self.root.join(LAST_INSTALL), text);
        }
    }

    fn manager_name(&self) -> &'static str {
        match self.manager {
            Manager::Pip => "pip",
            Manager::Npm(_) => "npm",
        }
    }

    fn config_key(&self) -> &'static str {
        match self.manager {
            Manager::Pip => "dependencies_path (DEPENDENCIES_PATH)",
            Manager::Npm(_) => "nodejs_dependencies_path (NODEJS_DEPENDENCIES_PATH)",
        }
    }

    fn install_error(&self, message: impl Into<String>) -> DepsError {
        DepsError::Install {
            manager: self.manager_name(),
            file: self.file.display().to_string(),
            message: message.into(),
        }
    }

    fn read_optional(&self, path: &Path) -> Result<Option<String>, DepsError> {
        match fs::read_to_string(path) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(DepsError::Read {
                path: path.display().to_string(),
                key: self.config_key(),
                source,
            }),
        }
    }

    fn dir(&self) -> PathBuf {
        self.file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    fn lock_file(&self) -> Option<PathBuf> {
        matches!(self.manager, Manager::Npm(_)).then(|| self.dir().join("package-lock.json"))
    }

    /// The offline directory, when it holds what this manager installs from.
    fn offline(&self) -> Option<PathBuf> {
        let dir = self.dir().join(OFFLINE_DIR);
        match self.manager {
            Manager::Pip => fs::read_dir(&dir)
                .ok()?
                .flatten()
                .any(|e| e.file_name() != NPM_CACHE)
                .then_some(dir),
            Manager::Npm(_) => dir.join(NPM_CACHE).is_dir().then_some(dir),
        }
    }

    fn read_spec(&self) -> Result<Spec, DepsError> {
        let text = self.read_optional(&self.file)?.unwrap_or_default();
        let lock = match self.lock_file() {
            Some(path) => self.read_optional(&path)?,
            None => None,
        };
        let requested = match self.manager {
            Manager::Pip => python::requirement_names(&text).len(),
            Manager::Npm(_) => node::requested(&text)
                .map_err(|e| self.install_error(e.to_string()))?
                .len(),
        };
        let mut fingerprint = text.clone();
        if let Some(lock) = &lock {
            fingerprint.push_str("\n--lock--\n");
            fingerprint.push_str(lock);
        }
        if let Some(offline) = self.offline() {
            fingerprint.push_str("\n--offline--\n");
            let mut names: Vec<String> = fs::read_dir(offline)
                .map(|es| {
                    es.flatten()
                        .map(|e| {
                            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                            format!("{} {len}", e.file_name().to_string_lossy())
                        })
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            fingerprint.push_str(&names.join("\n"));
        }
        if !self.mirror.is_empty() {
            fingerprint.push_str("\n--mirror--\n");
            fingerprint.push_str(&self.mirror);
        }
        Ok(Spec {
            text,
            lock,
            fingerprint,
            requested,
        })
    }

    /// Whether the dependency file (or what goes with it) no longer matches the live
    /// generation. Cheap: a few small reads.
    pub fn changed(&self) -> bool {
        let live = fs::read_to_string(self.current().join(STAMP)).ok();
        let failed = self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match self.read_spec() {
            Ok(spec) => {
                live.as_deref() != Some(spec.fingerprint.as_str())
                    && failed.as_deref() != Some(spec.fingerprint.as_str())
            }
            Err(e) => failed.as_deref() != Some(e.to_string().as_str()),
        }
    }

    /// Install the dependency file into a new generation and switch to it. With `force`
    /// false, nothing happens when the live generation was built from the same files.
    pub async fn install<I: Installer>(&self, force: bool, installer: &I) -> Result<(), DepsError> {
        let _busy = self.busy.lock().await;
        // What this install tried: a failure is not tried again until the files differ.
        let mut tried = None;
        let result = self.install_locked(force, installer, &mut tried).await;
        if !matches!(result, Ok(false)) || force {
            self.note_result(&result);
        }
        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = match &result {
            Ok(_) => None,
            Err(e) => Some(tried.unwrap_or_else(|| e.to_string())),
        };
        self.note_live();
        match result {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::error!(language = %self.language, error = %e, "dependencies: install failed; keeping the previous set");
                Err(e)
            }
        }
    }

    /// Ok(true) when a new generation went live.
    /// `tried`: the fingerprint of the files it read (the error's text when they could not
    /// be read), what `changed` compares a failed install with.
    async fn install_locked<I: Installer>(
        &self,
        force: bool,
        installer: &I,
        tried: &mut Option<String>,
    ) -> Result<bool, DepsError> {
        let spec = self
            .read_spec()
            .inspect_err(|e| *tried = Some(e.to_string()))?;
        *tried = Some(spec.fingerprint.clone());
        for (copy, ready) in &self.chroot_copies {
            ready.wait(copy).await.map_err(|e| DepsError::Dir {
                path: copy.display().to_string(),
                source: std::io::Error::other(e),
            })?;
        }
        let live = fs::read_to_string(self.current().join(STAMP)).ok();
        let nothing_requested = spec.requested == 0;
        if live.as_deref() == Some(spec.fingerprint.as_str()) && (!force || nothing_requested) {
            return Ok(false);
        }
        let lock_path = self.root.join(".lock");
        let lock_file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(dir_err(&lock_path))?;
        let lock = tokio::task::spawn_blocking(move || {
            nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        })
        .await
        .map_err(|e| self.install_error(e.to_string()))?
        .map_err(|(_, errno)| DepsError::Dir {
            path: lock_path.display().to_string(),
            source: errno.into(),
        })?;

        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let name = format!("gen-{stamp}-{}", std::process::id());
        let dir = self.root.join(&name);
        fs::create_dir_all(&dir).map_err(dir_err(&dir))?;
        let result = if nothing_requested {
            fs::create_dir_all(dir.join("node_modules")).map_err(dir_err(&dir))
        } else {
            self.run_installer(&spec, &dir, &name, installer).await
        };
        let result = result.and_then(|()| {
            let bytes = tree::seal(&dir).map_err(dir_err(&dir))?;
            fs::write(dir.join(STAMP), &spec.fingerprint).map_err(dir_err(&dir))?;
            for (copy, _) in &self.chroot_copies {
                let inside = crate::isolation::rootfs::inside(copy, &dir);
                let link = crate::isolation::rootfs::inside(copy, &self.current());
                crate::isolation::chroot_root::copy_tree(&dir, &inside)
                    .and_then(|_| swap_link(&link, &link.with_extension("new"), &name))
                    .map_err(dir_err(&inside))?;
            }
            self.switch_to(&name)?;
            Ok(bytes)
        });
        drop(lock);
        match result {
            Ok(bytes) => {
                self.generation.send_modify(|g| *g += 1);
                self.remove_old(&name);
                tracing::info!(language = %self.language, generation = %name, bytes, packages = self.list().len(), "dependencies installed");
                Ok(true)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Stage what the installer may read, write the manifest, run the installer.
    async fn run_installer<I: Installer>(
        &self,
        spec: &Spec,
        dir: &Path,
        name: &str,
        installer: &I,
    ) -> Result<(), DepsError> {
        let stage = self.root.join(format!("stage-{name}"));
        let staged = self.stage(spec, &stage);
        let result = match staged {
            Ok(()) => self.installer_job(spec, dir, &stage, installer).await,
            Err(e) => Err(e),
        };
        let _ = fs::remove_dir_all(&stage);
        result
    }

    async fn installer_job<I: Installer>(
        &self,
        spec: &Spec,
        dir: &Path,
        stage: &Path,
        installer: &I,
    ) -> Result<(), DepsError> {
        let job = Path::new(JOB_MOUNT);
        let out = Path::new(OUT_MOUNT);
        let offline = self.offline().map(|_| job.join(OFFLINE_DIR));
        let mirror = self.mirror.trim();
        let file_name = self
            .file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let code = match &self.manager {
            Manager::Pip => {
                let ca = self.ca_bundle.as_deref();
                python::installer_code(&python::pip_args(
                    &file_name,
                    out,
                    mirror,
                    offline.as_deref(),
                    ca,
                ))
            }
            Manager::Npm(None) => {
                return Err(self.install_error(
                    "npm was not found beside node or on PATH: install npm (Debian: apt-get install npm)",
                ));
            }
            Manager::Npm(Some(cli)) => {
                let manifest = node::manifest_for(&spec.text, job)
                    .map_err(|e| self.install_error(e.to_string()))?;
                fs::write(dir.join("package.json"), manifest).map_err(dir_err(dir))?;
                if let Some(lock) = &spec.lock {
                    fs::write(dir.join("package-lock.json"), lock).map_err(dir_err(dir))?;
                }
                let cache = Path::new("/tmp/npm-cache");
                let args = node::npm_args(out, mirror, offline.as_ref().map(|_| cache));
                let copy = offline
                    .as_ref()
                    .map(|o| (o.join(NPM_CACHE), cache.to_path_buf()));
                node::installer_code(
                    cli,
                    &args,
                    copy.as_ref().map(|(a, b)| (a.as_path(), b.as_path())),
                )
            }
        };
        installer
            .install(InstallJob {
                language: self.language,
                code,
                job: stage.to_path_buf(),
                out: dir.to_path_buf(),
            })
            .await
            .map_err(|message| self.install_error(message))
    }

    /// The installer sees the dependency file, its lock file, the offline directory and
    /// the local packages the file names, nothing else of the directory (a config file
    /// beside them with the API key, say).
    fn stage(&self, spec: &Spec, stage: &Path) -> Result<(), DepsError> {
        let _ = fs::remove_dir_all(stage);
        fs::create_dir_all(stage).map_err(dir_err(stage))?;
        let from = self.dir();
        let mut names: Vec<PathBuf> = vec![PathBuf::from(OFFLINE_DIR)];
        names.extend(match self.manager {
            Manager::Pip => python::local_paths(&spec.text),
            Manager::Npm(_) => node::local_paths(&spec.text),
        });
        if let Some(file) = self.file.file_name() {
            fs::write(stage.join(file), &spec.text).map_err(dir_err(stage))?;
        }
        for rel in names {
            // Only what lies inside the file's directory.
            let clean: PathBuf = rel
                .components()
                .filter(|c| matches!(c, std::path::Component::Normal(_)))
                .collect();
            if clean.as_os_str().is_empty() || rel.components().any(|c| c.as_os_str() == "..") {
                continue;
            }
            let src = from.join(&clean);
            let dst = stage.join(&clean);
            let Ok(meta) = fs::metadata(&src) else {
                continue;
            };
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent).map_err(dir_err(parent))?;
            }
            let copied = if meta.is_dir() {
                crate::isolation::chroot_root::copy_tree(&src, &dst)
            } else {
                fs::copy(&src, &dst).map(|_| ())
            };
            copied.map_err(dir_err(&src))?;
        }
        Ok(())
    }

    /// Point `current` at `name` atomically (rename over the old link).
    fn switch_to(&self, name: &str) -> Result<(), DepsError> {
        let tmp = self.root.join(format!(".current-{}", std::process::id()));
        swap_link(&self.current(), &tmp, name).map_err(dir_err(&self.current()))
    }

    /// Keep the live generation and the two before it (runs that started on them may
    /// still be running); remove the rest, and stages an interrupted install left.
    fn remove_old(&self, live: &str) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        let names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let mut gens: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with("gen-") && *n != live && *n != "gen-empty")
            .collect();
        gens.sort();
        let keep = gens.len().saturating_sub(2);
        for g in &gens[..keep] {
            let _ = fs::remove_dir_all(self.root.join(g));
        }
        for stage in names.iter().filter(|n| n.starts_with("stage-")) {
            let _ = fs::remove_dir_all(self.root.join(stage));
        }
    }
}

/// How often the dependency files are looked at for changes.
pub const POLL: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    /// An installer that writes what a real one would, without a jail: for the
    /// bookkeeping around installs (the jail itself is tested with the real engine).
    struct Writes(Result<(), String>);

    impl Installer for Writes {
        async fn install(&self, job: InstallJob) -> Result<(), String> {
            fs::create_dir_all(job.out.join("six-1.0.dist-info")).unwrap();
            fs::write(
                job.out.join("six-1.0.dist-info/METADATA"),
                "Name: six\nVersion: 1.0\n",
            )
            .unwrap();
            assert!(job.job.join("python-requirements.txt").is_file());
            assert!(
                !job.job.join("config.yaml").exists(),
                "only the dependency files are staged"
            );
            self.0.clone()
        }
    }

    #[tokio::test]
    async fn a_failed_install_keeps_the_live_generation_and_says_why() {
        let deps = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let file = deps.path().join("python-requirements.txt");
        fs::write(&file, "six\n").unwrap();
        fs::write(deps.path().join("config.yaml"), "api_key: secret\n").unwrap();
        let set = PackageSet::python(
            file.clone(),
            &crate::state::StateDir::new(state.path()),
            String::new(),
        )
        .unwrap();
        assert!(set.changed());
        set.install(false, &Writes(Ok(()))).await.unwrap();
        assert_eq!(set.list().len(), 1);
        assert!(!set.changed());
        let live = set.live_dir();
        let status = set.status();
        assert_eq!((status.generation, status.last_ok), (1, Some(true)));

        fs::write(&file, "six\nnot-a-package\n").unwrap();
        let err = set
            .install(false, &Writes(Err("No matching distribution".into())))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("No matching distribution"),
            "{err}"
        );
        assert_eq!(set.live_dir(), live, "the old generation stays live");
        let status = set.status();
        assert_eq!(status.last_ok, Some(false));
        assert!(status.last_error.contains("No matching distribution"));
        assert_eq!(status.generation, 1);
    }
}
