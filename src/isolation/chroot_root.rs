//! The degraded level's root: where mounts are not permitted (an unprivileged
//! container), the language root is copied (hard-linked where that is cheap) into a
//! directory in the background at start, kept for later starts while the interpreter's
//! files are unchanged, and runs chroot into it.

use std::collections::HashMap;
use std::fs::{self, File, FileTimes, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::sys::statfs::{OVERLAYFS_SUPER_MAGIC, statfs};

use super::rootfs::{DEVICES, inside, make_dirs, recreate_symlinks};
use super::spec::RootPlan;
use super::uids::SANDBOX_UIDS;

const MARKER: &str = ".sandbox-root";
/// Changes when the layout below does, so older roots are rebuilt.
const LAYOUT: &str = "4";

/// One root's state: None while it is being prepared.
type Readiness = tokio::sync::watch::Receiver<Option<Result<(), RootError>>>;

/// Why runs of a language cannot have their chroot root (until the server restarts).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RootError {
    #[error(transparent)]
    Prepare(Arc<PrepareError>),
    #[error(
        "cannot start the thread preparing the chroot roots: {0}; the host is short of threads or memory: restart the server once it has room"
    )]
    Thread(Arc<io::Error>),
    #[error(
        "the preparation of the chroot root {} ended without a result; restart the server, and read its log for why", .0.display()
    )]
    Abandoned(PathBuf),
}

/// The chroot level's roots, prepared one after the other on a thread of their own so
/// that the server listens at once; a run (or warm worker) waits for its language's
/// root before it starts. Copying an interpreter's root takes seconds in a container
/// (see `Fill`).
#[derive(Debug, Clone, Default)]
pub struct Roots(Arc<[(PathBuf, Readiness)]>);

impl Roots {
    /// No roots to wait for (levels with a private root of their own).
    pub fn none() -> Self {
        Self::default()
    }

    /// Start preparing each `(dir, plan)` root, in this order, in the background.
    pub fn prepare(roots: Vec<(PathBuf, RootPlan)>) -> Self {
        let (senders, receivers): (Vec<_>, Vec<_>) = roots
            .iter()
            .map(|(dir, _)| {
                let (tx, rx) = tokio::sync::watch::channel(None);
                (tx, (dir.clone(), rx))
            })
            .unzip();
        let spawned = std::thread::Builder::new()
            .name("chroot-roots".into())
            .spawn(move || {
                let mut filler = Filler::default();
                for ((dir, plan), tx) in roots.iter().zip(senders) {
                    let started = std::time::Instant::now();
                    let result = prepare_one(dir, plan, &mut filler).map_err(|e| {
                        tracing::error!(error = %e, "runs of this language cannot start until the server is restarted with this fixed");
                        RootError::Prepare(Arc::new(e))
                    });
                    if result.is_ok() {
                        tracing::info!(root = %dir.display(), ms = started.elapsed().as_millis() as u64, "chroot root ready");
                    }
                    let _ = tx.send(Some(result));
                }
            });
        if let Err(e) = spawned {
            let error = RootError::Thread(Arc::new(e));
            let failed = receivers
                .iter()
                .map(|(dir, _)| {
                    let state = Some(Err(error.clone()));
                    (dir.clone(), tokio::sync::watch::channel(state).1)
                })
                .collect();
            return Self(failed);
        }
        Self(receivers.into())
    }

    /// Wait until the root at `dir` is ready (at once when it is not one of these); the
    /// error says why it never will be.
    pub async fn wait(&self, dir: &Path) -> Result<(), RootError> {
        let Some((_, rx)) = self.0.iter().find(|(d, _)| d == dir) else {
            return Ok(());
        };
        let mut rx = rx.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(state) => match &*state {
                Some(Err(e)) => Err(e.clone()),
                _ => Ok(()),
            },
            Err(_) => Err(RootError::Abandoned(dir.to_path_buf())),
        }
    }
}

