//! The degraded level's root: where mounts are not permitted (an unprivileged
//! container), the language root is copied (hard-linked where possible) into a directory
//! once at start, and runs chroot into it.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, symlink};
use std::path::Path;

use nix::sys::stat::{Mode, SFlag, makedev, mknod};

use super::rootfs::{DEVICES, inside, make_dirs, recreate_symlinks};
use super::spec::RootPlan;

const MARKER: &str = ".sandbox-root";

/// (Re)build `dir` from `plan` unless it already holds this exact plan.
pub fn prepare(dir: &Path, plan: &RootPlan) -> io::Result<()> {
    let stamp = serde_json::to_string(plan).map_err(io::Error::other)?;
    if fs::read_to_string(dir.join(MARKER)).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(());
    }
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    make_dirs(dir).map_err(io::Error::other)?;
    recreate_symlinks(dir, plan, &[]).map_err(io::Error::other)?;
    for src in &plan.binds {
        copy_tree(src, &inside(dir, src))?;
    }
    let tmp = dir.join("tmp");
    fs::create_dir_all(&tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))?;
    fs::create_dir_all(dir.join("dev"))?;
    for &(path, major, minor) in DEVICES {
        let node = inside(dir, Path::new(path));
        if mknod(
            &node,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .is_err()
        {
            tracing::warn!(node = %node.display(), "cannot create a device node (no CAP_MKNOD); runtimes that need it may fail");
        }
    }
    fs::create_dir_all(dir.join("etc"))?;
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/:/nonexistent\n")?;
    fs::write(dir.join(MARKER), stamp)
}

/// Copy `src` to `dst` recursively: hard links where the filesystem allows, symlinks
/// recreated, directories with their modes.
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    if let Some(parent) = dst.parent() {
        make_dirs(parent).map_err(io::Error::other)?;
    }
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(src)?;
        if fs::symlink_metadata(dst).is_err() {
            symlink(target, dst)?;
        }
    } else if ft.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(meta.permissions().mode() & 0o7755)
            .create(dst)?;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            copy_tree(&entry.path(), &dst.join(entry.file_name()))?;
        }
    } else if ft.is_file() && fs::hard_link(src, dst).is_err() {
        fs::copy(src, dst)?;
    }
    Ok(())
}
