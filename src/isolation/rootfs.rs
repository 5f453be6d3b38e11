//! The private root of a run, built inside the run's own mount namespace: a small
//! tmpfs holding read-only binds of the language's files, device nodes, a fresh /proc,
//! a size-limited /tmp; then pivot_root into it and make it read-only.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::statvfs::{FsFlags, statvfs};
use nix::unistd::{chdir, pivot_root};

use super::spec::RootPlan;
use super::step::{Step, StepError, io_step, step};

/// The character devices a runtime needs: (path, major, minor). A private root binds
/// the host's nodes (no mknod needed); the chroot level's copied root creates them.
pub const DEVICES: &[(&str, u64, u64)] = &[
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
];

/// `path` (absolute, host) as it sits under `root`.
pub fn inside(root: &Path, path: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for c in path.components() {
        if let Component::Normal(part) = c {
            out.push(part);
        }
    }
    out
}

pub fn make_dirs(path: &Path) -> Result<(), StepError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(io_step(Step::CreateRoot, path))
}

/// The restrictions `path`'s mount already has. Inside a user namespace they are locked:
/// a remount that dropped one would fail, so the read-only remount keeps them all.
fn mount_restrictions(path: &Path) -> MsFlags {
    let Ok(st) = statvfs(path) else {
        return MsFlags::empty();
    };
    let f = st.flags();
    [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ]
    .into_iter()
    .filter(|(st, _)| f.contains(*st))
    .fold(MsFlags::empty(), |acc, (_, ms)| acc | ms)
}