/// A root that could not be prepared, and why.
#[derive(Debug, thiserror::Error)]
#[error("cannot prepare the chroot root {}: {source}; the state directory (state_dir) must be writable with room for a copy of each interpreter's files", path.display())]
pub struct PrepareError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// (Re)build `dir` from `plan` unless it already holds this plan over the same files
/// (then only its single files are refreshed). Files `filler` copied for an earlier root
/// are linked from there.
fn prepare_one(dir: &Path, plan: &RootPlan, filler: &mut Filler) -> Result<(), PrepareError> {
    let at = |source| PrepareError {
        path: dir.to_path_buf(),
        source,
    };
    let stamp = format!(
        "{LAYOUT} {:016x} {}",
        fingerprint(plan),
        serde_json::to_string(plan).map_err(|e| at(io::Error::other(e)))?
    );
    if fs::read_to_string(dir.join(MARKER)).ok().as_deref() == Some(stamp.as_str()) {
        return refresh_files(dir, plan).map_err(at);
    }
    lay_out(dir, plan, filler).map_err(at)?;
    filler
        .fill()
        .map_err(|(path, source)| PrepareError { path, source })?;
    // The marker last: a start interrupted before this point rebuilds the root.
    fs::write(dir.join(MARKER), stamp).map_err(at)
}

/// What the plan's directories hold now: each directory under them with its inode and
/// mtime. A root kept from an earlier start (a persistent state directory) is rebuilt
/// when any changed: upgrades (dpkg, pip) replace a file by renaming a new one over it or
/// removing it, which changes its directory's mtime, and which neither a hard link nor a
/// copy would follow. Only directories are read (no file is looked at), so checking a
/// kept root costs little. Binds that are single files are left out: `refresh_files`
/// brings those up to date in a kept root (Docker gives each container an /etc/hosts and
/// /etc/resolv.conf of its own, which must not cost a rebuild).
fn fingerprint(plan: &RootPlan) -> u64 {
    fn visit(dir: &Path, h: &mut impl Hasher) {
        dir.hash(h);
        let Ok(meta) = fs::symlink_metadata(dir) else {
            0u8.hash(h);
            return;
        };
        (meta.ino(), meta.mtime(), meta.mtime_nsec()).hash(h);
        let mut below: Vec<PathBuf> = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        below.sort();
        for sub in below {
            visit(&sub, h);
        }
    }
    let mut h = std::hash::DefaultHasher::new();
    for bind in plan.binds.iter().filter(|b| b.is_dir()) {
        visit(bind, &mut h);
    }
    h.finish()
}

/// In a kept root, the binds that are single files replaced where the host's changed
/// (size or mtime; the same inode when linked): a copy renamed over the old one.
fn refresh_files(dir: &Path, plan: &RootPlan) -> io::Result<()> {
    for src in &plan.binds {
        let Ok(meta) = fs::symlink_metadata(src) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let dst = inside(dir, src);
        let current = fs::symlink_metadata(&dst).is_ok_and(|d| {
            (d.dev(), d.ino()) == (meta.dev(), meta.ino())
                || (d.size(), d.mtime(), d.mtime_nsec())
                    == (meta.size(), meta.mtime(), meta.mtime_nsec())
        });
        if current {
            continue;
        }
        let (Some(parent), Some(name)) = (dst.parent(), dst.file_name()) else {
            continue;
        };
        let fresh = parent.join(format!(".{}.new", name.to_string_lossy()));
        let _ = fs::remove_file(&fresh);
        copy_file(&Job {
            src: src.clone(),
            dst: fresh.clone(),
            fill: Fill::Copy,
            id: (meta.dev(), meta.ino()),
            meta,
        })?;
        fs::rename(&fresh, &dst)?;
    }
    Ok(())
}

/// Everything but the files' contents: directories, symlinks, /tmp, /dev, /etc/passwd.
fn lay_out(dir: &Path, plan: &RootPlan, filler: &mut Filler) -> io::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    make_dirs(dir).map_err(io::Error::other)?;
    filler.choose(dir);
    recreate_symlinks(dir, plan, &[]).map_err(io::Error::other)?;
    for src in &plan.binds {
        filler.walk(src, &inside(dir, src))?;
    }
    // Runs may enter /tmp but neither list nor create anything in it: each writes only
    // in its own directory there (made by the helper, 0700), which goes when the run
    // ends. Nothing else in the root is writable by them (copies keep no group or other
    // write bits; links are made only of files without them, see `linkable`).
    let tmp = dir.join("tmp");
    fs::create_dir_all(&tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o711))?;
    fs::create_dir_all(dir.join("dev"))?;
    for &(path, major, minor) in DEVICES {
        let node = inside(dir, Path::new(path));
        let made = mknod(
            &node,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        );
        if made.is_err() {
            tracing::warn!(node = %node.display(), "cannot create a device node (no CAP_MKNOD); runtimes that need it may fail");
            continue;
        }
        // mknod's mode is cut by the server's umask (0644 under 022); runs (never root)
        // must be able to write to /dev/null.
        fs::set_permissions(&node, fs::Permissions::from_mode(0o666))?;
    }
    fs::create_dir_all(dir.join("etc"))?;
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/:/nonexistent\n")
}

