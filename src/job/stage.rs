//! The run's own directories on the host, under the state directory (`runs/<id>/`):
//! `job/`, bound read-only at /job (the script and the `--file` and `--dir` inputs), and
//! `out/`, bound at /tmp/out (see `collect`). Inputs are copied, not bound: the run's uid
//! reads the copies whatever owned the originals, and nothing of the host is exposed
//! live. Both go when the stage is dropped.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, readlinkat};
use nix::sys::stat::{FileStat, SFlag, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use super::beneath::{self, Perm};
use crate::engine::RunFiles;
use crate::state::StateDir;

/// Entries one run may be given: far beyond a project's sources, short of a disk's worth.
const MAX_INPUT_ENTRIES: u64 = 65_536;
/// Directories of one input nest at most this deep.
const MAX_DEPTH: usize = 64;

/// A run's directories, removed on drop.
pub(crate) struct Stage {
    root: PathBuf,
    pub job: PathBuf,
    pub out: PathBuf,
}

impl Stage {
    /// `runs/<pid>-<n>/{job,out}` under the state directory; directories left by runs
    /// of commands that are gone (killed before they could clean up) are removed first.
    pub fn create(state: &StateDir) -> std::io::Result<Self> {
        let runs = state.runs();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&runs)?;
        remove_stale(&runs);
        let pid = std::process::id();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let root = runs.join(format!("{pid}-{nanos}"));
        fs::DirBuilder::new().mode(0o700).create(&root)?;
        let stage = Self {
            job: root.join("job"),
            out: root.join("out"),
            root,
        };
        fs::DirBuilder::new().mode(0o755).create(&stage.job)?;
        // Whatever this command's umask: the run's uid must enter /job.
        fs::set_permissions(&stage.job, fs::Permissions::from_mode(0o755))?;
        fs::DirBuilder::new().mode(0o700).create(&stage.out)?;
        Ok(stage)
    }

    pub fn files(&self) -> RunFiles {
        RunFiles {
            job: Some(self.job.clone()),
            out: Some(self.out.clone()),
        }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        remove(&self.root);
    }
}

/// Remove a run's directory. remove_dir_all never follows a link the run left; a
/// directory the run made unwritable (rootless, where its files are this user's) is
/// made writable again first, by descriptor: a run still alive could swap one for a
/// link, and a chmod by path would then apply to what the link names.
fn remove(dir: &Path) {
    if fs::remove_dir_all(dir).is_ok() {
        return;
    }
    if let (Some(parent), Some(name)) = (dir.parent(), dir.file_name())
        && let Ok(parent) = beneath::open_root(parent)
    {
        unlock(&parent, name, 0);
    }
    let _ = fs::remove_dir_all(dir);
}

/// Directories nest this deep at most in what `unlock` reopens (each level holds a
/// descriptor); deeper ones stay for the next command's `remove_stale`.
const MAX_UNLOCK_DEPTH: usize = 256;

/// Make the directory `name` in `parent`, and every directory below it, 0700.
fn unlock(parent: &OwnedFd, name: &std::ffi::OsStr, depth: usize) {
    if depth > MAX_UNLOCK_DEPTH || beneath::set_dir_mode(parent, name, 0o700).is_err() {
        return;
    }
    let Ok(dir) = beneath::open_dir(parent, name) else {
        return;
    };
    for entry in beneath::list(&dir).unwrap_or_default() {
        unlock(&dir, &entry, depth + 1);
    }
}

/// Remove `runs/<pid>-*` whose command no longer runs.
fn remove_stale(runs: &Path) {
    for entry in fs::read_dir(runs).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.split('-').next());
        let Some(pid) = pid.and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // Signal 0 only asks: EPERM means alive (another user's), ESRCH gone.
        let gone = matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
        if gone {
            remove(&entry.path());
        }
    }
}

/// Why a `--file` or `--dir` as written cannot be staged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadInput {
    #[error("{given}: {dest}")]
    Dest { given: String, dest: BadDest },
    #[error("{given}: a file needs a name in /job: write {raw}:NAME")]
    NoName { given: String, raw: String },
}

