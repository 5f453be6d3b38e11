//! Files an installer wrote are untrusted: package scripts ran there as a sandbox uid.
//! The server reads and changes them without following any link they contain.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Names of the real directories (not links to one) directly in `dir`.
pub fn real_dirs(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// A small regular file's text, opened without following a link at its last component
/// (its directories were checked by `real_dirs`).
pub fn read_regular(path: &Path) -> Option<String> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    file.take(1 << 20).read_to_string(&mut text).ok()?;
    Some(text)
}

/// Make a finished generation root's and read-only to everyone else: every entry owned by
/// root, no write bit for group or others, no set-id bit. Links are changed, never
/// followed. Returns the bytes of its regular files.
pub fn seal(dir: &Path) -> io::Result<u64> {
    let meta = fs::symlink_metadata(dir)?;
    // Without root the installer's uid was the server's own (a user namespace's).
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::lchown(dir, Some(0), Some(0))?;
    }
    if meta.file_type().is_symlink() {
        return Ok(0);
    }
    let mode = meta.mode() & 0o755;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))?;
    let mut bytes = if meta.is_file() { meta.len() } else { 0 };
    if meta.is_dir() {
        for entry in fs::read_dir(dir)? {
            bytes += seal(&entry?.path())?;
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_strips_write_and_set_id_bits_and_leaves_links_alone() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("pkg");
        fs::create_dir(&sub).unwrap();
        fs::write(sub.join("f"), b"abc").unwrap();
        fs::set_permissions(sub.join("f"), fs::Permissions::from_mode(0o4777)).unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("host"), b"x").unwrap();
        fs::set_permissions(
            outside.path().join("host"),
            fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        std::os::unix::fs::symlink(outside.path(), sub.join("link")).unwrap();
        assert_eq!(seal(dir.path()).unwrap(), 3);
        let mode = fs::metadata(sub.join("f")).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o755);
        let host = fs::metadata(outside.path().join("host")).unwrap().mode() & 0o777;
        assert_eq!(host, 0o666, "a link's target is not touched");
        assert_eq!(read_regular(&sub.join("f")).as_deref(), Some("abc"));
        assert!(read_regular(&sub.join("link")).is_none());
    }
}