/// Copy `src` to `dst` recursively: hard links where they are cheap, else copies;
/// symlinks recreated, directories with their modes.
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let mut filler = Filler::default();
    if let Some(parent) = dst.parent() {
        make_dirs(parent).map_err(io::Error::other)?;
        filler.choose(parent);
    }
    filler.walk(src, dst)?;
    filler.fill().map_err(|(_, e)| e)
}

/// How a root's files are filled. A hard link costs nothing on an ordinary filesystem.
/// On overlayfs (a container's own filesystem, where the state directory lives unless a
/// volume is mounted there) linking a file of the image's layers first copies it up and
/// syncs it to disk, file by file: seconds for an interpreter's root, against a fraction
/// of that for a plain copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Fill {
    #[default]
    Link,
    Copy,
}

/// One regular file to place.
#[derive(Debug)]
struct Job {
    src: PathBuf,
    dst: PathBuf,
    fill: Fill,
    /// The source's (device, inode): a file reached twice is copied once.
    id: (u64, u64),
    meta: fs::Metadata,
}

#[derive(Debug, Default)]
struct Filler {
    fill: Fill,
    /// Forced in tests; else chosen per root by `choose`.
    forced: Option<Fill>,
    /// The device of the root being filled.
    dst_dev: u64,
    jobs: Vec<Job>,
    /// Where each source file was copied to so far (copies only).
    copied: HashMap<(u64, u64), PathBuf>,
}

/// Threads filling files: copies read the page cache and write the disk's, a few at
/// once keep both busy.
const FILL_THREADS: usize = 4;

impl Filler {
    /// How files under `dir` are filled, from the filesystem `dir` is on.
    fn choose(&mut self, dir: &Path) {
        let overlay = statfs(dir).is_ok_and(|s| s.filesystem_type() == OVERLAYFS_SUPER_MAGIC);
        self.fill = match self.forced {
            Some(fill) => fill,
            None if overlay => Fill::Copy,
            None => Fill::Link,
        };
        self.dst_dev = fs::metadata(dir).map_or(0, |m| m.dev());
    }

    /// Create `dst` (its parents too), its directories and symlinks now; its files are
    /// queued for `fill`.
    fn walk(&mut self, src: &Path, dst: &Path) -> io::Result<()> {
        if let Some(parent) = dst.parent() {
            make_dirs(parent).map_err(io::Error::other)?;
        }
        self.walk_below(src, dst, true)
    }

    /// `walk` once `dst`'s parent exists. `top`: `dst` may exist already (two binds
    /// can share a directory); below it, everything is new.
    ///
    /// Below the top, a source gone meanwhile (a `.pyc` temporary file renamed, an
    /// upgrade, a cache cleaned) is skipped: it would not be there a moment later either.
    fn walk_below(&mut self, src: &Path, dst: &Path, top: bool) -> io::Result<()> {
        match self.walk_entry(src, dst, top) {
            Err(e) if !top && e.kind() == io::ErrorKind::NotFound && gone(src) => Ok(()),
            other => other,
        }
    }