/// A destination that is not inside /job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadDest {
    #[error("the destination {0:?} leaves /job ('..'); give a path inside it")]
    Leaves(String),
    #[error("the destination {0:?} is absolute; give a path relative to /job")]
    Absolute(String),
}

/// One `--file PATH[:DEST]` or `--dir DIR[:DEST]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Input {
    pub source: PathBuf,
    /// Relative to /job; empty for /job itself (a directory's contents only).
    pub dest: PathBuf,
    pub dir: bool,
    /// As the user wrote it, for messages.
    pub given: String,
}

impl Input {
    /// Parse `raw`: `PATH` or `PATH:DEST` (a PATH holding ':' is taken whole when it
    /// exists). The default DEST is PATH's own name, beside the script.
    pub fn parse(raw: &str, dir: bool) -> Result<Self, BadInput> {
        let flag = if dir { "--dir" } else { "--file" };
        let given = format!("{flag} {raw}");
        let (source, dest) = match raw.rsplit_once(':') {
            Some((source, dest)) if !Path::new(raw).exists() => (source, Some(dest)),
            _ => (raw, None),
        };
        let source = PathBuf::from(source);
        let dest = match dest {
            Some(d) => check_dest(d).map_err(|dest| BadInput::Dest {
                given: given.clone(),
                dest,
            })?,
            None => match source.file_name() {
                Some(name) if source.components().next_back() != Some(Component::ParentDir) => {
                    PathBuf::from(name)
                }
                _ => PathBuf::new(),
            },
        };
        if dest.as_os_str().is_empty() && !dir {
            return Err(BadInput::NoName {
                given,
                raw: raw.into(),
            });
        }
        Ok(Self {
            source,
            dest,
            dir,
            given,
        })
    }
}

/// A destination inside /job: relative, and never leaving it (no `..`, no absolute
/// path). `.` and an empty DEST are /job itself.
pub(crate) fn check_dest(raw: &str) -> Result<PathBuf, BadDest> {
    let mut dest = PathBuf::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(part) => dest.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(BadDest::Leaves(raw.into()));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(BadDest::Absolute(raw.into()));
            }
        }
    }
    Ok(dest)
}

/// Copies inputs into a job directory, keeping count against the limits. Every step is
/// taken by descriptor (see `beneath`): the stage holds only directories and regular
/// files, never a link, so nothing staged earlier can redirect a later input; an input's
/// own links are copied as what they name while that stays inside the input, and refused
/// otherwise.
pub(crate) struct Stager {
    job: OwnedFd,
    /// Bytes that may still be copied.
    room: u64,
    limit_mb: u64,
    entries: u64,
}

/// One `--dir` being copied: its root (links inside it are followed beneath this only)
/// and the directories on the way down, to refuse a link back to one of them.
struct Tree<'a> {
    input: &'a Input,
    root: OwnedFd,
    chain: Vec<(u64, u64)>,
}

impl Tree<'_> {
    /// The source path of `rel`, as the user would write it.
    fn shown(&self, rel: &Path) -> String {
        self.input.source.join(rel).display().to_string()
    }
}

/// A destination below /job, for messages.
fn in_job(at: &Path) -> String {
    Path::new("/job").join(at).display().to_string()
}

/// Whatever this command's umask: the run's uid must enter and read everything.
const DIR_PERM: Perm = Perm::Exact(0o755);
const FILE_PERM: Perm = Perm::Exact(0o644);

/// What a system call or a read said, as the user is shown it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Cause {
    #[error("{}", .0.desc())]
    Sys(Errno),
    #[error("{0}")]
    Io(std::io::Error),
}

impl From<Errno> for Cause {
    fn from(e: Errno) -> Self {
        Self::Sys(e)
    }
}

