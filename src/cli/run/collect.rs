//! `--out DIR`: what the run left in /tmp/out, copied into DIR once every process of the
//! run is gone. The run wrote those files, so each is treated as hostile: only regular
//! files and directories are copied, no link is followed (neither the run's nor one
//! already in DIR), nothing is opened by a path a link could redirect (every step is
//! relative to a directory descriptor, with O_NOFOLLOW: `beneath`, shared with the
//! stage), sizes are bounded by the run's own /tmp size, and names are sanitised. What
//! is refused is reported, not copied.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::stat::{FileStat, SFlag, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use super::report::OutFile;
use crate::job::beneath::{self, Perm, kind, list};

use crate::isolation::spec::OUT_MOUNT;

/// Files and directories copied back at most, like the run's /tmp holds.
const MAX_ENTRIES: usize = 16_384;
/// Directories nest at most this deep.
const MAX_DEPTH: usize = 32;

/// What the copy did: the files written, and a sentence for each entry refused.
#[derive(Debug, Default)]
pub(super) struct Collected {
    pub files: Vec<OutFile>,
    pub refused: Vec<String>,
}

/// A name from the run, safe to create in DIR: control characters (newlines, escapes,
/// NUL cannot occur) become `_`, bytes that are not UTF-8 become U+FFFD. `.`, `..` and
/// anything holding a `/` are never names (readdir cannot return them; refused anyway).
pub(super) fn sanitise(name: &OsStr) -> Option<String> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return None;
    }
    let clean: Vec<u8> = bytes
        .iter()
        .map(|&b| if b < 0x20 || b == 0x7f { b'_' } else { b })
        .collect();
    Some(String::from_utf8_lossy(&clean).into_owned())
}

/// Why nothing at all could be copied back.
#[derive(Debug, thiserror::Error)]
pub(super) enum CollectError {
    #[error("--out {}: cannot create it: {source}", to.display())]
    Create {
        to: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("--out {}: cannot open it: {}", to.display(), errno.desc())]
    Open {
        to: std::path::PathBuf,
        errno: Errno,
    },
    #[error("cannot read the run's {OUT_MOUNT}: {}", .0.desc())]
    Source(Errno),
}

/// Copy the run's output directory `from` into `to` (created if missing), at most
/// `limit` bytes of file contents in all.
pub(super) fn collect(from: &Path, to: &Path, limit: u64) -> Result<Collected, CollectError> {
    std::fs::create_dir_all(to).map_err(|source| CollectError::Create {
        to: to.into(),
        source,
    })?;
    // DIR itself is the user's to name, link or not; nothing below it is followed.
    let dest = beneath::open_root(to).map_err(|errno| CollectError::Open {
        to: to.into(),
        errno,
    })?;
    let source =
        beneath::open_dir(nix::fcntl::AT_FDCWD, from.as_os_str()).map_err(CollectError::Source)?;
    let mut copy = Copy {
        room: limit,
        limit,
        entries: 0,
        out: Collected::default(),
    };
    copy.dir(&source, &dest, "", 0);
    Ok(copy.out)
}

struct Copy {
    room: u64,
    limit: u64,
    entries: usize,
    out: Collected,
}

/// One entry of a directory of the run: its name there, the name it gets in DIR, and
/// its path below /tmp/out (for messages and `files`).
struct Entry<'a> {
    raw: &'a OsStr,
    name: &'a str,
    rel: &'a str,
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_string()
    } else {
        format!("{rel}/{name}")
    }
}

impl Copy {
    fn refuse(&mut self, rel: &str, why: impl std::fmt::Display) {
        self.out
            .refused
            .push(format!("{OUT_MOUNT}/{rel}: {why}; not copied"));
    }

