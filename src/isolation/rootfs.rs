//! The private root of a run, built inside the run's own mount namespace: a small
//! tmpfs holding read-only binds of the language's files, device nodes, a fresh /proc,
//! a size-limited /tmp; then pivot_root into it and make it read-only.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, symlink};
use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;

use super::jail::Op;
use super::spec::RootPlan;
use super::step::{Step, StepError, io_step};

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

/// How a private root is built.
#[derive(Debug)]
pub struct RootSteps<'a> {
    /// The empty host directory the root's tmpfs is mounted on.
    pub root_dir: &'a Path,
    pub plan: &'a RootPlan,
    pub tmp_bytes: u64,
    /// Files written into the root, over what the plan has at their paths.
    pub files: &'a [(PathBuf, String)],
    pub extras: Extras<'a>,
    /// Inside a user namespace the kernel locks a mount's restrictions: remounts keep them.
    pub keep_locked: bool,
    /// The kernel can make a whole tree of mounts read-only (mount_setattr, Linux 5.12):
    /// binds then take the mounts beneath their source along, each made read-only too.
    /// Without it they take the top mount only (what is mounted beneath is not seen):
    /// a remount reaches one mount, and one beneath left as it was could be written.
    pub readonly_beneath: bool,
}

fn bits(flags: MsFlags) -> u64 {
    flags.bits()
}

fn mount_op(
    source: Option<&Path>,
    target: PathBuf,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<String>,
) -> Op {
    Op::Mount {
        source: source.map(Path::to_path_buf),
        target,
        fstype: fstype.map(str::to_string),
        flags: bits(flags),
        data,
    }
}

/// A bind of `src` at `target`, then its remount with `flags`; read-only binds take
/// the mounts beneath `src` along only where each of them can be made read-only too
/// (see `RootSteps::readonly_beneath`).
fn bind(ops: &mut Vec<Op>, src: &Path, target: PathBuf, flags: MsFlags, r: &RootSteps<'_>) {
    let beneath = flags.contains(MsFlags::MS_RDONLY) && r.readonly_beneath;
    let first = if beneath {
        MsFlags::MS_BIND | MsFlags::MS_REC
    } else {
        MsFlags::MS_BIND
    };
    ops.push(mount_op(Some(src), target.clone(), None, first, None));
    let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags;
    ops.push(if r.keep_locked {
        Op::RemountKeepingLocked {
            source: src.to_path_buf(),
            target: target.clone(),
            flags: bits(remount),
        }
    } else {
        mount_op(None, target.clone(), None, remount, None)
    });
    if beneath {
        // <linux/mount.h>, <linux/fcntl.h>
        const MOUNT_ATTR_RDONLY: u64 = 0x1;
        const MOUNT_ATTR_NOSUID: u64 = 0x2;
        const MOUNT_ATTR_NODEV: u64 = 0x4;
        const AT_RECURSIVE: u32 = 0x8000;
        let mut attr = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID;
        if flags.contains(MsFlags::MS_NODEV) {
            attr |= MOUNT_ATTR_NODEV;
        }
        ops.push(Op::ReadOnlyTree {
            target,
            attr_set: attr,
            flags: AT_RECURSIVE,
        });
    }
}

const READ_ONLY: MsFlags = MsFlags::MS_RDONLY.union(MsFlags::MS_NOSUID);

