//! Files below a directory descriptor, with no link followed: everything `stage` (the
//! run's /job) and `collect` (`--out DIR`) create or read below the directory they were
//! given. Each step opens one name relative to the descriptor of the directory holding
//! it, with O_NOFOLLOW, so a link anywhere in a tree (left by a run, planted in DIR, or
//! part of an input) can never redirect a write or a read elsewhere; the only links ever
//! followed are those of an input tree, by the kernel, and only while they stay beneath
//! its root (`follow_beneath`).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, mkdirat};

/// A directory, opened to be listed and used as the base of further steps.
const DIR: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// A regular file, opened to be read: O_NONBLOCK so that a FIFO swapped in after the
/// check cannot hang the command (the check after opening refuses it).
const READ: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_NONBLOCK)
    .union(OFlag::O_NOCTTY)
    .union(OFlag::O_CLOEXEC);

/// Times a resolution beneath a root is tried again when the tree moved under it.
const RETRIES: usize = 8;

/// The mode of a new entry: `Exact`, whatever this command's umask (the run's uid must
/// read the stage), or through the umask (`--out`: the user's own files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Perm {
    Exact(u32),
    Umask(u32),
}

impl Perm {
    fn mode(self) -> Mode {
        match self {
            Self::Exact(m) | Self::Umask(m) => Mode::from_bits_truncate(m),
        }
    }

    /// Set an exact mode on what was just created.
    fn apply(self, fd: impl AsFd) -> Result<(), Errno> {
        match self {
            Self::Exact(m) => fchmod(fd, Mode::from_bits_truncate(m)),
            Self::Umask(_) => Ok(()),
        }
    }
}

/// The type bits of `st`.
pub(crate) fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Whether two stats describe the same file.
fn same(a: &FileStat, b: &FileStat) -> bool {
    (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
}

/// The directory at `path` as the user gave it (a link there is followed: they named
/// it), to start from.
pub(crate) fn open_root(path: &Path) -> Result<OwnedFd, Errno> {
    nix::fcntl::open(path, DIR.difference(OFlag::O_NOFOLLOW), Mode::empty())
}

/// The directory `name` in `dir`, never through a link: ENOTDIR (Linux checks
/// O_DIRECTORY first; ELOOP otherwise) for a link, as for anything else that is not a
/// directory.
pub(crate) fn open_dir(dir: impl AsFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    openat(dir, name, DIR, Mode::empty())
}

/// The directory `name` in `dir`, made if missing, then opened as by `open_dir`; true
/// when it was made now.
pub(crate) fn make_dir(dir: impl AsFd, name: &OsStr, perm: Perm) -> Result<(OwnedFd, bool), Errno> {
    let made = match mkdirat(dir.as_fd(), name, perm.mode()) {
        Ok(()) => true,
        Err(Errno::EEXIST) => false,
        Err(e) => return Err(e),
    };
    let fd = open_dir(dir, name)?;
    if made {
        perm.apply(&fd)?;
    }
    Ok((fd, made))
}

/// Where `make_dirs` stopped: the path (below its start) it could not make or enter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stopped {
    pub at: PathBuf,
    pub errno: Errno,
}

/// `rel` below `dir`, each directory made if missing (counted in the second value) and
/// entered by `open_dir`: a link or file on the way stops it (ENOTDIR). `rel`
/// holds plain names only (callers check it; anything else is EINVAL).
pub(crate) fn make_dirs(dir: &OwnedFd, rel: &Path, perm: Perm) -> Result<(OwnedFd, u64), Stopped> {
    let mut cur = dir.try_clone().map_err(|_| Stopped {
        at: PathBuf::new(),
        errno: Errno::EMFILE,
    })?;
    let (mut at, mut made) = (PathBuf::new(), 0);
    for c in rel.components() {
        let Component::Normal(name) = c else {
            return Err(Stopped {
                at,
                errno: Errno::EINVAL,
            });
        };
        at.push(name);
        let (next, new) = make_dir(&cur, name, perm).map_err(|errno| Stopped {
            at: at.clone(),
            errno,
        })?;
        made += u64::from(new);
        cur = next;
    }
    Ok((cur, made))
}

/// A new regular file `name` in `dir`: never over an existing entry (EEXIST, a link
/// included), never through a link.
pub(crate) fn create_file(dir: impl AsFd, name: &OsStr, perm: Perm) -> Result<File, Errno> {
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(dir, name, flags, perm.mode())?;
    perm.apply(&fd)?;
    Ok(File::from(fd))
}

