//! Carrying out a jail's steps against a system-call layer (`Sys`): the real one in the
//! helper and the fork server's launcher, a recording double in the tests. The mapping
//! from a step to its calls lives here alone, and `runtime/jail.py` mirrors it call for
//! call (checked by replaying both against recorders).

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::path::Path;

use nix::errno::Errno;

use super::{Fd, Keep, Op};
use crate::isolation::step::{Step, StepError};

/// What a path is, as far as the steps care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Missing,
    Dir,
    Other,
}

/// The system calls a jail is made of. Each returns the errno of a failure.
pub trait Sys {
    fn join_cgroup(&mut self, procs: &Path) -> Result<(), Errno>;
    fn enter_user_namespace(&mut self, uid: u32, gid: u32) -> Result<(), StepError>;
    fn unshare(&mut self, flags: i32) -> Result<(), Errno>;
    fn setns(&mut self, fd: RawFd, nstype: i32) -> Result<(), Errno>;
    fn set_pdeathsig(&mut self, signal: i32) -> Result<(), Errno>;
    fn umask(&mut self, mask: u32);
    fn setsid(&mut self) -> Result<(), Errno>;
    fn sethostname(&mut self, name: &str) -> Result<(), Errno>;
    fn mount(
        &mut self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: u64,
        data: Option<&str>,
    ) -> Result<(), Errno>;
    /// mount_setattr(2) with `attr_set` (nothing cleared, propagation kept).
    fn mount_setattr(&mut self, target: &Path, flags: u32, attr_set: u64) -> Result<(), Errno>;
    /// The MS_* restrictions the mount holding `path` has (nosuid, nodev, noexec, atime).
    fn locked_flags(&mut self, path: &Path) -> u64;
    fn umount2(&mut self, target: &Path, flags: i32) -> Result<(), Errno>;
    /// What `path` is, following links.
    fn kind(&mut self, path: &Path) -> Kind;
    /// Whether anything, a dangling link included, is at `path`.
    fn entry_exists(&mut self, path: &Path) -> bool;
    fn mkdir_all(&mut self, path: &Path) -> Result<(), Errno>;
    fn create_file(&mut self, path: &Path) -> Result<(), Errno>;
    fn symlink(&mut self, target: &Path, path: &Path) -> Result<(), Errno>;
    fn write_file(&mut self, path: &Path, contents: &str) -> Result<(), Errno>;
    fn chmod(&mut self, path: &Path, mode: u32) -> Result<(), Errno>;
    fn chown(&mut self, path: &Path, uid: u32, gid: u32) -> Result<(), Errno>;
    fn remove_all(&mut self, path: &Path);
    fn mkdir(&mut self, path: &Path) -> Result<(), Errno>;
    fn chdir(&mut self, path: &Path) -> Result<(), Errno>;
    /// pivot_root(".", ".") in the current directory.
    fn pivot_root_here(&mut self) -> Result<(), Errno>;
    fn chroot(&mut self, dir: &Path) -> Result<(), Errno>;
    fn open_read(&mut self, path: &Path) -> Result<RawFd, Errno>;
    /// F_DUPFD_CLOEXEC: a copy at `base` or above.
    fn dup_above(&mut self, fd: RawFd, base: RawFd) -> Result<RawFd, Errno>;
    /// dup3(2) (dup2 when `cloexec` is false).
    fn dup_to(&mut self, fd: RawFd, target: RawFd, cloexec: bool) -> Result<(), Errno>;
    /// Close every descriptor from `first` to `last`, both included.
    fn close_range(&mut self, first: RawFd, last: RawFd) -> Result<(), Errno>;
    fn close(&mut self, fd: RawFd);
    fn setrlimit(&mut self, resource: i32, value: u64) -> Result<(), Errno>;
    fn map_page(&mut self, address: u64) -> Result<(), Errno>;
    fn clear_groups(&mut self) -> Result<(), Errno>;
    fn setresgid(&mut self, gid: u32) -> Result<(), Errno>;
    fn setresuid(&mut self, uid: u32) -> Result<(), Errno>;
    fn no_new_privs(&mut self) -> Result<(), Errno>;
    fn set_dumpable(&mut self) -> Result<(), Errno>;
    /// fork(2); returns in the child only: the parent closes every descriptor but
    /// `status`, becomes the init (see `Op::Init`) and never returns.
    fn fork_init(&mut self, status: RawFd) -> Result<(), Errno>;
    fn seccomp(&mut self, program: &[u8]) -> Result<(), Errno>;
    fn reset_sigpipe(&mut self) -> Result<(), Errno>;
    /// execveat(2); returns only on failure.
    fn exec(&mut self, fd: RawFd, path_address: u64, argv: &[String], env: &[String]) -> Errno;
    /// The fork server's start: environment replaced, error pipe closed.
    fn start(&mut self, env: &[String], error: RawFd);
}

/// The descriptors a jail starts from, by what they are.
#[derive(Debug, Default, Clone)]
pub struct Descriptors(pub BTreeMap<Fd, RawFd>);

