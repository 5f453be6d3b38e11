//! The seccomp allow-lists, as data: each syscall with the reason it is allowed.
//! Anything not listed fails with EPERM ("operation not permitted"). The rules that
//! depend on arguments (clone, execveat, prlimit64, socket families) are in `apply.rs`.

/// Syscalls every interpreter needs to run code that only computes, reads its own
/// files and writes its output.
pub const COMMON: &[(&str, &str)] = &[
    ("read", "read pipes and files"),
    ("write", "write stdout/stderr and /tmp files"),
    ("readv", "vectored reads"),
    ("writev", "vectored writes"),
    ("pread64", "positioned reads (module loading)"),
    ("pwrite64", "positioned writes in /tmp"),
    ("open", "open files (older libcs)"),
    ("openat", "open files"),
    ("close", "close descriptors"),
    ("close_range", "close descriptors in bulk"),
    ("stat", "stat paths"),
    ("fstat", "stat descriptors"),
    ("lstat", "stat links"),
    ("newfstatat", "stat paths relative to a directory"),
    ("statx", "extended stat"),
    ("statfs", "filesystem info"),
    ("fstatfs", "filesystem info"),
    ("lseek", "seek files"),
    ("access", "check file access"),
    ("faccessat", "check file access"),
    ("faccessat2", "check file access"),
    ("readlink", "resolve links"),
    ("readlinkat", "resolve links"),
    ("getdents64", "list directories"),
    ("getcwd", "current directory"),
    ("chdir", "change directory"),
    ("fchdir", "change directory"),
    ("fcntl", "descriptor flags"),
    ("flock", "file locks in /tmp"),
    ("dup", "duplicate descriptors"),
    ("dup2", "duplicate descriptors"),
    ("dup3", "duplicate descriptors"),
    ("pipe", "in-process pipes"),
    ("pipe2", "in-process pipes"),
    ("ioctl", "terminal queries (isatty) on its own descriptors"),
    ("fsync", "flush /tmp files"),
    ("fdatasync", "flush /tmp files"),
    ("ftruncate", "resize /tmp files"),
    ("truncate", "resize /tmp files"),
    ("fadvise64", "read-ahead hints"),
    ("rename", "rename in /tmp"),
    ("renameat", "rename in /tmp"),
    ("renameat2", "rename in /tmp"),
    ("mkdir", "directories in /tmp"),
    ("mkdirat", "directories in /tmp"),
    ("rmdir", "directories in /tmp"),
    ("unlink", "delete in /tmp"),
    ("unlinkat", "delete in /tmp"),
    ("symlink", "links in /tmp"),
    ("symlinkat", "links in /tmp"),
    ("chmod", "modes of its own /tmp files"),
    ("fchmod", "modes of its own /tmp files"),
    ("fchmodat", "modes of its own /tmp files"),
    ("utimensat", "timestamps of its own /tmp files"),
    ("umask", "file creation mask"),
    ("copy_file_range", "shutil.copy in /tmp"),
    ("sendfile", "shutil.copy in /tmp"),
    ("mmap", "memory allocation and library loading"),
    ("munmap", "memory release"),
    ("mprotect", "library loading, JIT"),
    ("mremap", "realloc of large blocks"),
    ("madvise", "allocator hints"),
    ("mincore", "allocator queries"),
    ("msync", "mapped files"),
    ("brk", "heap"),
    ("rt_sigaction", "signal handlers"),
    ("rt_sigprocmask", "signal masks"),
    ("rt_sigreturn", "return from signal handlers"),
    ("rt_sigtimedwait", "waiting for signals"),
    ("rt_sigpending", "pending signals"),
    ("sigaltstack", "stack overflow handling"),
    (
        "kill",
        "signals to itself (other uids are refused by the kernel)",
    ),
    ("tgkill", "signals to its own threads"),
    ("tkill", "signals to its own threads"),
    ("getpid", "identity"),
    ("gettid", "identity"),
    ("getppid", "identity"),
    ("getuid", "identity"),
    ("geteuid", "identity"),
    ("getgid", "identity"),
    ("getegid", "identity"),
    ("getresuid", "identity"),
    ("getresgid", "identity"),
    ("getgroups", "identity"),
    ("getpgrp", "identity"),
    ("getpgid", "identity"),
    ("getsid", "identity"),
    ("uname", "platform module"),
    ("sysinfo", "memory size queries"),
    ("getrlimit", "resource limits (read only)"),
    ("getrusage", "resource usage"),
    ("times", "process times"),
    ("getpriority", "scheduling priority (read only)"),
    ("sched_getaffinity", "CPU count"),
    ("sched_yield", "threads yielding"),
    ("sched_getparam", "scheduling queries"),
    ("sched_getscheduler", "scheduling queries"),
    ("clock_gettime", "time"),
    ("clock_getres", "time"),
    ("clock_nanosleep", "sleep"),
    ("gettimeofday", "time"),
    ("time", "time"),
    ("nanosleep", "sleep"),
    ("futex", "thread synchronisation"),
    ("set_robust_list", "thread start"),
    ("get_robust_list", "thread start"),
    ("set_tid_address", "thread start"),
    ("rseq", "glibc restartable sequences"),
    ("arch_prctl", "thread-local storage"),
    ("prctl", "thread names and similar per-process settings"),
    ("getrandom", "random numbers, hash seeds"),
    ("select", "waiting on descriptors"),
    ("pselect6", "waiting on descriptors"),
    ("poll", "waiting on descriptors"),
    ("ppoll", "waiting on descriptors"),
    ("exit", "thread exit"),
    ("exit_group", "process exit"),
    ("restart_syscall", "restart after signals"),
    (
        "wait4",
        "waiting for children (there are none; answers ECHILD)",
    ),
    ("membarrier", "runtimes' memory barriers"),
];

