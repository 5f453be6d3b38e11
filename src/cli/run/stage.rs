//! The run's own directories on the host, under the state directory (`runs/<id>/`):
//! `job/`, bound read-only at /job (the script and the `--file` and `--dir` inputs), and
//! `out/`, bound at /tmp/out (see `collect`). Inputs are copied, not bound: the run's uid
//! reads the copies whatever owned the originals, and nothing of the host is exposed
//! live. Both go when the stage is dropped.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::engine::RunFiles;
use crate::state::StateDir;

/// Entries one run may be given: far beyond a project's sources, short of a disk's worth.
const MAX_INPUT_ENTRIES: u64 = 65_536;

/// A run's directories, removed on drop.
pub(super) struct Stage {
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
/// made writable again first.
fn remove(dir: &Path) {
    if fs::remove_dir_all(dir).is_ok() {
        return;
    }
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        if fs::symlink_metadata(&d).is_ok_and(|m| m.is_dir()) {
            let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o700));
            todo.extend(
                fs::read_dir(&d)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        }
    }
    let _ = fs::remove_dir_all(dir);
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

/// One `--file PATH[:DEST]` or `--dir DIR[:DEST]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Input {
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
    pub fn parse(raw: &str, dir: bool) -> Result<Self, String> {
        let flag = if dir { "--dir" } else { "--file" };
        let given = format!("{flag} {raw}");
        let (source, dest) = match raw.rsplit_once(':') {
            Some((source, dest)) if !Path::new(raw).exists() => (source, Some(dest)),
            _ => (raw, None),
        };
        let source = PathBuf::from(source);
        let dest = match dest {
            Some(d) => check_dest(d).map_err(|e| format!("{given}: {e}"))?,
            None => match source.file_name() {
                Some(name) if source.components().next_back() != Some(Component::ParentDir) => {
                    PathBuf::from(name)
                }
                _ => PathBuf::new(),
            },
        };
        if dest.as_os_str().is_empty() && !dir {
            return Err(format!(
                "{given}: a file needs a name in /job: write {raw}:NAME"
            ));
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
pub(super) fn check_dest(raw: &str) -> Result<PathBuf, String> {
    let mut dest = PathBuf::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(part) => dest.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!(
                    "the destination {raw:?} leaves /job ('..'); give a path inside it"
                ));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "the destination {raw:?} is absolute; give a path relative to /job"
                ));
            }
        }
    }
    Ok(dest)
}

/// Copies inputs into a job directory, keeping count against the limits.
pub(super) struct Stager<'a> {
    job: &'a Path,
    /// Bytes that may still be copied.
    room: u64,
    limit_mb: u64,
    entries: u64,
}

impl<'a> Stager<'a> {
    pub fn new(job: &'a Path, limit_mb: u64) -> Self {
        Self {
            job,
            room: limit_mb << 20,
            limit_mb,
            entries: 0,
        }
    }

    /// Copy one input; errors name it and say what to do.
    pub fn add(&mut self, input: &Input) -> Result<(), String> {
        let at = self.job.join(&input.dest);
        let meta = fs::metadata(&input.source).map_err(|e| {
            format!(
                "{}: cannot read {}: {e}",
                input.given,
                input.source.display()
            )
        })?;
        if let Some(parent) = at.parent() {
            self.make_dirs(parent, input)?;
        }
        match (input.dir, meta.is_dir()) {
            (true, true) => self.copy_dir(&input.source, &at, input, 0),
            (false, false) if meta.is_file() => self.copy_file(&input.source, &at, input),
            (true, false) => Err(format!("{}: not a directory; use --file", input.given)),
            (false, true) => Err(format!("{}: a directory; use --dir", input.given)),
            (false, false) => Err(format!("{}: not a regular file", input.given)),
        }
    }

    /// The script itself, at /job/<name>, over anything an input put there.
    pub fn add_script(&mut self, name: &str, code: &str) -> Result<(), String> {
        let at = self.job.join(name);
        if fs::symlink_metadata(&at).is_ok_and(|m| !m.is_dir()) {
            let _ = fs::remove_file(&at);
        }
        write_new(&at, code.as_bytes())
            .map_err(|e| format!("cannot stage the script as {}: {e}", at.display()))
    }

    fn count(&mut self, input: &Input) -> Result<(), String> {
        self.entries += 1;
        if self.entries > MAX_INPUT_ENTRIES {
            return Err(format!(
                "{}: more than {MAX_INPUT_ENTRIES} files and directories of input; give fewer",
                input.given
            ));
        }
        Ok(())
    }

    fn too_large(&self, input: &Input) -> String {
        format!(
            "{}: the inputs hold more than {} MB (--max-input {}); raise --max-input or give less",
            input.given, self.limit_mb, self.limit_mb
        )
    }

