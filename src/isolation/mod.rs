//! Everything that jails a run. `sys` is the only module allowed `unsafe`.

pub mod cgroup;
pub mod channel;
pub mod chroot_root;
pub mod detect;
pub mod forward;
pub mod helper;
pub mod init;
pub mod jail;
pub mod net;
pub mod rootfs;
pub mod seccomp;
pub mod snippet;
pub mod spec;
pub mod step;
#[allow(unsafe_code)]
pub mod sys;
pub mod uids;
pub mod userns;
pub mod zygote;