    /// Copy the entries of `src` into `dst`; `rel` is their path below /tmp/out.
    fn dir(&mut self, src: &OwnedFd, dst: &OwnedFd, rel: &str, depth: usize) {
        let names = match list(src) {
            Ok(names) => names,
            Err(e) => return self.refuse(rel, format!("cannot list it: {}", e.desc())),
        };
        let mut seen = std::collections::HashSet::new();
        for raw in names {
            let shown = String::from_utf8_lossy(raw.as_bytes())
                .escape_debug()
                .to_string();
            let Some(name) = sanitise(&raw) else {
                self.refuse(&join(rel, &shown), "not a usable name");
                continue;
            };
            let rel = join(rel, &name);
            self.entries += 1;
            if self.entries > MAX_ENTRIES {
                return self.refuse(&rel, format!("more than {MAX_ENTRIES} entries in all"));
            }
            if !seen.insert(name.clone()) {
                self.refuse(
                    &rel,
                    "another name of the run reads the same once sanitised",
                );
                continue;
            }
            let st = match fstatat(src.as_fd(), raw.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(e) => {
                    self.refuse(&rel, e.desc());
                    continue;
                }
            };
            let entry = Entry {
                raw: &raw,
                name: &name,
                rel: &rel,
            };
            match kind(&st) {
                SFlag::S_IFREG => self.file(src, dst, &entry, &st),
                SFlag::S_IFDIR if depth + 1 >= MAX_DEPTH => {
                    self.refuse(&rel, format!("directories nest deeper than {MAX_DEPTH}"))
                }
                SFlag::S_IFDIR => self.subdir(src, dst, &entry, depth),
                SFlag::S_IFLNK => self.refuse(&rel, "a symbolic link, which is never followed"),
                _ => self.refuse(&rel, "not a regular file (a device, pipe or socket)"),
            }
        }
    }

