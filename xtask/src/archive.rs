//! Tar streams in and out of the engine: the source tree, image build
//! contexts and artifacts copied back from a container.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// Top-level entries never sent to the builder: build output, VCS data and
/// local logs are large and irrelevant to compiling.
const SKIP_TOP: &[&str] = &[".git", "target", "dist", "logs", "node_modules", ".idea"];
/// Skipped at any depth (nested crates' own build output, editor litter).
const SKIP_ANY: &[&str] = &["target", ".git", ".DS_Store"];

/// Tars the source tree under `prefix/`, keeping modification times so that
/// cargo's fingerprints in the persistent target volume stay valid between
/// runs (a fixed timestamp would hide edits from cargo).
pub fn source_tar(root: &Path, prefix: &str) -> Result<(Vec<u8>, usize)> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    let mut count = 0;
    let mut stack: Vec<(PathBuf, PathBuf)> = vec![(root.to_path_buf(), PathBuf::from(prefix))];
    while let Some((dir, name)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("cannot list {}", dir.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let file_name = entry.file_name();
            let s = file_name.to_string_lossy();
            let top = dir == root;
            if SKIP_ANY.contains(&s.as_ref()) || (top && SKIP_TOP.contains(&s.as_ref())) {
                continue;
            }
            let path = entry.path();
            let in_tar = name.join(&file_name);
            let kind = entry
                .file_type()
                .with_context(|| format!("cannot stat {}", path.display()))?;
            if kind.is_dir() {
                builder.append_dir(&in_tar, &path).with_context(|| {
                    format!("cannot add {} to the source archive", path.display())
                })?;
                stack.push((path, in_tar));
            } else if kind.is_file() || kind.is_symlink() {
                builder
                    .append_path_with_name(&path, &in_tar)
                    .with_context(|| {
                        format!("cannot add {} to the source archive", path.display())
                    })?;
                count += 1;
            }
        }
    }
    let bytes = builder
        .into_inner()
        .context("cannot finish the source archive")?;
    Ok((bytes, count))
}

/// A file for an image build context.
pub enum ContextFile<'a> {
    /// Copy this file from disk.
    Path(&'a Path),
    /// Use these bytes.
    Bytes(&'a [u8]),
}

/// Builds a build context holding exactly the listed files, so the engine
/// never receives the whole repository (which includes `target/`).
pub fn context_tar<N: AsRef<str>>(files: &[(N, ContextFile<'_>)]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, file) in files {
        let name = name.as_ref();
        match file {
            ContextFile::Path(path) => {
                let mut f = std::fs::File::open(path)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                builder.append_file(name, &mut f).with_context(|| {
                    format!("cannot add {} to the build context", path.display())
                })?;
            }
            ContextFile::Bytes(bytes) => {
                let mut header = tar::Header::new_gnu();
                header.set_size(bytes.len() as u64);
                header.set_mode(0o644);
                header.set_mtime(0);
                header.set_cksum();
                builder
                    .append_data(&mut header, name, *bytes)
                    .with_context(|| format!("cannot add {name} to the build context"))?;
            }
        }
    }
    builder
        .into_inner()
        .context("cannot finish the build context")
}

/// What was written to disk for one artifact.
#[derive(Debug, Clone)]
pub struct Written {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

/// Extracts the single regular file in `tar_bytes` (what the engine returns
/// for `GET /containers/{id}/archive?path=<file>`) to `dest`, executable,
/// replacing any previous file atomically. Returns its size and sha256.
pub fn extract_single_file(tar_bytes: &[u8], dest: &Path) -> Result<Written> {
    let mut archive = tar::Archive::new(tar_bytes);
    let entries = archive
        .entries()
        .context("the engine returned an unreadable archive")?;
    for entry in entries {
        let mut entry = entry.context("the engine returned an unreadable archive")?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let parent = dest
            .parent()
            .with_context(|| format!("{} has no parent directory", dest.display()))?;
        let tmp = parent.join(format!(
            ".{}.partial",
            dest.file_name().unwrap_or_default().to_string_lossy()
        ));
        let mut out = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut size = 0u64;
        loop {
            let n = entry
                .read(&mut buf)
                .context("cannot read the artifact from the engine's archive")?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            size += n as u64;
        }
        out.sync_all()
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        drop(out);
        set_executable(&tmp)?;
        std::fs::rename(&tmp, dest)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), dest.display()))?;
        return Ok(Written {
            path: dest.to_path_buf(),
            size,
            sha256: crate::docker::hex(&hasher.finalize()),
        });
    }
    bail!(
        "the engine's archive for {} holds no regular file",
        dest.display()
    )
}

fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot make {} executable", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_tar_skips_build_output_and_keeps_mtimes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in [
            "src",
            "target/debug",
            "dist/linux-amd64",
            ".git",
            "xtask/target",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("Cargo.toml"), "[package]").unwrap();
        std::fs::write(root.join("src/main.rs"), "fn main() {}").unwrap();
        std::fs::write(root.join("target/debug/big"), "x").unwrap();
        std::fs::write(root.join("dist/linux-amd64/sandbox"), "x").unwrap();
        std::fs::write(root.join(".git/HEAD"), "x").unwrap();
        std::fs::write(root.join("xtask/target/x"), "x").unwrap();
        let mtime = std::fs::metadata(root.join("src/main.rs"))
            .unwrap()
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();

        let (bytes, count) = source_tar(root, "src").unwrap();
        assert_eq!(count, 2);
        let mut names = Vec::new();
        for e in tar::Archive::new(&bytes[..]).entries().unwrap() {
            let e = e.unwrap();
            let name = e.path().unwrap().display().to_string();
            if name == "src/src/main.rs" {
                assert_eq!(e.header().mtime().unwrap(), mtime);
            }
            names.push(name);
        }
        names.sort();
        assert_eq!(
            names,
            ["src/Cargo.toml", "src/src", "src/src/main.rs", "src/xtask"]
        );
    }

    #[test]
    fn extract_reports_size_and_sha256() {
        let ctx = context_tar(&[("sandbox", ContextFile::Bytes(b"hello"))]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("sandbox");
        let w = extract_single_file(&ctx, &dest).unwrap();
        assert_eq!(w.size, 5);
        assert_eq!(
            w.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
    }
}