    fn make_dirs(&mut self, dir: &Path, input: &Input) -> Result<(), String> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            self.make_dirs(parent, input)?;
        }
        self.count(input)?;
        fs::DirBuilder::new()
            .mode(0o755)
            .create(dir)
            .and_then(|()| fs::set_permissions(dir, fs::Permissions::from_mode(0o755)))
            .map_err(|e| {
                format!(
                    "{}: cannot create /job/{}: {e}",
                    input.given,
                    self.inside(dir)
                )
            })
    }

    fn inside(&self, at: &Path) -> String {
        at.strip_prefix(self.job)
            .unwrap_or(at)
            .display()
            .to_string()
    }

    fn copy_file(&mut self, src: &Path, at: &Path, input: &Input) -> Result<(), String> {
        self.count(input)?;
        let file = fs::File::open(src)
            .map_err(|e| format!("{}: cannot read {}: {e}", input.given, src.display()))?;
        // Read one byte past the room: a file that grew past it is caught, not cut.
        let mut data = Vec::new();
        file.take(self.room + 1)
            .read_to_end(&mut data)
            .map_err(|e| format!("{}: cannot read {}: {e}", input.given, src.display()))?;
        if data.len() as u64 > self.room {
            return Err(self.too_large(input));
        }
        self.room -= data.len() as u64;
        write_new(at, &data).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => format!(
                "{}: /job/{} is given twice; give one of them another destination (PATH:DEST)",
                input.given,
                self.inside(at)
            ),
            _ => format!(
                "{}: cannot copy to /job/{}: {e}",
                input.given,
                self.inside(at)
            ),
        })
    }

    fn copy_dir(&mut self, src: &Path, at: &Path, input: &Input, depth: u32) -> Result<(), String> {
        if depth > 64 {
            return Err(format!("{}: directories nest deeper than 64", input.given));
        }
        self.make_dirs(at, input)?;
        let mut entries: Vec<_> = fs::read_dir(src)
            .and_then(|d| d.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: cannot list {}: {e}", input.given, src.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let (from, to) = (entry.path(), at.join(entry.file_name()));
            let kind = entry
                .file_type()
                .map_err(|e| format!("{}: {}: {e}", input.given, from.display()))?;
            if kind.is_dir() {
                self.copy_dir(&from, &to, input, depth + 1)?;
            } else if kind.is_file() {
                self.copy_file(&from, &to, input)?;
            } else if kind.is_symlink() {
                // Kept as a link, not followed: it resolves inside the run, against the
                // run's own files.
                self.count(input)?;
                let target = fs::read_link(&from)
                    .map_err(|e| format!("{}: {}: {e}", input.given, from.display()))?;
                std::os::unix::fs::symlink(target, &to).map_err(|e| {
                    format!(
                        "{}: cannot link /job/{}: {e}",
                        input.given,
                        self.inside(&to)
                    )
                })?;
            } else {
                return Err(format!(
                    "{}: {} is not a regular file, a directory or a link",
                    input.given,
                    from.display()
                ));
            }
        }
        Ok(())
    }
}

/// Create `at` (never an existing file or link) readable by every uid, with `data`.
fn write_new(at: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(at)?;
    // The mode given at creation passes through this command's umask.
    f.set_permissions(fs::Permissions::from_mode(0o644))?;
    f.write_all(data)
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
    fn destinations_stay_inside_job() {
        assert_eq!(check_dest("lib/x.py"), Ok(PathBuf::from("lib/x.py")));
        assert_eq!(check_dest("./a//b/"), Ok(PathBuf::from("a/b")));
        assert_eq!(check_dest("."), Ok(PathBuf::new()));
        for bad in ["../x", "a/../../x", "a/..", "/etc/x", "/"] {
            assert!(check_dest(bad).is_err(), "{bad}");
        }
        assert!(check_dest("/etc").unwrap_err().contains("absolute"));
        assert!(check_dest("a/../b").unwrap_err().contains("leaves /job"));
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
        assert!(
            Input::parse("x:../y", false)
                .unwrap_err()
                .starts_with("--file x:../y:")
        );
        assert!(
            Input::parse("x:.", false)
                .unwrap_err()
                .contains("needs a name")
        );
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
        let mut s = Stager::new(job.path(), 1);
        s.add(&Input::parse(&p("lib"), true).unwrap()).unwrap();
        s.add(&Input::parse(&format!("{}:deep/er/s.txt", p("secret.txt")), false).unwrap())
            .unwrap();
        let copied = job.path().join("deep/er/s.txt");
        assert_eq!(std::fs::read_to_string(&copied).unwrap(), "s");
        let mode = std::fs::metadata(&copied).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644, "readable by the run's uid");
        assert_eq!(
            std::fs::read_link(job.path().join("lib/alias.py")).unwrap(),
            PathBuf::from("helper.py")
        );
        let twice =
            s.add(&Input::parse(&format!("{}:lib/helper.py", p("secret.txt")), false).unwrap());
        assert!(twice.unwrap_err().contains("given twice"));
        // Over the limit: refused, naming the option.
        std::fs::write(src.path().join("big"), vec![0u8; (1 << 20) + 1]).unwrap();
        let e = s.add(&Input::parse(&p("big"), false).unwrap()).unwrap_err();
        assert!(e.contains("more than 1 MB (--max-input 1)"), "{e}");
        s.add_script("helper.py", "print(1)").unwrap();
        s.add_script("helper.py", "print(2)").unwrap();
        assert_eq!(
            std::fs::read_to_string(job.path().join("helper.py")).unwrap(),
            "print(2)"
        );
    }
}