    fn subdir(&mut self, src: &OwnedFd, dst: &OwnedFd, e: &Entry<'_>, depth: usize) {
        let Entry { raw, name, rel } = *e;
        let from = match beneath::open_dir(src, raw) {
            Ok(fd) => fd,
            Err(e) => return self.refuse(rel, e.desc()),
        };
        // A link already in DIR under this name is refused, not entered.
        let to = match beneath::make_dir(dst, OsStr::new(name), Perm::Umask(0o755)) {
            Ok((fd, _)) => fd,
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                return self.refuse(rel, "--out already holds a link or file there");
            }
            Err(e) => return self.refuse(rel, format!("cannot create it in --out: {}", e.desc())),
        };
        self.dir(&from, &to, rel, depth + 1);
    }

    fn file(&mut self, src: &OwnedFd, dst: &OwnedFd, e: &Entry<'_>, st: &FileStat) {
        let Entry { raw, name, rel } = *e;
        // The apparent size counts: a sparse file is as large as what it would write.
        let size = u64::try_from(st.st_size).unwrap_or(u64::MAX);
        if size > self.room {
            return self.refuse(
                rel,
                format!(
                    "{size} bytes, past what /tmp/out may hand back ({} MB in all, tmp_size_mb)",
                    self.limit >> 20
                ),
            );
        }
        // What is opened is what was checked.
        let input = match beneath::open_file(src, raw, st) {
            Ok(Some(file)) => file,
            Ok(None) => return self.refuse(rel, "changed while it was copied"),
            Err(e) => return self.refuse(rel, format!("cannot read it: {}", e.desc())),
        };
        match fstatat(dst.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(there) if kind(&there) == SFlag::S_IFREG => {
                // An earlier copy: replaced, never written through.
                if let Err(e) = unlinkat(dst.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
                    return self.refuse(rel, format!("cannot replace it in --out: {}", e.desc()));
                }
            }
            Ok(_) => {
                return self.refuse(
                    rel,
                    "--out already holds a link or directory there, which is left alone",
                );
            }
            Err(_) => {}
        }
        let mut writer = match beneath::create_file(dst, OsStr::new(name), Perm::Umask(0o644)) {
            Ok(file) => file,
            Err(e) => return self.refuse(rel, format!("cannot create it in --out: {}", e.desc())),
        };
        let mut reader = input.take(size);
        let copied =
            std::io::copy(&mut reader, &mut writer).and_then(|n| writer.flush().map(|()| n));
        match copied {
            Ok(bytes) => {
                self.room -= bytes;
                self.out.files.push(OutFile {
                    path: rel.to_string(),
                    bytes,
                });
            }
            Err(e) => {
                let _ = unlinkat(dst.as_fd(), name, UnlinkatFlags::NoRemoveDir);
                self.refuse(rel, format!("copying failed: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn names_are_sanitised_and_never_climb() {
        let s = |b: &[u8]| sanitise(OsStr::from_bytes(b));
        assert_eq!(s(b"report.csv"), Some("report.csv".into()));
        assert_eq!(s(b"a\nb\x1b[31m\x7f"), Some("a_b_[31m_".into()));
        assert_eq!(s(b"..hidden"), Some("..hidden".into()));
        assert_eq!(s(b"caf\xe9"), Some("caf\u{fffd}".into()));
        for bad in [&b""[..], b".", b"..", b"../x", b"a/b", b"/etc"] {
            assert_eq!(s(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn regular_files_are_copied_and_links_refused_on_both_sides() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let f = from.path();
        std::fs::create_dir(f.join("sub")).unwrap();
        std::fs::write(f.join("sub/r.txt"), "result").unwrap();
        std::fs::write(f.join("odd\nname"), "x").unwrap();
        symlink("/etc/passwd", f.join("passwd")).unwrap();
        symlink(outside.path(), f.join("escape")).unwrap();
        std::fs::write(f.join("victim"), "from the run").unwrap();
        let fifo_mode = nix::sys::stat::Mode::from_bits_truncate(0o600);
        nix::unistd::mkfifo(&f.join("fifo"), fifo_mode).unwrap();
        // DIR already holds a link where the run writes a file: left alone.
        let target = outside.path().join("target");
        std::fs::write(&target, "untouched").unwrap();
        symlink(&target, to.path().join("victim")).unwrap();
        let c = collect(f, to.path(), 1 << 20).unwrap();
        let paths: Vec<&str> = c.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, vec!["odd_name", "sub/r.txt"]);
        assert_eq!(c.files[1].bytes, 6);
        assert_eq!(
            std::fs::read_to_string(to.path().join("sub/r.txt")).unwrap(),
            "result"
        );
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
        let refused = c.refused.join("\n");
        for needle in [
            "/tmp/out/passwd: a symbolic link",
            "/tmp/out/escape: a symbolic link",
            "/tmp/out/victim: --out already holds a link",
            "/tmp/out/fifo: not a regular file",
        ] {
            assert!(refused.contains(needle), "{needle}: {refused}");
        }
        assert!(std::fs::read_dir(outside.path()).unwrap().count() == 1);
        // A second copy into the same DIR replaces earlier files.
        std::fs::write(f.join("sub/r.txt"), "again").unwrap();
        collect(f, to.path(), 1 << 20).unwrap();
        assert_eq!(
            std::fs::read_to_string(to.path().join("sub/r.txt")).unwrap(),
            "again"
        );
    }

    #[test]
    fn sizes_are_bounded_by_the_apparent_size() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let sparse = std::fs::File::create(from.path().join("sparse")).unwrap();
        sparse.set_len(10 << 30).unwrap();
        std::fs::write(from.path().join("a"), vec![1u8; 600]).unwrap();
        std::fs::write(from.path().join("b"), vec![1u8; 600]).unwrap();
        let c = collect(from.path(), to.path(), 1000).unwrap();
        assert_eq!(
            c.files,
            vec![OutFile {
                path: "a".into(),
                bytes: 600
            }]
        );
        assert_eq!(c.refused.len(), 2, "{:?}", c.refused);
        assert!(
            c.refused
                .iter()
                .any(|r| r.contains("sparse: 10737418240 bytes"))
        );
        assert!(!to.path().join("sparse").exists() && !to.path().join("b").exists());
    }
}