impl From<std::io::Error> for Cause {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Why staging stopped. The kind decides the exit code: an `Input` is the user's to fix
/// (usage, 2); the run's directory or its script failing is the command's (1).
#[derive(Debug, thiserror::Error)]
pub(crate) enum StageError {
    #[error("cannot open the run's {}: {}", job.display(), errno.desc())]
    Job { job: PathBuf, errno: Errno },
    #[error("cannot stage the script as /job/{name}: {problem}")]
    Script {
        name: String,
        problem: ScriptProblem,
    },
    /// `given` is the option as the user wrote it.
    #[error("{given}: {problem}")]
    Input {
        given: String,
        problem: InputProblem,
    },
}

impl StageError {
    /// Whether what the user gave is at fault (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Input { .. })
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ScriptProblem {
    #[error("not a plain file name")]
    NotPlainName,
    #[error("an input put a directory there; give that input another destination (PATH:DEST)")]
    DirectoryThere,
    #[error(transparent)]
    Failed(#[from] Cause),
}

/// What is wrong with one input; each says what to do. Paths are shown as the user
/// would write them (sources) or below /job (destinations).
#[derive(Debug, thiserror::Error)]
pub(crate) enum InputProblem {
    #[error("cannot read {path}: {cause}")]
    Read { path: String, cause: Cause },
    #[error("cannot open {path}: {cause}")]
    Open { path: String, cause: Cause },
    #[error("cannot list {path}: {cause}")]
    List { path: String, cause: Cause },
    #[error("{path}: {cause}")]
    Stat { path: String, cause: Cause },
    #[error("{0}")]
    Descriptor(std::io::Error),
    #[error("not a directory; use --file")]
    NotADirectory,
    #[error("a directory; use --dir")]
    ADirectory,
    #[error("not a regular file")]
    NotRegular,
    #[error("a file needs a name in /job")]
    NoName,
    #[error("more than {MAX_INPUT_ENTRIES} files and directories of input; give fewer")]
    TooMany,
    #[error("the inputs hold more than {0} MB (--max-input {0}); raise --max-input or give less")]
    TooLarge(u64),
    #[error("directories nest deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error(
        "{at} is already a file (from an earlier input); give one of them another destination (PATH:DEST)"
    )]
    AlreadyFile { at: String },
    #[error(
        "{at} is already a directory (from an earlier input); give one of them another destination (PATH:DEST)"
    )]
    AlreadyDir { at: String },
    #[error("{at} is given twice; give one of them another destination (PATH:DEST)")]
    Twice { at: String },
    #[error("cannot create {at}: {cause}")]
    Create { at: String, cause: Cause },
    #[error("cannot copy to {at}: {cause}")]
    CopyTo { at: String, cause: Cause },
    #[error("{path} changed while it was copied; try again")]
    Changed { path: String },
    #[error("{path} is not a regular file, a directory or a link")]
    Odd { path: String },
    #[error(
        "{path} is a link leading outside {root} (to {target}): a --dir's links are copied only when what they name is inside it; remove the link, or give what it names by itself (--file PATH:DEST or --dir DIR:DEST)"
    )]
    LinkOutside {
        path: String,
        root: String,
        target: String,
    },
    #[error(
        "{path} is a link to {target}, which names nothing; remove it or make it name a file inside {root}"
    )]
    LinkToNothing {
        path: String,
        target: String,
        root: String,
    },
    #[error(
        "{path} is a link to {target}: links lead in a circle (or more than 40 deep); remove it"
    )]
    LinkLoop { path: String, target: String },
    #[error("{path} is a link to {target}: cannot follow it: {cause}")]
    LinkUnfollowed {
        path: String,
        target: String,
        cause: Cause,
    },
    #[error("{path} is a link to {target}, which is not a regular file or a directory; remove it")]
    LinkToOdd { path: String, target: String },
    #[error("{path} is a link to a directory that holds it, which would copy forever; remove it")]
    LinkCycle { path: String },
    #[error("{path} is a directory that holds itself (a bind mount?); give its parts instead")]
    HoldsItself { path: String },
}

/// An input's problem, named by the option as the user wrote it.
fn bad(input: &Input, problem: InputProblem) -> StageError {
    StageError::Input {
        given: input.given.clone(),
        problem,
    }
}

impl Stager {
    pub fn new(job: &Path, limit_mb: u64) -> Result<Self, StageError> {
        let job_fd = beneath::open_root(job).map_err(|errno| StageError::Job {
            job: job.into(),
            errno,
        })?;
        Ok(Self {
            job: job_fd,
            room: limit_mb << 20,
            limit_mb,
            entries: 0,
        })
    }

