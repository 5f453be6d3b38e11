//! What a run asks for and how it can fail: `RunRequest` (the snippet, its invocation,
//! stdin and directories) and `RunError`.

use std::path::PathBuf;

use super::Sink;
use super::stdin::StdinFeed;
use crate::isolation::cgroup::CgroupError;
use crate::isolation::snippet::Invocation;
use crate::isolation::uids::UidError;
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

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0} is not available on this server: {1}")]
    LanguageUnavailable(Language, String),
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
    #[error(
        "the sandbox could not be set up: {0}; run `sandbox doctor` to see what this host allows"
    )]
    Setup(String),
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