impl Descriptors {
    fn get(&self, fd: Fd, step: Step) -> Result<RawFd, StepError> {
        self.0
            .get(&fd)
            .copied()
            .ok_or_else(|| StepError::new(step, format!("{fd:?}"), "descriptor not received"))
    }
}

/// Carry out `ops` in order. Returns after the last step, unless it was `Exec`, which
/// returns only its failure.
pub fn execute(ops: &[Op], sys: &mut dyn Sys, fds: &mut Descriptors) -> Result<(), StepError> {
    for op in ops {
        one(op, sys, fds)?;
    }
    Ok(())
}

fn at(step: Step, what: impl std::fmt::Display) -> impl FnOnce(Errno) -> StepError {
    move |e| StepError::new(step, what, e.desc())
}

fn parent_dirs(sys: &mut dyn Sys, path: &Path, step: Step) -> Result<(), StepError> {
    if let Some(parent) = path.parent() {
        sys.mkdir_all(parent).map_err(at(step, parent.display()))?;
    }
    Ok(())
}

fn one(op: &Op, sys: &mut dyn Sys, fds: &mut Descriptors) -> Result<(), StepError> {
    match op {
        Op::JoinCgroup { procs } => sys
            .join_cgroup(procs)
            .map_err(at(Step::JoinCgroup, procs.display())),
        Op::EnterUserNamespace { uid, gid } => sys.enter_user_namespace(*uid, *gid),
        Op::Unshare { flags } => sys
            .unshare(*flags)
            .map_err(at(Step::Unshare, format!("flags {flags:#x}"))),
        Op::JoinNetwork { nstype } => {
            let fd = fds.get(Fd::Netns, Step::Network)?;
            sys.setns(fd, *nstype).map_err(at(Step::Network, "setns"))?;
            sys.close(fd);
            fds.0.remove(&Fd::Netns);
            Ok(())
        }
        Op::ParentDeathSignal { signal } => sys
            .set_pdeathsig(*signal)
            .map_err(at(Step::Descriptors, "pdeathsig")),
        Op::Umask { mask } => {
            sys.umask(*mask);
            Ok(())
        }
        Op::NewSession => sys.setsid().map_err(at(Step::Descriptors, "setsid")),
        Op::Hostname { name } => sys.sethostname(name).map_err(at(Step::Hostname, name)),
        Op::Mount {
            source,
            target,
            fstype,
            flags,
            data,
        } => sys
            .mount(
                source.as_deref(),
                target,
                fstype.as_deref(),
                *flags,
                data.as_deref(),
            )
            .map_err(at(mount_step(fstype.as_deref()), target.display())),
        Op::RemountKeepingLocked {
            source,
            target,
            flags,
        } => {
            let locked = sys.locked_flags(source);
            sys.mount(None, target, None, flags | locked, None)
                .map_err(at(Step::BindMount, target.display()))
        }
        Op::ReadOnlyTree {
            target,
            attr_set,
            flags,
        } => sys
            .mount_setattr(target, *flags, *attr_set)
            .map_err(at(Step::BindMount, target.display())),
        Op::IfExists { path, then } => {
            if sys.kind(path) != Kind::Missing {
                execute(then, sys, fds)?;
            }
            Ok(())
        }
        Op::MakeDir { path } => sys
            .mkdir_all(path)
            .map_err(at(Step::CreateRoot, path.display())),
        Op::MakeMountPoint { like, path } => match sys.kind(like) {
            Kind::Missing => Err(StepError::new(
                Step::BindMount,
                like.display(),
                "no such file or directory",
            )),
            Kind::Dir => sys
                .mkdir_all(path)
                .map_err(at(Step::CreateRoot, path.display())),
            Kind::Other => {
                parent_dirs(sys, path, Step::CreateRoot)?;
                sys.create_file(path)
                    .map_err(at(Step::CreateRoot, path.display()))
            }
        },
        Op::Symlink { target, path } => {
            parent_dirs(sys, path, Step::CreateRoot)?;
            if !sys.entry_exists(path) {
                sys.symlink(target, path)
                    .map_err(at(Step::CreateRoot, path.display()))?;
            }
            Ok(())
        }
        Op::WriteFile { path, contents } => {
            parent_dirs(sys, path, Step::CreateRoot)?;
            sys.write_file(path, contents)
                .map_err(at(Step::CreateRoot, path.display()))
        }
        Op::Chmod { path, mode } => sys
            .chmod(path, *mode)
            .map_err(at(Step::CreateRoot, path.display())),
        Op::PivotRoot { new_root, detach } => {
            let pivot = at(Step::PivotRoot, new_root.display());
            sys.chdir(new_root).map_err(pivot)?;
            sys.pivot_root_here()
                .map_err(at(Step::PivotRoot, new_root.display()))?;
            sys.umount2(Path::new("."), *detach)
                .map_err(at(Step::PivotRoot, "the old root"))?;
            sys.chdir(Path::new("/")).map_err(at(Step::PivotRoot, "/"))
        }
        Op::Chroot { dir } => {
            sys.chroot(dir).map_err(at(Step::Chroot, dir.display()))?;
            sys.chdir(Path::new("/")).map_err(at(Step::Chroot, "/"))
        }
        Op::FreshDir {
            path,
            uid,
            gid,
            mode,
        } => {
            let fail = |e: Errno| StepError::new(Step::MountTmp, path.display(), e.desc());
            sys.remove_all(path);
            sys.mkdir(path).map_err(fail)?;
            sys.chown(path, *uid, *gid).map_err(fail)?;
            sys.chmod(path, *mode).map_err(fail)
        }
        Op::OpenProgram { path } => {
            let fd = sys
                .open_read(path)
                .map_err(at(Step::OpenInterpreter, path.display()))?;
            fds.0.insert(Fd::Program, fd);
            Ok(())
        }
        Op::Descriptors { keep, park } => arrange(sys, fds, keep, *park),
        Op::Rlimit {
            resource,
            name,
            value,
        } => sys
            .setrlimit(*resource, *value)
            .map_err(at(Step::Rlimits, name)),
        Op::MapExecPage { address } => sys
            .map_page(*address)
            .map_err(at(Step::Seccomp, "exec path page")),
        Op::ClearGroups => sys
            .clear_groups()
            .map_err(at(Step::DropPrivileges, "setgroups")),
        Op::SetGid { gid } => sys
            .setresgid(*gid)
            .map_err(at(Step::DropPrivileges, format!("gid {gid}"))),
        Op::SetUid { uid } => sys
            .setresuid(*uid)
            .map_err(at(Step::DropPrivileges, format!("uid {uid}"))),
        Op::Chdir { path } => sys
            .chdir(path)
            .map_err(at(Step::Descriptors, path.display())),
        Op::NoNewPrivs => sys.no_new_privs().map_err(at(Step::NoNewPrivs, "prctl")),
        Op::Init => {
            let status = fds.get(Fd::Status, Step::Fork)?;
            sys.fork_init(status)
                .map_err(at(Step::Fork, "the run's init"))?;
            sys.close(status);
            fds.0.remove(&Fd::Status);
            Ok(())
        }
        Op::Dumpable => sys
            .set_dumpable()
            .map_err(at(Step::DropPrivileges, "PR_SET_DUMPABLE")),
        Op::Seccomp { program } => sys.seccomp(program).map_err(at(Step::Seccomp, "filter")),
        Op::Exec {
            argv,
            env,
            path_address,
        } => {
            let program = fds.get(Fd::Program, Step::Exec)?;
            sys.reset_sigpipe()
                .map_err(at(Step::Descriptors, "SIGPIPE"))?;
            let errno = sys.exec(program, *path_address, argv, env);
            let name = argv
                .first()
                .map(String::as_str)
                .unwrap_or("the interpreter");
            Err(StepError::new(Step::Exec, name, errno.desc()))
        }
        Op::Start { env } => {
            let error = fds.get(Fd::Error, Step::Exec)?;
            sys.start(env, error);
            Ok(())
        }
    }
}

