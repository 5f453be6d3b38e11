//! System calls by name or number, as an operator's list gives them (`extra_syscalls`),
//! and the calls no such list may open. The seccomp filter (`isolation::seccomp`) takes
//! the fixed list from here, so the configuration refuses what the filter would.

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

/// Why a system call given by an operator cannot be allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyscallError {
    #[error("{0} is not a syscall number; give a name such as mbind or a number such as 237")]
    Negative(i64),
    #[error(
        "{0:?} is not a system call this architecture knows; check the spelling (`man 2 syscalls`)"
    )]
    Unknown(String),
    #[error(
        "{0} cannot be allowed: the sandbox's no-exec, no-process and network rules depend on it; remove it from the list"
    )]
    Fixed(String),
}

/// Whether syscall number `nr` is one of the `FIXED` calls, whose rules no operator list
/// may change.
pub fn is_fixed(nr: i64) -> bool {
    FIXED
        .iter()
        .filter_map(|n| libseccomp::ScmpSyscall::from_name(n).ok())
        .any(|sc| i64::from(i32::from(sc)) == nr)
}

/// A syscall given by name or number, as its number on this architecture.
pub fn resolve(token: &str) -> Result<i64, SyscallError> {
    let token = token.trim();
    let nr = match token.parse::<i64>() {
        Ok(n) if n >= 0 => n,
        Ok(n) => return Err(SyscallError::Negative(n)),
        Err(_) => match libseccomp::ScmpSyscall::from_name(token) {
            Ok(sc) => i64::from(i32::from(sc)),
            Err(_) => return Err(SyscallError::Unknown(token.into())),
        },
    };
    if is_fixed(nr) {
        return Err(SyscallError::Fixed(token.into()));
    }
    Ok(nr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_resolve_to_this_architectures_numbers() {
        let mbind = libseccomp::ScmpSyscall::from_name("mbind").expect("mbind exists");
        assert_eq!(resolve(" mbind "), Ok(i64::from(i32::from(mbind))));
        assert_eq!(resolve("309"), Ok(309));
    }

    #[test]
    fn unknown_negative_and_fixed_calls_are_refused_by_kind() {
        assert_eq!(resolve("-1"), Err(SyscallError::Negative(-1)));
        assert_eq!(
            resolve("nosuchcall"),
            Err(SyscallError::Unknown("nosuchcall".into()))
        );
        for name in FIXED {
            assert_eq!(resolve(name), Err(SyscallError::Fixed(name.to_string())));
        }
        let execve = libseccomp::ScmpSyscall::from_name("execve").expect("execve exists");
        let nr = i64::from(i32::from(execve));
        assert!(is_fixed(nr));
        assert_eq!(
            resolve(&nr.to_string()),
            Err(SyscallError::Fixed(nr.to_string())),
            "a fixed call given by number is refused too"
        );
    }
}