    /// Copy one input; errors name it and say what to do. The path the user typed is
    /// taken as given, links in it followed (like cp): they named it.
    pub fn add(&mut self, input: &Input) -> Result<(), StageError> {
        let unreadable = |e: std::io::Error| {
            bad(
                input,
                InputProblem::Read {
                    path: input.source.display().to_string(),
                    cause: e.into(),
                },
            )
        };
        let meta = fs::metadata(&input.source).map_err(unreadable)?;
        match (input.dir, meta.is_dir()) {
            (true, true) => self.add_dir(input),
            (false, false) if meta.is_file() => self.add_file(input),
            (true, false) => Err(bad(input, InputProblem::NotADirectory)),
            (false, true) => Err(bad(input, InputProblem::ADirectory)),
            (false, false) => Err(bad(input, InputProblem::NotRegular)),
        }
    }

    fn add_file(&mut self, input: &Input) -> Result<(), StageError> {
        let unreadable = |e: std::io::Error| {
            bad(
                input,
                InputProblem::Read {
                    path: input.source.display().to_string(),
                    cause: e.into(),
                },
            )
        };
        let (Some(parent), Some(name)) = (input.dest.parent(), input.dest.file_name()) else {
            return Err(bad(input, InputProblem::NoName));
        };
        let parent = self.make_dirs(parent, input)?;
        // O_NONBLOCK: a FIFO put there since the check must not hang the command.
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&input.source)
            .map_err(unreadable)?;
        match file.metadata() {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(bad(input, InputProblem::NotRegular)),
            Err(e) => return Err(unreadable(e)),
        }
        self.copy_file(file, &parent, name, &input.dest, input)
    }

    fn add_dir(&mut self, input: &Input) -> Result<(), StageError> {
        let path = || input.source.display().to_string();
        let root = beneath::open_root(&input.source).map_err(|e| {
            bad(
                input,
                InputProblem::Open {
                    path: path(),
                    cause: e.into(),
                },
            )
        })?;
        let st = fstat(&root).map_err(|e| {
            bad(
                input,
                InputProblem::Stat {
                    path: path(),
                    cause: e.into(),
                },
            )
        })?;
        let dst = self.make_dirs(&input.dest, input)?;
        let src = root
            .try_clone()
            .map_err(|e| bad(input, InputProblem::Descriptor(e)))?;
        let mut tree = Tree {
            input,
            root,
            chain: vec![(st.st_dev, st.st_ino)],
        };
        self.copy_dir(&mut tree, &src, &dst, Path::new(""), &input.dest)
    }

    /// The script itself, at /job/<name>, over any file an input put there.
    pub fn add_script(&mut self, name: &str, code: &str) -> Result<(), StageError> {
        let cannot = |problem: ScriptProblem| StageError::Script {
            name: name.into(),
            problem,
        };
        let failed = |cause: Cause| cannot(ScriptProblem::Failed(cause));
        let single = Path::new(name).file_name().is_some_and(|n| n == name);
        if !single {
            return Err(cannot(ScriptProblem::NotPlainName));
        }
        let name = std::ffi::OsStr::new(name);
        match fstatat(&self.job, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if beneath::kind(&st) == SFlag::S_IFDIR => {
                return Err(cannot(ScriptProblem::DirectoryThere));
            }
            Ok(_) => unlinkat(&self.job, name, UnlinkatFlags::NoRemoveDir)
                .map_err(|e| failed(e.into()))?,
            Err(_) => {}
        }
        let mut file =
            beneath::create_file(&self.job, name, FILE_PERM).map_err(|e| failed(e.into()))?;
        file.write_all(code.as_bytes())
            .map_err(|e| failed(e.into()))
    }

    fn count(&mut self, input: &Input, n: u64) -> Result<(), StageError> {
        self.entries += n;
        if self.entries > MAX_INPUT_ENTRIES {
            return Err(bad(input, InputProblem::TooMany));
        }
        Ok(())
    }

    /// `/job/<rel>`, made as needed and entered.
    fn make_dirs(&mut self, rel: &Path, input: &Input) -> Result<OwnedFd, StageError> {
        let (fd, made) =
            beneath::make_dirs(&self.job, rel, DIR_PERM).map_err(|s| match s.errno {
                Errno::ENOTDIR | Errno::ELOOP => already_file(input, &s.at),
                e => bad(
                    input,
                    InputProblem::Create {
                        at: in_job(&s.at),
                        cause: e.into(),
                    },
                ),
            })?;
        self.count(input, made)?;
        Ok(fd)
    }

    /// Copy `src` to a new file `name` in `dir` (`at` below /job), within the room left.
    fn copy_file(
        &mut self,
        src: fs::File,
        dir: &OwnedFd,
        name: &std::ffi::OsStr,
        at: &Path,
        input: &Input,
    ) -> Result<(), StageError> {
        self.count(input, 1)?;
        let mut out = beneath::create_file(dir, name, FILE_PERM).map_err(|e| {
            let at = in_job(at);
            let problem = match e {
                Errno::EEXIST => match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) if beneath::kind(&st) == SFlag::S_IFDIR => {
                        InputProblem::AlreadyDir { at }
                    }
                    _ => InputProblem::Twice { at },
                },
                e => InputProblem::CopyTo {
                    at,
                    cause: e.into(),
                },
            };
            bad(input, problem)
        })?;
        // One byte past the room: a file that grew past it is caught, not cut.
        let copied = std::io::copy(&mut src.take(self.room + 1), &mut out).map_err(|e| {
            bad(
                input,
                InputProblem::CopyTo {
                    at: in_job(at),
                    cause: e.into(),
                },
            )
        })?;
        if copied > self.room {
            return Err(bad(input, InputProblem::TooLarge(self.limit_mb)));
        }
        self.room -= copied;
        Ok(())
    }

    /// Copy the entries of `src` (`rel` below the input's root) into `dst` (`at` below
    /// /job).
    fn copy_dir(
        &mut self,
        tree: &mut Tree<'_>,
        src: &OwnedFd,
        dst: &OwnedFd,
        rel: &Path,
        at: &Path,
    ) -> Result<(), StageError> {
        let input = tree.input;
        let names = beneath::list(src).map_err(|e| {
            bad(
                input,
                InputProblem::List {
                    path: tree.shown(rel),
                    cause: e.into(),
                },
            )
        })?;
        for name in names {
            let (from, to) = (rel.join(&name), at.join(&name));
            let path = tree.shown(&from);
            let st = fstatat(src, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| {
                bad(
                    input,
                    InputProblem::Stat {
                        path: path.clone(),
                        cause: e.into(),
                    },
                )
            })?;
            let changed = || bad(input, InputProblem::Changed { path: path.clone() });
            match beneath::kind(&st) {
                SFlag::S_IFREG => {
                    let file = beneath::open_file(src, &name, &st)
                        .map_err(|e| {
                            bad(
                                input,
                                InputProblem::Read {
                                    path: path.clone(),
                                    cause: e.into(),
                                },
                            )
                        })?
                        .ok_or_else(changed)?;
                    self.copy_file(file, dst, &name, &to, input)?;
                }
                SFlag::S_IFDIR => {
                    let sub = beneath::open_dir(src, &name).map_err(|e| match e {
                        Errno::ELOOP | Errno::ENOTDIR => changed(),
                        e => bad(
                            input,
                            InputProblem::Open {
                                path: path.clone(),
                                cause: e.into(),
                            },
                        ),
                    })?;
                    self.copy_subdir(tree, (&sub, &st), dst, &name, (&from, &to), false)?;
                }
                SFlag::S_IFLNK => self.copy_link(tree, src, dst, &name, (&from, &to))?,
                _ => return Err(bad(input, InputProblem::Odd { path })),
            }
        }
        Ok(())
    }

    /// A link of the input tree: what it names, copied, when that stays inside the tree.
    fn copy_link(
        &mut self,
        tree: &mut Tree<'_>,
        src: &OwnedFd,
        dst: &OwnedFd,
        name: &std::ffi::OsStr,
        (from, to): (&Path, &Path),
    ) -> Result<(), StageError> {
        let target = readlinkat(src, name)
            .map(|t| PathBuf::from(t).display().to_string())
            .unwrap_or_else(|_| "?".into());
        let (path, root) = (tree.shown(from), tree.input.source.display().to_string());
        let (fd, st) = beneath::follow_beneath(&tree.root, from).map_err(|e| {
            let (path, target) = (path.clone(), target.clone());
            let problem = match e {
                Errno::EXDEV => InputProblem::LinkOutside { path, root, target },
                Errno::ENOENT => InputProblem::LinkToNothing { path, target, root },
                Errno::ELOOP => InputProblem::LinkLoop { path, target },
                e => InputProblem::LinkUnfollowed {
                    path,
                    target,
                    cause: e.into(),
                },
            };
            bad(tree.input, problem)
        })?;
        match beneath::kind(&st) {
            SFlag::S_IFREG => self.copy_file(fs::File::from(fd), dst, name, to, tree.input),
            SFlag::S_IFDIR => self.copy_subdir(tree, (&fd, &st), dst, name, (from, to), true),
            _ => Err(bad(tree.input, InputProblem::LinkToOdd { path, target })),
        }
    }

    /// A directory of the input (reached through a link when `linked`), copied into a
    /// directory `name` of `dst`, made or merged with what an earlier input put there.
    fn copy_subdir(
        &mut self,
        tree: &mut Tree<'_>,
        (src, st): (&OwnedFd, &FileStat),
        dst: &OwnedFd,
        name: &std::ffi::OsStr,
        (from, to): (&Path, &Path),
        linked: bool,
    ) -> Result<(), StageError> {
        let input = tree.input;
        if tree.chain.len() > MAX_DEPTH {
            return Err(bad(input, InputProblem::TooDeep));
        }
        if tree.chain.contains(&(st.st_dev, st.st_ino)) {
            let path = tree.shown(from);
            return Err(bad(
                input,
                match linked {
                    true => InputProblem::LinkCycle { path },
                    false => InputProblem::HoldsItself { path },
                },
            ));
        }
        let (sub, made) = beneath::make_dir(dst, name, DIR_PERM).map_err(|e| match e {
            Errno::ENOTDIR | Errno::ELOOP => already_file(input, to),
            e => bad(
                input,
                InputProblem::Create {
                    at: in_job(to),
                    cause: e.into(),
                },
            ),
        })?;
        self.count(input, u64::from(made))?;
        tree.chain.push((st.st_dev, st.st_ino));
        let copied = self.copy_dir(tree, src, &sub, from, to);
        tree.chain.pop();
        copied
    }
}

