//! `POST /v1/sandbox/job`'s request and its answer's lines (see `api::job` for the
//! endpoint): what `sandbox run --server` sends and reads.

use serde::{Deserialize, Serialize};

/// The request: the code with its invocation, as `sandbox run` has them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub language: String,
    pub code: String,
    /// The script's file name: the code is written to /job/<script> and runs under that
    /// name (a run without /job, at the chroot level, runs it under the bare name).
    #[serde(default)]
    pub script: Option<String>,
    /// The name inline code is compiled under (`<string>`, `[eval].mjs`), when there is
    /// no script.
    #[serde(default)]
    pub filename: String,
    /// The snippet's argv, its script's name first.
    #[serde(default)]
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The snippet's whole stdin, base64-encoded.
    #[serde(default)]
    pub stdin: String,
    #[serde(default)]
    pub enable_network: bool,
}

/// One line of the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobEvent {
    /// The run has its stage; `job` names it for `POST /v1/sandbox/job/interrupt`.
    Started(JobStarted),
    /// A chunk of stdout, base64-encoded.
    Stdout(String),
    /// A chunk of stderr, base64-encoded.
    Stderr(String),
    End(JobEnd),
    Failed(JobFailed),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStarted {
    pub job: String,
}

/// The body of `POST /v1/sandbox/job/interrupt`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterruptRequest {
    pub job: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEnd {
    pub exit_code: i32,
    /// As `/v1/sandbox/run` has it, plus a limit the snippet went on past.
    pub error: String,
    pub limit: Option<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFailed {
    pub code: i32,
    pub message: String,
}
