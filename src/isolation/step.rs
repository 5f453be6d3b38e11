//! Errors of the helper's setup steps: each names the step and the path or value
//! involved, so a failure reads as "what failed, on what".

use std::fmt;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    ReadCode,
    JoinCgroup,
    UserNamespace,
    Unshare,
    Fork,
    CreateRoot,
    BindMount,
    MountProc,
    MountTmp,
    PivotRoot,
    Chroot,
    Hostname,
    Network,
    Descriptors,
    OpenInterpreter,
    Rlimits,
    DropPrivileges,
    NoNewPrivs,
    Seccomp,
    Exec,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Step::ReadCode => "reading the snippet",
            Step::JoinCgroup => "joining the run's cgroup",
            Step::UserNamespace => "entering a user namespace (rootless)",
            Step::Unshare => "creating namespaces",
            Step::Fork => "forking the sandboxed process",
            Step::CreateRoot => "building the sandbox root",
            Step::BindMount => "bind-mounting into the sandbox root",
            Step::MountProc => "mounting /proc",
            Step::MountTmp => "mounting the private /tmp",
            Step::PivotRoot => "switching to the sandbox root (pivot_root)",
            Step::Chroot => "switching to the sandbox root (chroot)",
            Step::Hostname => "setting the hostname",
            Step::Network => "joining the run's network namespace",
            Step::Descriptors => "arranging file descriptors",
            Step::OpenInterpreter => "opening the interpreter",
            Step::Rlimits => "setting resource limits",
            Step::DropPrivileges => "switching to the sandbox uid",
            Step::NoNewPrivs => "setting no_new_privs",
            Step::Seccomp => "installing the seccomp filter",
            Step::Exec => "starting the interpreter",
        };
        f.write_str(s)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{step} failed on {what}: {cause}")]
pub struct StepError {
    pub step: Step,
    pub what: String,
    pub cause: String,
}

impl StepError {
    pub fn new(step: Step, what: impl fmt::Display, cause: impl fmt::Display) -> Self {
        Self {
            step,
            what: what.to_string(),
            cause: cause.to_string(),
        }
    }
}

pub fn io_step(s: Step, path: &Path) -> impl FnOnce(std::io::Error) -> StepError + '_ {
    move |e| StepError::new(s, path.display(), e)
}