fn mount_step(fstype: Option<&str>) -> Step {
    match fstype {
        Some("proc") => Step::MountProc,
        Some("tmpfs") => Step::CreateRoot,
        _ => Step::BindMount,
    }
}

/// Park every kept descriptor at `park` and up, close all others, then move each to its
/// number. Parking first means no kept descriptor is overwritten by another's move.
fn arrange(
    sys: &mut dyn Sys,
    fds: &mut Descriptors,
    keep: &[Keep],
    park: RawFd,
) -> Result<(), StepError> {
    let fail = |what: &str| {
        let what = what.to_string();
        move |e: Errno| StepError::new(Step::Descriptors, what, e.desc())
    };
    let mut parked = Vec::with_capacity(keep.len());
    for k in keep {
        let fd = fds.get(k.fd, Step::Descriptors)?;
        parked.push(sys.dup_above(fd, park).map_err(fail("parking"))?);
    }
    // The table follows the descriptors, so a failure below is still reported.
    fds.0.clear();
    for (k, &p) in keep.iter().zip(&parked) {
        fds.0.insert(k.fd, p);
    }
    // Everything but the parked copies goes: the originals, and whatever else was open.
    let mut sorted = parked.clone();
    sorted.sort_unstable();
    let mut next = 0;
    for &p in &sorted {
        if p > next {
            sys.close_range(next, p - 1).map_err(fail("close_range"))?;
        }
        next = p + 1;
    }
    sys.close_range(next, RawFd::MAX)
        .map_err(fail("close_range"))?;
    for (k, p) in keep.iter().zip(parked) {
        sys.dup_to(p, k.at, k.cloexec).map_err(fail("dup3"))?;
        sys.close(p);
        fds.0.insert(k.fd, k.at);
    }
    Ok(())
}