    fn walk_entry(&mut self, src: &Path, dst: &Path, top: bool) -> io::Result<()> {
        let meta = fs::symlink_metadata(src)?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            match symlink(fs::read_link(src)?, dst) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        } else if ft.is_dir() {
            let made = fs::DirBuilder::new()
                .mode(meta.permissions().mode() & 0o7755)
                .create(dst);
            match made {
                Err(e) if !(top && e.kind() == io::ErrorKind::AlreadyExists) => return Err(e),
                _ => {}
            }
            let entries = match fs::read_dir(src) {
                Err(e) if e.kind() == io::ErrorKind::NotFound && gone(src) => return Ok(()),
                entries => entries?,
            };
            for entry in entries {
                let entry = entry?;
                self.walk_below(&entry.path(), &dst.join(entry.file_name()), false)?;
            }
        } else if ft.is_file() {
            self.jobs.push(Job {
                src: src.to_path_buf(),
                dst: dst.to_path_buf(),
                // No link crosses filesystems (a volume on the state directory): a copy,
                // once per source file. Nor is a file linked that a run could change
                // through the link (see `linkable`).
                fill: if (self.forced.is_none() && meta.dev() != self.dst_dev) || !linkable(&meta) {
                    Fill::Copy
                } else {
                    self.fill
                },
                id: (meta.dev(), meta.ino()),
                meta,
            });
        }
        Ok(())
    }

    /// Place every queued file: linked, or copied once per source file on a few threads
    /// and linked to that copy wherever else it is needed, in this root or a later one.
    fn fill(&mut self) -> Result<(), (PathBuf, io::Error)> {
        let jobs = std::mem::take(&mut self.jobs);
        let mut first: HashMap<(u64, u64), &Path> = HashMap::new();
        let mut originals = Vec::new();
        let mut again = Vec::new();
        for job in &jobs {
            if job.fill == Fill::Link {
                originals.push(job);
            } else if let Some(copy) = self.copied.get(&job.id) {
                again.push((job, copy.as_path()));
            } else if let Some(copy) = first.get(&job.id) {
                again.push((job, *copy));
            } else {
                first.insert(job.id, &job.dst);
                originals.push(job);
            }
        }
        let next = AtomicUsize::new(0);
        let failed: Mutex<Option<(PathBuf, io::Error)>> = Mutex::new(None);
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, FILL_THREADS);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    while let Some(job) = originals.get(next.fetch_add(1, Ordering::Relaxed)) {
                        if let Err(e) = place(job) {
                            let mut failed = failed.lock().unwrap_or_else(|p| p.into_inner());
                            failed.get_or_insert((job.dst.clone(), e));
                            next.store(originals.len(), Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        if let Some(err) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(err);
        }
        for (job, copy) in again {
            // Both copies live in the state directory, where a link is cheap.
            if fs::hard_link(copy, &job.dst).is_err() {
                place_copy(job).map_err(|e| (job.dst.clone(), e))?;
            }
        }
        for (id, dst) in first {
            self.copied.insert(id, dst.to_path_buf());
        }
        Ok(())
    }
}

fn place(job: &Job) -> io::Result<()> {
    if job.fill == Fill::Link && fs::hard_link(&job.src, &job.dst).is_ok() {
        return Ok(());
    }
    place_copy(job)
}

/// `copy_file`, where a source gone since the walk is skipped (see `walk_below`).
fn place_copy(job: &Job) -> io::Result<()> {
    match copy_file(job) {
        Err(e) if e.kind() == io::ErrorKind::NotFound && gone(&job.src) => Ok(()),
        other => other,
    }
}

/// Whether `path` is gone: an error about it was its absence, not the destination's.
fn gone(path: &Path) -> bool {
    fs::symlink_metadata(path).is_err_and(|e| e.kind() == io::ErrorKind::NotFound)
}

/// Whether a host file may be hard-linked into a root. A link is the host's own inode:
/// a file with group or other write (harmless on the host behind a directory only root
/// enters, like /root/.pyenv) would be writable by every run, changing the host's file;
/// one owned by a run's uid or gid could be chmod'ed by that run; setuid and setgid
/// would keep their bits. Such files are copied instead (copies drop those bits).
fn linkable(meta: &fs::Metadata) -> bool {
    meta.mode() & 0o6022 == 0
        && !SANDBOX_UIDS.contains(&meta.uid())
        && !SANDBOX_UIDS.contains(&meta.gid())
}