/// The regular file `name` in `dir`, opened to be read with no link followed, if it is
/// still the file `st` described (None: it was replaced since).
pub(crate) fn open_file(
    dir: impl AsFd,
    name: &OsStr,
    st: &FileStat,
) -> Result<Option<File>, Errno> {
    let fd = openat(dir, name, READ, Mode::empty())?;
    let now = fstat(&fd)?;
    Ok((kind(&now) == SFlag::S_IFREG && same(&now, st)).then(|| File::from(fd)))
}

/// What `rel` below `root` leads to, links followed by the kernel only while every step
/// stays beneath `root` (openat2 RESOLVE_BENEATH): EXDEV when one leaves it (an absolute
/// link always does), ELOOP for links that lead in a circle, ENOENT when it names
/// nothing. A regular file comes opened to be read, a directory opened as by `open_dir`;
/// anything else only to be looked at (O_PATH), never opened.
pub(crate) fn follow_beneath(root: &OwnedFd, rel: &Path) -> Result<(OwnedFd, FileStat), Errno> {
    let how = |flags: OFlag| {
        OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS)
    };
    let mut last = Errno::EAGAIN;
    for _ in 0..RETRIES {
        // EAGAIN: a rename elsewhere in the tree raced the kernel's check; try again.
        let path = match openat2(root.as_fd(), rel, how(OFlag::O_PATH)) {
            Ok(fd) => fd,
            Err(Errno::EAGAIN) => continue,
            Err(e) => return Err(e),
        };
        let st = fstat(&path)?;
        let flags = match kind(&st) {
            SFlag::S_IFREG => READ.difference(OFlag::O_NOFOLLOW),
            SFlag::S_IFDIR => DIR.difference(OFlag::O_NOFOLLOW),
            _ => return Ok((path, st)),
        };
        match openat2(root.as_fd(), rel, how(flags)) {
            Ok(fd) => match fstat(&fd) {
                // What was opened is what was looked at.
                Ok(now) if same(&now, &st) => return Ok((fd, now)),
                Ok(_) => last = Errno::EAGAIN,
                Err(e) => return Err(e),
            },
            Err(Errno::EAGAIN) => {}
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Set the mode of the directory `name` in `dir`, never through a link: the directory
/// is pinned by an O_PATH descriptor first (which needs no permission on it), then
/// changed through /proc/self/fd, which names that very directory (fchmod refuses O_PATH
/// descriptors; fchmodat follows a link that replaced it).
pub(crate) fn set_dir_mode(dir: impl AsFd, name: &OsStr, mode: u32) -> Result<(), Errno> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let pinned = openat(dir, name, flags, Mode::empty())?;
    let path = format!("/proc/self/fd/{}", pinned.as_raw_fd());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| e.raw_os_error().map_or(Errno::EIO, Errno::from_raw))
}