fn already_file(input: &Input, at: &Path) -> StageError {
    bad(input, InputProblem::AlreadyFile { at: in_job(at) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_is_removed_even_when_the_run_locked_a_directory() {
        let state = tempfile::tempdir().unwrap();
        let state = StateDir::new(state.path());
        let stage = Stage::create(&state).unwrap();
        let mode = std::fs::metadata(&stage.job).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        let locked = stage.out.join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::write(locked.join("f"), "x").unwrap();
        std::fs::set_permissions(&locked, fs::Permissions::from_mode(0o500)).unwrap();
        // A stage of a command that is gone (no pid is that high) goes with the next one.
        let stale = state.runs().join("999999999-1");
        std::fs::create_dir_all(stale.join("out")).unwrap();
        let next = Stage::create(&state).unwrap();
        assert!(!stale.exists());
        let root = stage.root.clone();
        drop(stage);
        assert!(!root.exists());
        assert!(next.root.exists(), "a live command's stage stays");
    }

    #[test]
    fn only_what_the_user_gave_is_a_usage_error() {
        let e = Stager::new(Path::new("/nonexistent/job"), 1)
            .err()
            .expect("no job");
        assert!(matches!(e, StageError::Job { .. }) && !e.is_usage(), "{e}");
        let job = tempfile::tempdir().unwrap();
        let mut s = Stager::new(job.path(), 1).unwrap();
        let e = s.add_script("a/b.py", "1").unwrap_err();
        assert!(
            matches!(e, StageError::Script { .. }) && !e.is_usage(),
            "{e}"
        );
        let e = s
            .add(&Input::parse("/nonexistent/x.py", false).unwrap())
            .unwrap_err();
        assert!(
            matches!(
                &e,
                StageError::Input {
                    problem: InputProblem::Read { .. },
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.is_usage());
        assert!(
            e.to_string()
                .starts_with("--file /nonexistent/x.py: cannot read"),
            "{e}"
        );
    }

    #[test]
    fn destinations_stay_inside_job() {
        assert_eq!(check_dest("lib/x.py"), Ok(PathBuf::from("lib/x.py")));
        assert_eq!(check_dest("./a//b/"), Ok(PathBuf::from("a/b")));
        assert_eq!(check_dest("."), Ok(PathBuf::new()));
        for bad in ["../x", "a/../../x", "a/..", "/etc/x", "/"] {
            assert!(check_dest(bad).is_err(), "{bad}");
        }
        assert_eq!(check_dest("/etc"), Err(BadDest::Absolute("/etc".into())));
        assert_eq!(check_dest("a/../b"), Err(BadDest::Leaves("a/../b".into())));
        assert!(
            check_dest("/etc")
                .unwrap_err()
                .to_string()
                .contains("absolute")
        );
        assert!(
            check_dest("a/../b")
                .unwrap_err()
                .to_string()
                .contains("leaves /job")
        );
    }

    #[test]
    fn inputs_default_beside_the_script() {
        let i = Input::parse("conf/rules.json", false).unwrap();
        assert_eq!(
            (i.source, i.dest),
            ("conf/rules.json".into(), "rules.json".into())
        );
        let i = Input::parse("conf/rules.json:etc/r.json", false).unwrap();
        assert_eq!(
            (i.source, i.dest),
            ("conf/rules.json".into(), "etc/r.json".into())
        );
        let i = Input::parse("lib", true).unwrap();
        assert_eq!(i.dest, PathBuf::from("lib"));
        let i = Input::parse("lib:.", true).unwrap();
        assert_eq!(i.dest, PathBuf::new());
        let e = Input::parse("x:../y", false).unwrap_err();
        assert!(matches!(e, BadInput::Dest { .. }), "{e}");
        assert!(e.to_string().starts_with("--file x:../y:"), "{e}");
        let e = Input::parse("x:.", false).unwrap_err();
        assert!(matches!(e, BadInput::NoName { .. }), "{e}");
        assert!(e.to_string().contains("needs a name"), "{e}");
        // A path with ':' that exists is taken whole.
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("a:b");
        std::fs::write(&odd, "").unwrap();
        let i = Input::parse(odd.to_str().unwrap(), false).unwrap();
        assert_eq!(i.dest, PathBuf::from("a:b"));
    }

    #[test]
    fn inputs_are_copied_readable_bounded_and_never_twice() {
        let src = tempfile::tempdir().unwrap();
        let job = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("lib")).unwrap();
        std::fs::write(src.path().join("lib/helper.py"), "X = 1\n").unwrap();
        std::os::unix::fs::symlink("helper.py", src.path().join("lib/alias.py")).unwrap();
        let secret = src.path().join("secret.txt");
        std::fs::write(&secret, "s").unwrap();
        std::fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let p = |rel: &str| src.path().join(rel).to_str().unwrap().to_string();
        let mut s = Stager::new(job.path(), 1).unwrap();
        s.add(&Input::parse(&p("lib"), true).unwrap()).unwrap();
        s.add(&Input::parse(&format!("{}:deep/er/s.txt", p("secret.txt")), false).unwrap())
            .unwrap();
        let copied = job.path().join("deep/er/s.txt");
        assert_eq!(std::fs::read_to_string(&copied).unwrap(), "s");
        let mode = std::fs::metadata(&copied).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644, "readable by the run's uid");
        // A link inside the tree: copied as the file it names.
        let alias = job.path().join("lib/alias.py");
        assert!(std::fs::symlink_metadata(&alias).unwrap().is_file());
        assert_eq!(std::fs::read_to_string(&alias).unwrap(), "X = 1\n");
        let twice =
            s.add(&Input::parse(&format!("{}:lib/helper.py", p("secret.txt")), false).unwrap());
        let twice = twice.unwrap_err();
        assert!(
            matches!(
                &twice,
                StageError::Input {
                    problem: InputProblem::Twice { .. },
                    ..
                }
            ),
            "{twice}"
        );
        assert!(twice.is_usage() && twice.to_string().contains("given twice"));
        // Over the limit: refused, naming the option.
        std::fs::write(src.path().join("big"), vec![0u8; (1 << 20) + 1]).unwrap();
        let e = s.add(&Input::parse(&p("big"), false).unwrap()).unwrap_err();
        assert!(
            e.to_string().contains("more than 1 MB (--max-input 1)"),
            "{e}"
        );
        s.add_script("helper.py", "print(1)").unwrap();
        s.add_script("helper.py", "print(2)").unwrap();
        assert_eq!(
            std::fs::read_to_string(job.path().join("helper.py")).unwrap(),
            "print(2)"
        );
    }

    #[test]
    fn the_stage_never_holds_a_link_and_nothing_lands_outside_it() {
        let src = tempfile::tempdir().unwrap();
        let job = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        let p = |rel: &str| src.path().join(rel).to_str().unwrap().to_string();
        std::fs::create_dir_all(src.path().join("lib/pkg")).unwrap();
        std::fs::create_dir_all(src.path().join("data/evil")).unwrap();
        std::fs::write(src.path().join("data/evil/payload.txt"), "p").unwrap();
        std::fs::write(src.path().join("lib/pkg/m.py"), "M = 1").unwrap();
        std::os::unix::fs::symlink("pkg", src.path().join("lib/inner")).unwrap();
        let mut s = Stager::new(job.path(), 1).unwrap();
        s.add(&Input::parse(&format!("{}:.", p("lib")), true).unwrap())
            .unwrap();
        // The link became a directory of its own: a later input merges into it, in /job.
        s.add(&Input::parse(&format!("{}:inner", p("data")), true).unwrap())
            .unwrap();
        assert!(job.path().join("inner/evil/payload.txt").is_file());
        assert!(job.path().join("inner/m.py").is_file());
        assert!(job.path().join("pkg/m.py").is_file());
        // A link leading out of its tree: refused by name, nothing read or written there.
        std::os::unix::fs::symlink(host.path(), src.path().join("lib/evil")).unwrap();
        let mut s = Stager::new(job.path(), 1).unwrap();
        let e = s
            .add(&Input::parse(&format!("{}:other", p("lib")), true).unwrap())
            .unwrap_err();
        assert!(
            matches!(
                &e,
                StageError::Input {
                    problem: InputProblem::LinkOutside { .. },
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("lib/evil is a link leading outside"),
            "{e}"
        );
        let mut links = vec![job.path().to_path_buf()];
        while let Some(d) = links.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let entry = entry.unwrap();
                let kind = entry.file_type().unwrap();
                assert!(!kind.is_symlink(), "{:?} is a link", entry.path());
                if kind.is_dir() {
                    links.push(entry.path());
                }
            }
        }
        assert_eq!(std::fs::read_dir(host.path()).unwrap().count(), 0);
        // The script replaces a file an input put at its name, never a directory.
        s.add_script("pkg", "x").unwrap_err();
        assert!(job.path().join("pkg/m.py").is_file());
    }

    #[test]
    fn unlocking_a_stage_never_changes_what_a_link_in_it_names() {
        let base = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
        fs::set_permissions(outside.path(), fs::Permissions::from_mode(0o751)).unwrap();
        let run = base.path().join("run");
        fs::create_dir_all(run.join("a/b")).unwrap();
        std::os::unix::fs::symlink(outside.path(), run.join("a/evil")).unwrap();
        fs::write(run.join("a/file"), "").unwrap();
        fs::set_permissions(run.join("a/file"), fs::Permissions::from_mode(0o444)).unwrap();
        for d in ["a/b", "a"] {
            fs::set_permissions(run.join(d), fs::Permissions::from_mode(0o500)).unwrap();
        }
        unlock(&beneath::open_root(base.path()).unwrap(), "run".as_ref(), 0);
        for d in ["", "a", "a/b"] {
            assert_eq!(mode(&run.join(d)), 0o700, "{d}");
        }
        assert_eq!(
            mode(outside.path()),
            0o751,
            "the link's target is left alone"
        );
        assert_eq!(mode(&run.join("a/file")), 0o444, "files are left alone");
        remove(&run);
        assert!(!run.exists());
        assert!(outside.path().exists());
    }
}