/// A copy with the source's times (Python trusts its cached bytecode only while the
/// source's mtime matches) and its mode without group or other write, setuid or setgid.
fn copy_file(job: &Job) -> io::Result<()> {
    let mode = job.meta.mode() & 0o755;
    let mut from = File::open(&job.src)?;
    let mut to = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&job.dst)?;
    // std copies File to File with copy_file_range: the data stays in the kernel.
    io::copy(&mut from, &mut to)?;
    to.set_permissions(fs::Permissions::from_mode(mode))?;
    to.set_times(
        FileTimes::new()
            .set_accessed(job.meta.accessed()?)
            .set_modified(job.meta.modified()?),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn plan(binds: &[&Path]) -> RootPlan {
        RootPlan {
            binds: binds.iter().map(|b| b.to_path_buf()).collect(),
            symlinks: Vec::new(),
        }
    }

    fn forced(fill: Fill) -> Filler {
        Filler {
            forced: Some(fill),
            ..Filler::default()
        }
    }

    /// A source tree: a world-writable setuid script with an old mtime, a link to it, a
    /// plain file.
    fn source(dir: &Path) -> (PathBuf, SystemTime) {
        let src = dir.join("lib");
        fs::create_dir_all(src.join("sub")).unwrap();
        let plain = src.join("sub/plain.py");
        fs::write(&plain, "y = 1\n").unwrap();
        fs::set_permissions(&plain, fs::Permissions::from_mode(0o644)).unwrap();
        let file = src.join("sub/mod.py");
        fs::write(&file, "x = 1\n").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o4777)).unwrap();
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
        File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(old)
            .unwrap();
        symlink("sub/mod.py", src.join("alias.py")).unwrap();
        (src, old)
    }

    #[test]
    fn copies_keep_their_times_and_lose_write_and_setuid_bits() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, old) = source(tmp.path());
        let root = tmp.path().join("root");
        prepare_one(&root, &plan(&[&src]), &mut forced(Fill::Copy)).unwrap();
        let copy = inside(&root, &src.join("sub/mod.py"));
        let meta = fs::metadata(&copy).unwrap();
        assert_eq!(fs::read_to_string(&copy).unwrap(), "x = 1\n");
        assert_eq!(meta.mode() & 0o7777, 0o755);
        // Python keeps using its cached bytecode only while the source's mtime matches.
        assert_eq!(meta.modified().unwrap(), old);
        assert_ne!(
            meta.ino(),
            fs::metadata(src.join("sub/mod.py")).unwrap().ino()
        );
        assert_eq!(
            fs::read_link(inside(&root, &src.join("alias.py"))).unwrap(),
            Path::new("sub/mod.py")
        );
        assert!(root.join(MARKER).exists());
    }

    #[test]
    fn a_file_two_roots_share_is_copied_once() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, _) = source(tmp.path());
        let mut filler = forced(Fill::Copy);
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        prepare_one(&a, &plan(&[&src]), &mut filler).unwrap();
        prepare_one(&b, &plan(&[&src]), &mut filler).unwrap();
        let ino = |root: &Path| {
            fs::metadata(inside(root, &src.join("sub/mod.py")))
                .unwrap()
                .ino()
        };
        assert_eq!(ino(&a), ino(&b));
        assert_ne!(ino(&a), fs::metadata(src.join("sub/mod.py")).unwrap().ino());
    }

    #[test]
    fn on_an_ordinary_filesystem_files_are_linked() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, _) = source(tmp.path());
        let root = tmp.path().join("root");
        let mut filler = Filler::default();
        prepare_one(&root, &plan(&[&src]), &mut filler).unwrap();
        assert_eq!(filler.fill, Fill::Link);
        assert_eq!(
            fs::metadata(inside(&root, &src.join("sub/plain.py")))
                .unwrap()
                .ino(),
            fs::metadata(src.join("sub/plain.py")).unwrap().ino()
        );
    }

    /// A link is the host's inode: a file writable by group or others, setuid or setgid,
    /// or owned by a run's uid or gid, is copied without those bits, never linked.
    #[test]
    fn files_a_run_could_change_through_a_link_are_copied() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, _) = source(tmp.path());
        let dir = src.join("sub");
        let mut cases = vec![("mod.py", 0o4777), ("plain.py", 0o644)];
        for (name, mode) in [("gw.py", 0o664), ("sgid.py", 0o2755), ("ow.py", 0o646)] {
            fs::write(dir.join(name), name).unwrap();
            fs::set_permissions(dir.join(name), fs::Permissions::from_mode(mode)).unwrap();
            cases.push((name, mode));
        }
        let owned = nix::unistd::geteuid().is_root();
        if owned {
            for (name, uid, gid) in [
                ("by_uid.py", SANDBOX_UIDS.start, 0),
                ("by_gid.py", 0, SANDBOX_UIDS.start),
            ] {
                fs::write(dir.join(name), name).unwrap();
                fs::set_permissions(dir.join(name), fs::Permissions::from_mode(0o644)).unwrap();
                std::os::unix::fs::chown(dir.join(name), Some(uid), Some(gid)).unwrap();
                cases.push((name, 0o644));
            }
        }
        let root = tmp.path().join("root");
        prepare_one(&root, &plan(&[&src]), &mut forced(Fill::Link)).unwrap();
        for (name, mode) in cases {
            let host = fs::metadata(dir.join(name)).unwrap();
            let placed = fs::metadata(inside(&root, &dir.join(name))).unwrap();
            let linked = placed.ino() == host.ino();
            let safe = mode & 0o6022 == 0 && !name.starts_with("by_");
            assert_eq!(linked, safe, "{name} (mode {mode:o}) linked: {linked}");
            if !linked {
                assert_eq!(placed.mode() & 0o7777, mode & 0o755, "{name}");
                assert_eq!(
                    host.mode() & 0o7777,
                    mode,
                    "{name}: the host's mode changed"
                );
                assert_ne!(placed.uid(), SANDBOX_UIDS.start, "{name}");
            }
        }
    }

    /// A file gone between the walk and its copy (a `.pyc` temporary file renamed) is
    /// skipped; a failure that is not the source's absence still fails the root.
    #[test]
    fn a_source_file_gone_during_the_fill_is_skipped_other_errors_fail() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, _) = source(tmp.path());
        for fill in [Fill::Link, Fill::Copy] {
            let dst = tmp.path().join(format!("{fill:?}"));
            let mut filler = forced(fill);
            filler.walk(&src, &dst).unwrap();
            fs::copy(src.join("sub/plain.py"), tmp.path().join("keep")).unwrap();
            fs::remove_file(src.join("sub/plain.py")).unwrap();
            filler.fill().unwrap();
            assert!(!dst.join("sub/plain.py").exists());
            assert_eq!(
                fs::read_to_string(dst.join("sub/mod.py")).unwrap(),
                "x = 1\n"
            );
            fs::rename(tmp.path().join("keep"), src.join("sub/plain.py")).unwrap();
        }
        // The destination's directory gone: not the source's absence, an error.
        let dst = tmp.path().join("broken");
        let mut filler = forced(Fill::Copy);
        filler.walk(&src, &dst).unwrap();
        fs::remove_dir_all(dst.join("sub")).unwrap();
        let (path, err) = filler.fill().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(path.starts_with(dst.join("sub")), "{}", path.display());
        // A missing bind (the top) still fails.
        assert!(
            forced(Fill::Copy)
                .walk(&tmp.path().join("absent"), &tmp.path().join("x"))
                .is_err()
        );
    }

    /// mknod's mode goes through the umask; the nodes must be 0666 whatever it is.
    #[test]
    fn device_nodes_are_writable_by_runs() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mknod needs CAP_MKNOD");
            return;
        }
        use std::os::unix::fs::FileTypeExt;
        // The usual umask (process-wide: the same for the other tests), set to be sure.
        nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        prepare_one(&root, &plan(&[]), &mut Filler::default()).unwrap();
        for &(path, _, _) in DEVICES {
            let meta = fs::metadata(inside(&root, Path::new(path))).unwrap();
            assert!(meta.file_type().is_char_device(), "{path}");
            assert_eq!(meta.mode() & 0o7777, 0o666, "{path}");
        }
    }

    #[test]
    fn a_prepared_root_is_kept_and_a_changed_plan_rebuilds_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, _) = source(tmp.path());
        let root = tmp.path().join("root");
        prepare_one(&root, &plan(&[&src]), &mut forced(Fill::Copy)).unwrap();
        let stray = root.join("etc/stray");
        fs::write(&stray, "").unwrap();
        prepare_one(&root, &plan(&[&src]), &mut forced(Fill::Copy)).unwrap();
        assert!(stray.exists(), "the same plan rebuilt the root");
        let other = tmp.path().join("other");
        fs::create_dir_all(&other).unwrap();
        prepare_one(&root, &plan(&[&src, &other]), &mut forced(Fill::Copy)).unwrap();
        assert!(!stray.exists(), "a new plan kept the old root");
        assert!(inside(&root, &other).is_dir());
    }

    /// What an upgrade does: a new file renamed over the old one. A root linked to the
    /// old one is rebuilt at the next start.
    #[test]
    fn a_replaced_source_file_rebuilds_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, _) = source(tmp.path());
        let root = tmp.path().join("root");
        prepare_one(&root, &plan(&[&src]), &mut Filler::default()).unwrap();
        let file = src.join("sub/mod.py");
        let new = src.join("sub/.mod.py.new");
        fs::write(&new, "x = 2\n").unwrap();
        fs::rename(&new, &file).unwrap();
        let copy = inside(&root, &file);
        assert_eq!(fs::read_to_string(&copy).unwrap(), "x = 1\n");
        prepare_one(&root, &plan(&[&src]), &mut Filler::default()).unwrap();
        assert_eq!(fs::read_to_string(&copy).unwrap(), "x = 2\n");
    }

    /// A state directory on a filesystem of its own (a volume): copies, shared by roots.
    #[test]
    fn across_filesystems_a_file_is_copied_once_for_all_roots() {
        use nix::mount::{MntFlags, MsFlags, mount, umount2};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (src, _) = source(tmp.path());
        let state = tmp.path().join("state");
        fs::create_dir_all(&state).unwrap();
        mount(
            Some("tmpfs"),
            &state,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=16m"),
        )
        .expect("mount a tmpfs");
        let mut filler = Filler::default();
        let (a, b) = (state.join("a"), state.join("b"));
        let prepared = prepare_one(&a, &plan(&[&src]), &mut filler)
            .and_then(|()| prepare_one(&b, &plan(&[&src]), &mut filler));
        let ino =
            |root: &Path| fs::metadata(inside(root, &src.join("sub/mod.py"))).map(|m| m.ino());
        let (ia, ib) = (ino(&a), ino(&b));
        let _ = umount2(&state, MntFlags::MNT_DETACH);
        prepared.unwrap();
        assert_eq!(ia.unwrap(), ib.unwrap());
    }

    /// Docker's per-container /etc/hosts: a kept root gets the new one, not a rebuild.
    #[test]
    fn a_kept_root_gets_the_current_copy_of_a_single_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, _) = source(tmp.path());
        let hosts = tmp.path().join("hosts");
        fs::write(&hosts, "10.0.0.1 old\n").unwrap();
        let root = tmp.path().join("root");
        let plan = plan(&[&src, &hosts]);
        prepare_one(&root, &plan, &mut forced(Fill::Copy)).unwrap();
        let stray = root.join("etc/stray");
        fs::write(&stray, "").unwrap();
        fs::write(&hosts, "10.0.0.2 new-container\n").unwrap();
        prepare_one(&root, &plan, &mut forced(Fill::Copy)).unwrap();
        assert!(stray.exists(), "the root was rebuilt");
        assert_eq!(
            fs::read_to_string(inside(&root, &hosts)).unwrap(),
            "10.0.0.2 new-container\n"
        );
    }

    /// The container case for real: the state directory and the interpreter's files on
    /// one overlayfs, the files in its lower layer. Linking them would copy each up into
    /// the upper layer (and sync it); the root must be filled without touching them.
    #[test]
    fn on_overlayfs_the_image_files_are_copied_and_never_copied_up() {
        use nix::mount::{MntFlags, MsFlags, mount, umount2};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting an overlayfs needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let [lower, upper, work, merged] = ["lower", "upper", "work", "merged"].map(|d| {
            let p = tmp.path().join(d);
            fs::create_dir_all(&p).unwrap();
            p
        });
        source(&lower);
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .expect("mount an overlayfs (kernel module overlay)");
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = umount2(self.0, MntFlags::MNT_DETACH);
            }
        }
        let _unmount = Unmount(&merged);

        let src = merged.join("lib");
        let root = merged.join("state/root");
        let mut filler = Filler::default();
        prepare_one(&root, &plan(&[&src]), &mut filler).unwrap();
        assert_eq!(filler.fill, Fill::Copy);
        let copy = inside(&root, &src.join("sub/mod.py"));
        assert_eq!(fs::read_to_string(copy).unwrap(), "x = 1\n");
        assert!(
            !upper.join("lib").exists(),
            "a source file was copied up into the upper layer"
        );
    }
}