/// The steps that build a private root on `root_dir` and pivot into it. Carried out in
/// the run's own mount namespace, as root (or, rootless, with every capability of its
/// own user namespace).
pub fn private_root(r: &RootSteps<'_>) -> Vec<Op> {
    let root_dir = r.root_dir;
    let mut ops = vec![
        // Nothing we mount may propagate back to the host.
        mount_op(
            None,
            PathBuf::from("/"),
            None,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None,
        ),
        mount_op(
            Some(Path::new("tmpfs")),
            root_dir.to_path_buf(),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("size=4m,mode=0755".into()),
        ),
    ];
    // The private /tmp first: anything the plan binds below /tmp (an interpreter or a
    // state directory living there) is then mounted on top of it and stays visible.
    let tmp = inside(root_dir, Path::new("/tmp"));
    ops.push(Op::MakeDir { path: tmp.clone() });
    ops.push(mount_op(
        Some(Path::new("tmpfs")),
        tmp.clone(),
        Some("tmpfs"),
        // noexec: a library the snippet writes cannot be mapped executable.
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(format!("size={},mode=1777,nr_inodes=16384", r.tmp_bytes)),
    ));
    ops.push(Op::Chmod {
        path: tmp,
        mode: 0o1777,
    });

    // The generated files take the place of whatever the plan has at their paths.
    let generated: Vec<&Path> = r.files.iter().map(|(p, _)| p.as_path()).collect();
    for (link, target) in r
        .plan
        .symlinks
        .iter()
        .filter(|(l, _)| !generated.contains(&l.as_path()))
    {
        ops.push(Op::Symlink {
            target: target.clone(),
            path: inside(root_dir, link),
        });
    }
    let mut binds: Vec<&PathBuf> = r
        .plan
        .binds
        .iter()
        .filter(|b| !generated.contains(&b.as_path()))
        .collect();
    binds.sort();
    for src in binds {
        let target = inside(root_dir, src);
        ops.push(Op::MakeMountPoint {
            like: src.clone(),
            path: target.clone(),
        });
        bind(&mut ops, src, target, READ_ONLY | MsFlags::MS_NODEV, r);
    }
    for (dev, _, _) in DEVICES {
        let dev = Path::new(dev);
        let target = inside(root_dir, dev);
        let mut then = vec![Op::MakeMountPoint {
            like: dev.to_path_buf(),
            path: target.clone(),
        }];
        bind(&mut then, dev, target, READ_ONLY, r);
        ops.push(Op::IfExists {
            path: dev.to_path_buf(),
            then,
        });
    }

    for dir in r.extras.dirs {
        ops.push(Op::MakeDir {
            path: inside(root_dir, dir),
        });
    }
    for (src, at) in r.extras.writable {
        let target = inside(root_dir, at);
        ops.push(Op::MakeDir {
            path: target.clone(),
        });
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        bind(&mut ops, src, target, flags, r);
    }
    for (src, at) in r.extras.readonly {
        let target = inside(root_dir, at);
        ops.push(Op::MakeDir {
            path: target.clone(),
        });
        bind(&mut ops, src, target, READ_ONLY | MsFlags::MS_NODEV, r);
    }

    for (path, text) in r.files {
        // A directory bound over the file's place is read-only: it keeps the host's.
        if r.plan
            .binds
            .iter()
            .any(|b| path.starts_with(b) && b != path)
        {
            continue;
        }
        ops.push(Op::WriteFile {
            path: inside(root_dir, path),
            contents: text.clone(),
        });
    }

    let proc_dir = inside(root_dir, Path::new("/proc"));
    ops.push(Op::MakeDir {
        path: proc_dir.clone(),
    });
    // A fresh proc for the new pid namespace: it lists only this run's processes.
    ops.push(mount_op(
        Some(Path::new("proc")),
        proc_dir.clone(),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
        None,
    ));
    // The masked paths of the fresh /proc: /dev/null over files, an empty read-only
    // tmpfs over directories. Paths this kernel lacks are skipped.
    let null = inside(root_dir, Path::new("/dev/null"));
    for name in MASKED_PROC_FILES {
        let target = proc_dir.join(name);
        ops.push(Op::IfExists {
            path: target.clone(),
            then: vec![mount_op(Some(&null), target, None, MsFlags::MS_BIND, None)],
        });
    }
    for name in MASKED_PROC_DIRS {
        let target = proc_dir.join(name);
        ops.push(Op::IfExists {
            path: target.clone(),
            then: vec![mount_op(
                Some(Path::new("tmpfs")),
                target,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=0".into()),
            )],
        });
    }

    // pivot_root(".", ".") stacks the old root on top of the new one; detaching it
    // leaves only the new root visible.
    ops.push(Op::PivotRoot {
        new_root: root_dir.to_path_buf(),
        detach: libc::MNT_DETACH,
    });
    ops.push(mount_op(
        None,
        PathBuf::from("/"),
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None,
    ));
    ops
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