/// Extra syscalls V8 and libuv use.
pub const NODEJS: &[(&str, &str)] = &[
    ("epoll_create", "libuv event loop"),
    ("epoll_create1", "libuv event loop"),
    ("epoll_ctl", "libuv event loop"),
    ("epoll_wait", "libuv event loop"),
    ("epoll_pwait", "libuv event loop"),
    ("epoll_pwait2", "libuv event loop"),
    ("eventfd", "libuv wakeups"),
    ("eventfd2", "libuv wakeups"),
    ("timerfd_create", "timers"),
    ("timerfd_settime", "timers"),
    ("timerfd_gettime", "timers"),
    ("pkey_alloc", "V8 memory protection keys"),
    ("pkey_free", "V8 memory protection keys"),
    ("pkey_mprotect", "V8 memory protection keys"),
    ("capget", "libuv checks capabilities at start"),
    ("sched_setaffinity", "worker thread placement"),
    (
        "memfd_create",
        "V8 code space; cannot be executed because RLIMIT_NOFILE keeps it below the exec descriptor",
    ),
    ("statx", "fs.stat"),
];

/// Extra syscalls the Python runtime uses beyond the common set.
pub const PYTHON: &[(&str, &str)] = &[
    ("epoll_create1", "selectors/asyncio"),
    ("epoll_ctl", "selectors/asyncio"),
    ("epoll_wait", "selectors/asyncio"),
    ("epoll_pwait", "selectors/asyncio"),
    ("eventfd2", "asyncio wakeups"),
];

/// Socket syscalls. Every run may use them, on what it may create: `socket()` and
/// `socketpair()` are allowed per address family and type (see apply.rs), and a run
/// without network has only an empty namespace of its own to use them in.
pub const SOCKETS: &[(&str, &str)] = &[
    ("connect", "outbound connections"),
    ("bind", "local ports"),
    ("listen", "servers on loopback"),
    ("accept", "servers on loopback"),
    ("accept4", "servers on loopback"),
    ("getsockname", "socket addresses"),
    ("getpeername", "socket addresses"),
    ("sendto", "send data"),
    ("recvfrom", "receive data"),
    ("sendmsg", "send data"),
    ("recvmsg", "receive data"),
    ("sendmmsg", "DNS lookups"),
    ("recvmmsg", "DNS lookups"),
    ("shutdown", "close connections"),
    ("setsockopt", "socket options"),
    ("getsockopt", "socket options"),
];

/// Syscalls that return ENOSYS rather than EPERM, so libc falls back to an allowed
/// variant: clone3 -> clone (whose flags we can inspect), and the like.
pub const ENOSYS: &[(&str, &str)] = &[
    (
        "clone3",
        "glibc falls back to clone, whose flags the filter can check",
    ),
    (
        "io_uring_setup",
        "io_uring would bypass seccomp; libuv falls back to epoll",
    ),
];

/// System calls whose rules are fixed: `allowed_syscalls` and `extra_syscalls` cannot
/// open them, because the jail depends on them (no exec, no processes, no raising
/// limits, sockets by family, no io_uring around seccomp).
pub const FIXED: &[&str] = &[
    "execve",
    "execveat",
    "fork",
    "vfork",
    "clone",
    "clone3",
    "prlimit64",
    "socket",
    "socketpair",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
];

/// Whether syscall number `nr` is one of the `FIXED` calls, whose rules no operator list
/// may change.
pub fn is_fixed(nr: i64) -> bool {
    FIXED
        .iter()
        .filter_map(|n| libseccomp::ScmpSyscall::from_name(n).ok())
        .any(|sc| i64::from(i32::from(sc)) == nr)
}

/// A syscall given by name or number, as its number on this architecture.
pub fn resolve_token(token: &str) -> Result<i64, String> {
    let token = token.trim();
    let nr = match token.parse::<i64>() {
        Ok(n) if n >= 0 => n,
        Ok(n) => return Err(format!("{n} is not a syscall number")),
        Err(_) => match libseccomp::ScmpSyscall::from_name(token) {
            Ok(sc) => i64::from(i32::from(sc)),
            Err(_) => {
                return Err(format!(
                    "{token:?} is not a system call this architecture knows"
                ));
            }
        },
    };
    if is_fixed(nr) {
        return Err(format!(
            "{token} cannot be allowed: the sandbox's no-exec, no-process and network rules depend on it"
        ));
    }
    Ok(nr)
}