fn bind_readonly(src: &Path, target: &Path, allow_dev: bool) -> Result<(), StepError> {
    mount(
        Some(src),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(step(Step::BindMount, src))?;
    let mut flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | mount_restrictions(src);
    if !allow_dev {
        flags |= MsFlags::MS_NODEV;
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .map_err(step(Step::BindMount, target))
}

/// The plan's symbolic links, recreated under `root` with their parent directories;
/// those at a path in `except` are left out.
pub fn recreate_symlinks(root: &Path, plan: &RootPlan, except: &[&Path]) -> Result<(), StepError> {
    for (link, target) in plan
        .symlinks
        .iter()
        .filter(|(l, _)| !except.contains(&l.as_path()))
    {
        let at = inside(root, link);
        if let Some(parent) = at.parent() {
            make_dirs(parent)?;
        }
        if fs::symlink_metadata(&at).is_err() {
            symlink(target, &at).map_err(io_step(Step::CreateRoot, &at))?;
        }
    }
    Ok(())
}

/// Create the mount point for `src` under `root`: a directory, or an empty file.
fn mount_point(root: &Path, src: &Path) -> Result<PathBuf, StepError> {
    let target = inside(root, src);
    let meta = fs::metadata(src).map_err(io_step(Step::BindMount, src))?;
    if meta.is_dir() {
        make_dirs(&target)?;
    } else {
        if let Some(parent) = target.parent() {
            make_dirs(parent)?;
        }
        fs::File::create(&target).map_err(io_step(Step::CreateRoot, &target))?;
    }
    Ok(target)
}

/// Files of /proc that tell a run about the host, not about itself: the kernel's
/// command line (secrets and infrastructure flags live there), memory, keys, timers,
/// scheduler and interrupt state. Shown empty. (The masked paths of container runtimes,
/// and a few more.)
pub const MASKED_PROC_FILES: &[&str] = &[
    "cmdline",
    "kcore",
    "keys",
    "key-users",
    "kallsyms",
    "modules",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "latency_stats",
    "interrupts",
    "softirqs",
    "sysrq-trigger",
];

/// Directories of /proc about the host's hardware and drivers: shown empty.
pub const MASKED_PROC_DIRS: &[&str] = &["acpi", "asound", "scsi", "bus", "irq", "driver", "fs"];

/// Cover the masked paths of the run's fresh /proc: /dev/null over files, an empty
/// read-only tmpfs over directories. Paths this kernel lacks are skipped.
fn mask_proc(root_dir: &Path, proc_dir: &Path) -> Result<(), StepError> {
    let null = inside(root_dir, Path::new("/dev/null"));
    for name in MASKED_PROC_FILES {
        let target = proc_dir.join(name);
        if target.exists() {
            mount(
                Some(&null),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(step(Step::MountProc, &target))?;
        }
    }
    for name in MASKED_PROC_DIRS {
        let target = proc_dir.join(name);
        if target.is_dir() {
            mount(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=0"),
            )
            .map_err(step(Step::MountProc, &target))?;
        }
    }
    Ok(())
}

/// What a root gets beyond the language's files: empty directories, host directories
/// bound writable (a fork server's view of the cgroup tree, a run's `/tmp/out`) and
/// read-only (a run's `/job`).
#[derive(Debug, Default)]
pub struct Extras<'a> {
    pub dirs: &'a [PathBuf],
    /// (host directory, place in the root).
    pub writable: &'a [(PathBuf, PathBuf)],
    /// (host directory, place in the root).
    pub readonly: &'a [(PathBuf, PathBuf)],
}

/// Build the root on `root_dir` and pivot into it. Runs in the child, after
/// unshare(CLONE_NEWNS | CLONE_NEWPID ...) and fork, as root (or, rootless, with every
/// capability of its own user namespace).
pub fn enter_private_root(
    root_dir: &Path,
    plan: &RootPlan,
    tmp_bytes: u64,
    files: &[(PathBuf, String)],
    extras: &Extras<'_>,
) -> Result<(), StepError> {
    // Nothing we mount may propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step(Step::PrivateMounts, Path::new("/")))?;
    mount(
        Some("tmpfs"),
        root_dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=4m,mode=0755"),
    )
    .map_err(step(Step::CreateRoot, root_dir))?;

    // The private /tmp first: anything the plan binds below /tmp (an interpreter or a
    // state directory living there) is then mounted on top of it and stays visible.
    let tmp = inside(root_dir, Path::new("/tmp"));
    make_dirs(&tmp)?;
    mount(
        Some("tmpfs"),
        &tmp,
        Some("tmpfs"),
        // noexec: a library the snippet writes cannot be mapped executable.
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(format!("size={tmp_bytes},mode=1777,nr_inodes=16384").as_str()),
    )
    .map_err(step(Step::MountTmp, &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))
        .map_err(io_step(Step::MountTmp, &tmp))?;

    // The generated files take the place of whatever the plan has at their paths.
    let generated: Vec<&Path> = files.iter().map(|(p, _)| p.as_path()).collect();
    recreate_symlinks(root_dir, plan, &generated)?;
    let mut binds: Vec<&PathBuf> = plan
        .binds
        .iter()
        .filter(|b| !generated.contains(&b.as_path()))
        .collect();
    binds.sort();
    for src in binds {
        let target = mount_point(root_dir, src)?;
        bind_readonly(src, &target, false)?;
    }
    for (dev, _, _) in DEVICES {
        let dev = Path::new(dev);
        if dev.exists() {
            let target = mount_point(root_dir, dev)?;
            bind_readonly(dev, &target, true)?;
        }
    }

    for dir in extras.dirs {
        make_dirs(&inside(root_dir, dir))?;
    }
    for (src, at) in extras.writable {
        let target = inside(root_dir, at);
        make_dirs(&target)?;
        mount(
            Some(src.as_path()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(step(Step::BindMount, src))?;
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC
                | mount_restrictions(src),
            None::<&str>,
        )
        .map_err(step(Step::BindMount, &target))?;
    }
    for (src, at) in extras.readonly {
        let target = inside(root_dir, at);
        make_dirs(&target)?;
        bind_readonly(src, &target, false)?;
    }

    for (path, text) in files {
        // A directory bound over the file's place is read-only: it keeps the host's.
        if plan.binds.iter().any(|b| path.starts_with(b) && b != path) {
            continue;
        }
        let at = inside(root_dir, path);
        if let Some(parent) = at.parent() {
            make_dirs(parent)?;
        }
        fs::write(&at, text).map_err(io_step(Step::CreateRoot, &at))?;
    }

    let proc_dir = inside(root_dir, Path::new("/proc"));
    make_dirs(&proc_dir)?;
    // A fresh proc for the new pid namespace: it lists only this run's processes.
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(step(Step::MountProc, &proc_dir))?;
    mask_proc(root_dir, &proc_dir)?;

    // pivot_root(".", ".") stacks the old root on top of the new one; detaching it
    // leaves only the new root visible.
    chdir(root_dir).map_err(step(Step::PivotRoot, root_dir))?;
    pivot_root(".", ".").map_err(step(Step::PivotRoot, root_dir))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step(Step::PivotRoot, Path::new("/")))?;
    chdir("/").map_err(step(Step::PivotRoot, Path::new("/")))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(step(Step::PivotRoot, Path::new("/")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_maps_absolute_paths_under_the_root() {
        assert_eq!(
            inside(Path::new("/r"), Path::new("/usr/lib/x")),
            PathBuf::from("/r/usr/lib/x")
        );
        assert_eq!(inside(Path::new("/r"), Path::new("/")), PathBuf::from("/r"));
    }
}
