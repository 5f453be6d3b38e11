//! The only module with `unsafe`: thin wrappers over the few syscalls that nix does not
//! expose safely or in the shape the helper needs. Each wrapper names its syscall in
//! the error it returns.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::unistd::ForkResult;

/// The high descriptor the interpreter is opened on, and the only one `execveat` accepts.
/// RLIMIT_NOFILE is set below it, so the sandboxed program can never recreate it.
pub const EXEC_FD: RawFd = 1023;

/// Eight random bytes from the kernel (zero if it has none to give, which only makes the
/// random exec page predictable, not the jail weaker: see `seccomp::programs`).
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n == bytes.len() as isize {
        u64::from_ne_bytes(bytes)
    } else {
        0
    }
}

/// Map one read-only, zero-filled page exactly at `addr`, never over an existing mapping.
fn map_zero_page(addr: u64) -> bool {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping (it fails with
    // EEXIST instead), so no memory in use can change; the new anonymous page is
    // zero-filled, so every byte is the NUL of an empty C string. It is never unmapped
    // before exec.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    p != libc::MAP_FAILED && p as u64 == addr
}

/// fork(2).
///
/// # Safety
/// The calling process must be single-threaded (the `__exec` helper, which runs before
/// any async runtime exists): only then may the child call anything, not only
/// async-signal-safe functions.
pub unsafe fn fork() -> Result<ForkResult, Errno> {
    // SAFETY: the caller guarantees a single-threaded process (see above).
    unsafe { nix::unistd::fork() }
}

/// Descriptors by number, for a jail's child process: it holds every descriptor it keeps
/// as a raw number (each `OwnedFd` it received was turned into one with `into_raw_fd`),
/// never returns to a frame that owns another, and execs or exits when done. So closing
/// or replacing a number here invalidates no owner.
pub mod raw {
    use std::ffi::CString;
    use std::os::fd::RawFd;

    use nix::errno::Errno;

    /// fcntl(F_DUPFD_CLOEXEC): a copy of `fd` at `base` or the lowest free number above.
    pub fn dup_above(fd: RawFd, base: RawFd) -> Result<RawFd, Errno> {
        // SAFETY: F_DUPFD_CLOEXEC only adds a descriptor at a free number.
        Errno::result(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, base) })
    }

    /// dup3(2) of `fd` onto `target`, replacing what was there (see the module's note).
    pub fn dup_to(fd: RawFd, target: RawFd, cloexec: bool) -> Result<(), Errno> {
        let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
        // SAFETY: see the module's note: nobody owns `target` but the jail's table.
        Errno::result(unsafe { libc::dup3(fd, target, flags) }).map(drop)
    }

    /// write(2) to a descriptor held by number.
    pub fn write(fd: RawFd, bytes: &[u8]) -> Result<usize, Errno> {
        // SAFETY: `bytes` is valid for its length; a bad number gives EBADF.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        Errno::result(n).map(|n| n as usize)
    }

    pub fn close(fd: RawFd) {
        // SAFETY: see the module's note; a number already closed gives EBADF, ignored.
        unsafe { libc::close(fd) };
    }

    /// close_range(2) from `first` to `last`, both included.
    pub fn close_range(first: RawFd, last: RawFd) -> Result<(), Errno> {
        // SAFETY: see the module's note.
        let rc = unsafe { libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0u32) };
        Errno::result(rc).map(drop)
    }

    /// mount_setattr(2) on `target` (relative to the cwd), `attr_set` only.
    pub fn mount_setattr(target: &std::path::Path, flags: u32, attr_set: u64) -> Result<(), Errno> {
        use std::os::unix::ffi::OsStrExt;
        let path =
            std::ffi::CString::new(target.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
        // struct mount_attr: attr_set, attr_clr, propagation, userns_fd.
        let attr: [u64; 4] = [attr_set, 0, 0, 0];
        // SAFETY: `path` and `attr` outlive the call; the size passed is `attr`'s.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                path.as_ptr(),
                flags,
                attr.as_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        Errno::result(rc).map(drop)
    }

    /// Whether this kernel has mount_setattr(2) (Linux 5.12).
    pub fn has_mount_setattr() -> bool {
        // SAFETY: a bad descriptor and null arguments: the kernel answers EBADF or EINVAL
        // where the call exists, ENOSYS where not, and touches nothing.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                -1,
                std::ptr::null::<libc::c_char>(),
                0,
                std::ptr::null::<u8>(),
                0,
            )
        };
        !(rc == -1 && Errno::last() == Errno::ENOSYS)
    }

    /// setns(2) by descriptor number.
    pub fn setns(fd: RawFd, nstype: i32) -> Result<(), Errno> {
        // SAFETY: setns reads the descriptor; a bad number gives EBADF.
        Errno::result(unsafe { libc::setns(fd, nstype) }).map(drop)
    }

    /// One read-only, zero-filled page at `address`'s page, never over a mapping.
    pub fn map_page(address: u64) -> Result<(), Errno> {
        if super::map_zero_page(address & !0xfff) {
            Ok(())
        } else {
            Err(Errno::EEXIST)
        }
    }

    /// Load a classic BPF program (`struct sock_filter` entries, 8 bytes each) as this
    /// thread's seccomp filter. no_new_privs must be set (or the caller privileged).
    pub fn load_seccomp(program: &[u8]) -> Result<(), Errno> {
        if program.is_empty()
            || !program.len().is_multiple_of(8)
            || program.len() / 8 > u16::MAX as usize
        {
            return Err(Errno::EINVAL);
        }
        // Copied into properly aligned filter entries: the bytes need not be.
        let filters: Vec<libc::sock_filter> = program
            .chunks_exact(8)
            .map(|c| libc::sock_filter {
                code: u16::from_ne_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        let prog = libc::sock_fprog {
            len: filters.len() as u16,
            filter: filters.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `prog` points at `filters`, alive for the call; the kernel copies the
        // program and checks every instruction before it loads it.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &prog as *const libc::sock_fprog as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        Errno::result(rc).map(drop)
    }

    /// execveat(fd, path, argv, envp, AT_EMPTY_PATH), `path` the page from `map_page`.
    /// Returns only on failure.
    pub fn execveat(fd: RawFd, path_address: u64, argv: &[CString], envp: &[CString]) -> Errno {
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
        envp_ptrs.push(std::ptr::null());
        // SAFETY: argv and envp are NULL-terminated arrays of pointers into CStrings that
        // outlive the call; `path_address` points into a mapped, zero-filled page (an
        // empty C string). The raw syscall keeps the pointer exactly the one the seccomp
        // filter allows.
        unsafe {
            libc::syscall(
                libc::SYS_execveat,
                fd,
                path_address as *const libc::c_char,
                argv_ptrs.as_ptr(),
                envp_ptrs.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
        }
        Errno::last()
    }
}

/// _exit(2) without running destructors or atexit handlers (safe after fork).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no Rust state.
    unsafe { libc::_exit(code) }
}

/// Restore SIGPIPE's default action. The Rust runtime ignores SIGPIPE, and an ignored
/// signal stays ignored across exec; the interpreter should start with the default.
pub fn reset_sigpipe() -> Result<(), Errno> {
    // SAFETY: installing SIG_DFL runs no handler code, so no handler can observe
    // inconsistent state.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    }
    .map(drop)
}

/// Every signal back to its default action and none blocked: what the server was started
/// with (a shell that ignores SIGINT and SIGQUIT for a background job, say) must not reach
/// a run, which inherits dispositions across fork and the ignored ones across exec. The
/// helper and the fork server's launcher call it first.
pub fn reset_signals() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for signal in Signal::iterator() {
        if matches!(signal, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL runs no handler code of ours.
        let _ = unsafe { sigaction(signal, &default) };
    }
    let _ = SigSet::all().thread_unblock();
}

/// pidfd_open(2): a descriptor that becomes readable when `pid` exits (Linux 5.3+).
pub fn pidfd_open(pid: nix::unistd::Pid) -> Result<std::os::fd::OwnedFd, Errno> {
    // SAFETY: the syscall takes a pid and flags and returns a new descriptor or -1.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0u32) };
    let fd = Errno::result(rc)? as RawFd;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// The most descriptors one message may carry; more are closed on arrival.
pub const MAX_PASSED_FDS: usize = 4;

/// Read into `buf` from a Unix socket, with the descriptors passed alongside
/// (SCM_RIGHTS, at most [`MAX_PASSED_FDS`]), in the order they were sent; each is
/// close-on-exec.
pub fn recv_with_fds(
    socket: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<(usize, Vec<OwnedFd>), Errno> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut space = nix::cmsg_space!([RawFd; MAX_PASSED_FDS]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for fd in raw {
                // SAFETY: the kernel just installed `fd` in this process for this
                // message; nothing else knows it. Extra descriptors are closed here.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if fds.len() < MAX_PASSED_FDS {
                    fds.push(owned);
                }
            }
        }
    }
    Ok((msg.bytes, fds))
}

/// Caps glibc's malloc at `arenas` arenas. By default it grows one per thread that
/// allocates, up to 8 per CPU, and keeps what each arena freed: under a 30-minute soak
/// the server grew from 17 to 26 MB with the default and stayed at 15-21 MB with 2. Call
/// it before the server starts its threads. A no-op where the C library is not glibc.
pub fn cap_malloc_arenas(arenas: i32) {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets a tunable of the allocator; M_ARENA_MAX takes any
        // positive count (it cannot fail then) and affects arenas created from now on.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = arenas;
}
