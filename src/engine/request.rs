//! What a run asks for and how it can fail: `RunRequest` (the snippet, its invocation,
//! stdin and directories), `RunError`, and `SetupError`, whose kind decides whether a
//! run that never started is tried again.

use std::path::PathBuf;

use super::capture::Sink;
use super::stdin::StdinFeed;
use crate::isolation::cgroup::CgroupError;
use crate::isolation::chroot_root::RootError;
use crate::isolation::uids::UidError;
use crate::protocol::Invocation;
use crate::runtime::Language;

pub struct RunRequest {
    pub language: Language,
    pub code: String,
    pub preload: String,
    pub network: bool,
    pub sink: Option<Sink>,
    /// The snippet's name, argv and environment (`sandbox run`); empty for Dify's runs.
    pub invocation: Invocation,
    /// Where the snippet's stdin comes from; none: end of input at once.
    pub stdin: Option<StdinFeed>,
    /// Host directories bound into the run; a run with any gets a worker of its own.
    pub files: RunFiles,
    /// Answer only once the run's last process is gone, with the status it really ended
    /// with (`sandbox run`, locally or remotely); otherwise a run's announced end answers.
    pub wait_for_exit: bool,
    /// Cancelled: the run is killed and reported as such (`sandbox run` on SIGINT or
    /// SIGTERM, so that nothing of it outlives the command).
    pub cancel: Option<tokio_util::sync::CancellationToken>,
}

/// A run's directories on the host (see `SandboxSpec::job_dir` and `out_dir`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFiles {
    /// Bound read-only at /job, the run's cwd.
    pub job: Option<PathBuf>,
    /// Bound at /tmp/out; made the run's uid's before it starts.
    pub out: Option<PathBuf>,
}

impl RunFiles {
    pub fn is_empty(&self) -> bool {
        self.job.is_none() && self.out.is_none()
    }
}

/// Whether a run whose snippet never ran may run on another worker: not once its stdin
/// was handed out (what the first worker took is gone).
pub(super) fn rerunnable(req: &RunRequest) -> bool {
    req.stdin.as_ref().is_none_or(|f| !f.started())
}

/// Why a language has no interpreter on this server.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    #[error("not configured")]
    NotConfigured,
    /// Its default interpreter was not found or does not run (an interpreter the
    /// operator named must run, or the server does not start).
    #[error(transparent)]
    Discovery(std::sync::Arc<crate::runtime::DiscoveryError>),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0} is not available on this server: {1}")]
    LanguageUnavailable(Language, Unavailable),
    #[error(
        "{language} needs at least {needed} processes and threads to start (its own threads); the limit is {limit}: raise max_processes (MAX_PROCESSES, or --max-processes)"
    )]
    TooFewProcesses {
        language: Language,
        needed: u64,
        limit: u64,
    },
    #[error("network is disabled, please enable it in the configuration")]
    NetworkDisabled,
    #[error("this server cannot give runs a network: {0}")]
    NetworkUnavailable(String),
    #[error(transparent)]
    Uid(#[from] UidError),
    #[error(
        "could not create the run's cgroup: {0}; run `sandbox doctor` to check the cgroup setup"
    )]
    Cgroup(#[from] CgroupError),
    #[error(
        "could not start the sandbox helper: {0}; the server re-executes itself through /proc/self/exe, which must be mounted"
    )]
    Spawn(std::io::Error),
    #[error("the sandbox could not be set up: {0}")]
    Setup(#[from] SetupError),
    #[error("the server is shutting down; retry on another instance")]
    ShuttingDown,
    #[error("the interpreter ended before the snippet reached it")]
    EndedBeforeCode,
    #[error(
        "/job and /tmp/out need a run of its own mount namespace, which this host does not allow (isolation level: chroot); `sandbox doctor` says why"
    )]
    FilesNeedPrivateRoot,
    #[error("cannot give the run its output directory {path}: {source}")]
    OutputDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a run's sandbox could not be set up; the snippet never ran. The kind decides what
/// happens next: a run the fork server could not start is run again in a fresh
/// interpreter (`is_fork_servers`), any other is the answer, saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A step of the jail failed, in the helper or (`forked`) in the fork server's
    /// keeper; `message` names the step and the system's error.
    #[error("{message}; run `sandbox doctor` to see what this host allows")]
    Jail { message: String, forked: bool },
    /// The fork server was not asked, or did not answer.
    #[error(
        "the Python fork server did not fork the run: {0}; if this persists, set python_fork_server: false"
    )]
    ForkServer(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(
        "the run's jail ends in an exec, which the fork server cannot carry out; please report this"
    )]
    NotPlannedForFork,
    #[error("the run's sandbox could not be described to its helper: {0}; please report this")]
    Encode(#[from] serde_json::Error),
    /// The chroot level's copy of the interpreter's files is not there.
    #[error(transparent)]
    Root(#[from] RootError),
    /// A fresh interpreter ended before its snippet reached it.
    #[error(
        "the interpreter exited before it could read the snippet; check that it starts within memory_limit_mb (sandbox doctor)"
    )]
    InterpreterEnded,
}

impl SetupError {
    /// Whether the fork server failed the run, which then may run in a fresh interpreter;
    /// every other kind would fail the same way again.
    pub fn is_fork_servers(&self) -> bool {
        match self {
            Self::Jail { forked, .. } => *forked,
            Self::ForkServer(_) | Self::NotPlannedForFork => true,
            Self::Encode(_) | Self::Root(_) | Self::InterpreterEnded => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_fork_servers_failures_are_run_again() {
        let jail = |forked| SetupError::Jail {
            message: "setgroups: Operation not permitted".into(),
            forked,
        };
        assert!(jail(true).is_fork_servers());
        assert!(
            !jail(false).is_fork_servers(),
            "a helper's step fails again"
        );
        assert!(SetupError::ForkServer("gone".into()).is_fork_servers());
        assert!(SetupError::NotPlannedForFork.is_fork_servers());
        assert!(!SetupError::InterpreterEnded.is_fork_servers());
        let abandoned = RootError::Abandoned("/state/chroot/python3".into());
        assert!(!SetupError::Root(abandoned).is_fork_servers());
    }

    #[test]
    fn each_kind_says_what_to_do() {
        let said = |e: SetupError| RunError::from(e).to_string();
        let jail = said(SetupError::Jail {
            message: "setgroups: Operation not permitted".into(),
            forked: false,
        });
        assert!(
            jail.starts_with("the sandbox could not be set up: setgroups"),
            "{jail}"
        );
        assert!(jail.contains("sandbox doctor"), "{jail}");
        let fork = said(SetupError::ForkServer("not running".into()));
        assert!(fork.contains("python_fork_server: false"), "{fork}");
        let ended = said(SetupError::InterpreterEnded);
        assert!(ended.contains("memory_limit_mb"), "{ended}");
        let root = said(SetupError::Root(RootError::Abandoned("/state/r".into())));
        assert!(
            root.contains("/state/r") && root.contains("restart"),
            "{root}"
        );
    }
}