/// The names in directory `fd`, sorted, without `.` and `..`.
pub(crate) fn list(fd: &OwnedFd) -> Result<Vec<OsString>, Errno> {
    let mut dir = nix::dir::Dir::from_fd(fd.try_clone().map_err(|_| Errno::EMFILE)?)?;
    let mut names = Vec::new();
    for entry in dir.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name));
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::fs::{PermissionsExt, symlink};

    use nix::fcntl::AtFlags;
    use nix::sys::stat::fstatat;

    use super::*;

    fn root(dir: &Path) -> OwnedFd {
        open_root(dir).unwrap()
    }

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    /// Every entry below `dir`, as relative paths.
    fn tree(dir: &Path) -> Vec<String> {
        let mut found = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                    todo.push(p.clone());
                }
                found.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
        found.sort();
        found
    }

    #[test]
    fn directories_are_made_and_entered_never_through_a_link() {
        let base = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let fd = root(base.path());
        let (deep, made) = make_dirs(&fd, Path::new("a/b/c"), Perm::Exact(0o755)).unwrap();
        assert_eq!(made, 3);
        let mode = std::fs::metadata(base.path().join("a/b"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755, "exact whatever the umask");
        // Made again: entered, nothing new.
        assert_eq!(
            make_dirs(&fd, Path::new("a/b"), Perm::Exact(0o755))
                .unwrap()
                .1,
            0
        );
        create_file(&deep, os("f"), Perm::Exact(0o644)).unwrap();
        assert!(base.path().join("a/b/c/f").is_file());
        // A link on the way, to a directory or a file, stops the walk where it stands.
        symlink(outside.path(), base.path().join("a/evil")).unwrap();
        std::fs::write(base.path().join("a/file"), "").unwrap();
        let stopped = make_dirs(&fd, Path::new("a/evil/x/y"), Perm::Exact(0o755)).unwrap_err();
        assert_eq!(
            stopped,
            Stopped {
                at: "a/evil".into(),
                errno: Errno::ENOTDIR
            }
        );
        let stopped = make_dirs(&fd, Path::new("a/file/x"), Perm::Exact(0o755)).unwrap_err();
        assert_eq!(stopped.errno, Errno::ENOTDIR);
        assert_eq!(
            make_dirs(&fd, Path::new("a/../x"), Perm::Exact(0o755))
                .unwrap_err()
                .errno,
            Errno::EINVAL
        );
        let a = open_dir(&fd, os("a")).unwrap();
        assert_eq!(open_dir(&a, os("evil")).unwrap_err(), Errno::ENOTDIR);
        assert_eq!(tree(outside.path()), Vec::<String>::new());
    }

    #[test]
    fn files_are_created_new_and_never_through_a_link() {
        let base = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let fd = root(base.path());
        let target = outside.path().join("target");
        symlink(&target, base.path().join("link")).unwrap();
        assert_eq!(
            create_file(&fd, os("link"), Perm::Exact(0o644)).unwrap_err(),
            Errno::EEXIST
        );
        assert!(!target.exists(), "a dangling link is not created through");
        let mut f = create_file(&fd, os("new"), Perm::Umask(0o600)).unwrap();
        f.write_all(b"data").unwrap();
        assert_eq!(
            create_file(&fd, os("new"), Perm::Exact(0o644)).unwrap_err(),
            Errno::EEXIST
        );
        // Reading: what was checked, never a link or a replacement.
        let st = fstatat(&fd, "new", AtFlags::AT_SYMLINK_NOFOLLOW).unwrap();
        let mut text = String::new();
        open_file(&fd, os("new"), &st)
            .unwrap()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "data");
        std::fs::remove_file(base.path().join("new")).unwrap();
        std::fs::write(base.path().join("new"), "swapped").unwrap();
        assert!(open_file(&fd, os("new"), &st).unwrap().is_none());
        std::fs::write(&target, "t").unwrap();
        assert_eq!(open_file(&fd, os("link"), &st).unwrap_err(), Errno::ELOOP);
    }

    #[test]
    fn links_are_followed_only_while_they_stay_beneath_the_root() {
        let base = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        let tree_root = base.path().join("tree");
        std::fs::create_dir_all(tree_root.join("pkg")).unwrap();
        std::fs::write(tree_root.join("pkg/data"), "d").unwrap();
        std::fs::write(base.path().join("beside"), "b").unwrap();
        let (abs, out) = (tree_root.join("pkg/data"), outside.path().join("secret"));
        let links = [
            ("file", "pkg/data"),
            ("dir", "pkg"),
            ("via", "dir/../pkg/data"),
            ("up", "../beside"),
            ("abs", abs.to_str().unwrap()),
            ("out", out.to_str().unwrap()),
            ("gone", "nothing"),
            ("ring1", "ring2"),
            ("ring2", "ring1"),
        ];
        for (name, target) in links {
            symlink(target, tree_root.join(name)).unwrap();
        }
        nix::unistd::mkfifo(&tree_root.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        symlink("fifo", tree_root.join("to-fifo")).unwrap();
        let fd = root(&tree_root);
        let follow = |rel: &str| follow_beneath(&fd, Path::new(rel));
        let (file, st) = follow("file").unwrap();
        assert_eq!(kind(&st), SFlag::S_IFREG);
        let mut text = String::new();
        File::from(file).read_to_string(&mut text).unwrap();
        assert_eq!(text, "d");
        let (dir, st) = follow("dir").unwrap();
        assert_eq!(kind(&st), SFlag::S_IFDIR);
        assert_eq!(list(&dir).unwrap(), vec![OsString::from("data")]);
        assert_eq!(kind(&follow("via").unwrap().1), SFlag::S_IFREG);
        assert_eq!(kind(&follow("dir/data").unwrap().1), SFlag::S_IFREG);
        for rel in ["up", "abs", "out"] {
            assert_eq!(follow(rel).unwrap_err(), Errno::EXDEV, "{rel}");
        }
        assert_eq!(follow("gone").unwrap_err(), Errno::ENOENT);
        assert_eq!(follow("ring1").unwrap_err(), Errno::ELOOP);
        // A FIFO is looked at, not opened (which would wait for a writer).
        let (_, st) = follow("to-fifo").unwrap();
        assert_eq!(kind(&st), SFlag::S_IFIFO);
    }
}
