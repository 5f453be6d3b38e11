//! The system calls behind a jail's steps, for real.

use std::ffi::CString;
use std::os::fd::{IntoRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::resource::Resource;
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::sys::statvfs::{FsFlags, statvfs};
use nix::unistd::{Gid, Uid};

use super::exec::{Kind, Sys};
use crate::isolation::step::StepError;
use crate::isolation::sys::{self, raw};

/// The real system calls.
#[derive(Debug, Default)]
pub struct RealSys;

fn io(e: std::io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO)
}

fn cstrings(items: &[String]) -> Result<Vec<CString>, Errno> {
    items
        .iter()
        .map(|s| CString::new(s.as_bytes()).map_err(|_| Errno::EINVAL))
        .collect()
}

impl Sys for RealSys {
    fn join_cgroup(&mut self, procs: &Path) -> Result<(), Errno> {
        std::fs::write(procs, std::process::id().to_string()).map_err(io)
    }

    fn enter_user_namespace(&mut self, uid: u32, gid: u32) -> Result<(), StepError> {
        crate::isolation::userns::enter(uid, gid)
    }

    fn unshare(&mut self, flags: i32) -> Result<(), Errno> {
        nix::sched::unshare(CloneFlags::from_bits_retain(flags))
    }

    fn setns(&mut self, fd: RawFd, nstype: i32) -> Result<(), Errno> {
        raw::setns(fd, nstype)
    }

    fn set_pdeathsig(&mut self, signal: i32) -> Result<(), Errno> {
        nix::sys::prctl::set_pdeathsig(Signal::try_from(signal)?)
    }

    fn umask(&mut self, mask: u32) {
        nix::sys::stat::umask(Mode::from_bits_truncate(mask));
    }

    fn setsid(&mut self) -> Result<(), Errno> {
        nix::unistd::setsid().map(drop)
    }

    fn sethostname(&mut self, name: &str) -> Result<(), Errno> {
        nix::unistd::sethostname(name)
    }

    fn mount(
        &mut self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: u64,
        data: Option<&str>,
    ) -> Result<(), Errno> {
        nix::mount::mount(
            source,
            target,
            fstype,
            MsFlags::from_bits_retain(flags as libc::c_ulong),
            data,
        )
    }

    fn mount_setattr(&mut self, target: &Path, flags: u32, attr_set: u64) -> Result<(), Errno> {
        raw::mount_setattr(target, flags, attr_set)
    }

    fn locked_flags(&mut self, path: &Path) -> u64 {
        // The kernel's ST_RELATIME (linux/statfs.h); nix names it only for glibc, but musl's
        // statvfs passes the kernel's flags through unchanged.
        const ST_RELATIME: FsFlags = FsFlags::from_bits_retain(0x1000);
        let Ok(st) = statvfs(path) else {
            return 0;
        };
        let f = st.flags();
        [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (ST_RELATIME, MsFlags::MS_RELATIME),
        ]
        .into_iter()
        .filter(|(st, _)| f.contains(*st))
        .fold(0, |acc, (_, ms)| acc | ms.bits())
    }

    fn umount2(&mut self, target: &Path, flags: i32) -> Result<(), Errno> {
        nix::mount::umount2(target, MntFlags::from_bits_retain(flags))
    }

