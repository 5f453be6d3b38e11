//! Entering a user namespace without root (the rootless level): the caller's own uid and
//! gid become the run's, and no other id exists inside.

use nix::sched::{CloneFlags, unshare};
use nix::unistd::{getgid, getuid};

use super::step::{Step, StepError};

/// unshare(CLONE_NEWUSER) and map `inner_uid`/`inner_gid` to the caller's own ids.
/// Afterwards this process holds every capability inside the new namespace (enough to
/// build the run's mounts) and none outside it; they are gone at exec, since the mapped
/// uid is not 0. The process must be single-threaded.
pub fn enter(inner_uid: u32, inner_gid: u32) -> Result<(), StepError> {
    // Read before the unshare: inside, until the maps are written, they are unmapped.
    let (outer_uid, outer_gid) = (getuid(), getgid());
    unshare(CloneFlags::CLONE_NEWUSER)
        .map_err(|e| StepError::new(Step::UserNamespace, "unshare(CLONE_NEWUSER)", e.desc()))?;
    // An unprivileged process may map only its own ids, and its gid only once
    // setgroups(2) is disabled for good in the namespace.
    for (file, text) in [
        ("/proc/self/setgroups", "deny".to_string()),
        ("/proc/self/uid_map", format!("{inner_uid} {outer_uid} 1")),
        ("/proc/self/gid_map", format!("{inner_gid} {outer_gid} 1")),
    ] {
        std::fs::write(file, &text)
            .map_err(|e| StepError::new(Step::UserNamespace, format!("{file} <- {text}"), e))?;
    }
    Ok(())
}