    fn kind(&mut self, path: &Path) -> Kind {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => Kind::Dir,
            Ok(_) => Kind::Other,
            Err(_) => Kind::Missing,
        }
    }

    fn entry_exists(&mut self, path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok()
    }

    fn mkdir_all(&mut self, path: &Path) -> Result<(), Errno> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(path)
            .map_err(io)
    }

    fn create_file(&mut self, path: &Path) -> Result<(), Errno> {
        std::fs::File::create(path).map(drop).map_err(io)
    }

    fn symlink(&mut self, target: &Path, path: &Path) -> Result<(), Errno> {
        std::os::unix::fs::symlink(target, path).map_err(io)
    }

    fn write_file(&mut self, path: &Path, contents: &str) -> Result<(), Errno> {
        std::fs::write(path, contents).map_err(io)
    }

    fn chmod(&mut self, path: &Path, mode: u32) -> Result<(), Errno> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)
    }

    fn chown(&mut self, path: &Path, uid: u32, gid: u32) -> Result<(), Errno> {
        nix::unistd::chown(path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
    }

    fn remove_all(&mut self, path: &Path) {
        let _ = std::fs::remove_dir_all(path);
    }

    fn mkdir(&mut self, path: &Path) -> Result<(), Errno> {
        std::fs::create_dir(path).map_err(io)
    }

    fn chdir(&mut self, path: &Path) -> Result<(), Errno> {
        nix::unistd::chdir(path)
    }

    fn pivot_root_here(&mut self) -> Result<(), Errno> {
        nix::unistd::pivot_root(".", ".")
    }

    fn chroot(&mut self, dir: &Path) -> Result<(), Errno> {
        nix::unistd::chroot(dir)
    }

    fn open_read(&mut self, path: &Path) -> Result<RawFd, Errno> {
        open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).map(IntoRawFd::into_raw_fd)
    }

    fn dup_above(&mut self, fd: RawFd, base: RawFd) -> Result<RawFd, Errno> {
        raw::dup_above(fd, base)
    }

    fn dup_to(&mut self, fd: RawFd, target: RawFd, cloexec: bool) -> Result<(), Errno> {
        raw::dup_to(fd, target, cloexec)
    }

    fn close_range(&mut self, first: RawFd, last: RawFd) -> Result<(), Errno> {
        raw::close_range(first, last)
    }

    fn close(&mut self, fd: RawFd) {
        raw::close(fd)
    }

    fn setrlimit(&mut self, resource: i32, value: u64) -> Result<(), Errno> {
        let resource = RESOURCES
            .iter()
            .find(|r| **r as i32 == resource)
            .ok_or(Errno::EINVAL)?;
        nix::sys::resource::setrlimit(*resource, value, value)
    }

    fn map_page(&mut self, address: u64) -> Result<(), Errno> {
        raw::map_page(address)
    }

    fn clear_groups(&mut self) -> Result<(), Errno> {
        nix::unistd::setgroups(&[])
    }

    fn setresgid(&mut self, gid: u32) -> Result<(), Errno> {
        let gid = Gid::from_raw(gid);
        nix::unistd::setresgid(gid, gid, gid)
    }

    fn setresuid(&mut self, uid: u32) -> Result<(), Errno> {
        let uid = Uid::from_raw(uid);
        nix::unistd::setresuid(uid, uid, uid)
    }

    fn no_new_privs(&mut self) -> Result<(), Errno> {
        nix::sys::prctl::set_no_new_privs()
    }

    fn set_dumpable(&mut self) -> Result<(), Errno> {
        nix::sys::prctl::set_dumpable(true)
    }

    fn fork_init(&mut self, status: RawFd) -> Result<(), Errno> {
        crate::isolation::init::fork_init(status)
    }

    fn seccomp(&mut self, program: &[u8]) -> Result<(), Errno> {
        raw::load_seccomp(program)
    }

    fn reset_sigpipe(&mut self) -> Result<(), Errno> {
        sys::reset_sigpipe()
    }

    fn exec(&mut self, fd: RawFd, path_address: u64, argv: &[String], env: &[String]) -> Errno {
        match (cstrings(argv), cstrings(env)) {
            (Ok(argv), Ok(env)) => raw::execveat(fd, path_address, &argv, &env),
            _ => Errno::EINVAL,
        }
    }

    fn start(&mut self, _env: &[String], error: RawFd) {
        // Only the fork server starts a run in place; this process would go on running
        // Rust, so there is nothing to start.
        raw::close(error)
    }
}

/// The limits a jail sets, by number.
const RESOURCES: [Resource; 6] = [
    Resource::RLIMIT_NOFILE,
    Resource::RLIMIT_NPROC,
    Resource::RLIMIT_FSIZE,
    Resource::RLIMIT_CORE,
    Resource::RLIMIT_CPU,
    Resource::RLIMIT_AS,
];
