//! `sandbox run --server URL`: the same snippet on a remote `sandbox serve`, through
//! the Dify protocol, reported like a local run. Its argv, environment and stdin travel
//! inside the code (see `prelude`).

use std::io::Read;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::report::{Outcome, stdin_cut_note};
use super::{prelude, usage};
use crate::api::envelope::{Envelope, RunData};
use crate::engine::LimitHit;
use crate::engine::stdin::copy_bounded;
use crate::isolation::snippet::Invocation;
use crate::runtime::Language;

/// How long to wait for a remote server's answer (it may queue the run first).
const REMOTE_TIMEOUT: Duration = Duration::from_secs(600);

/// The body of `POST /v1/sandbox/run`, as Dify sends it.
#[derive(Serialize)]
struct RemoteRequest<'a> {
    language: &'a str,
    code: &'a str,
    preload: &'a str,
    enable_network: bool,
    /// This server's own field: the answer waits for the run's last process and gives
    /// the status it really ended with.
    wait_for_exit: bool,
}

/// Errors talking to a remote server; all mean the sandbox could not run the snippet.
#[derive(Debug, thiserror::Error)]
enum RemoteError {
    #[error(
        "cannot reach the sandbox server at {url}: {reason}. Check --server and that `sandbox serve` runs there"
    )]
    Unreachable { url: String, reason: String },
    #[error(
        "the sandbox server at {url} refused the API key (HTTP 401): pass --key or set API_KEY to its app.key"
    )]
    Unauthorized { url: String },
    #[error("the sandbox server at {url} is busy (HTTP 503, max_requests reached): retry later")]
    Busy { url: String },
    #[error("the sandbox server at {url} could not run the snippet: {message}")]
    Failed { url: String, message: String },
    #[error("{url} did not answer like a sandbox server (HTTP {status}: {body}). Check --server")]
    NotASandbox {
        url: String,
        status: u16,
        body: String,
    },
}

pub(super) fn server_base(server: &str) -> anyhow::Result<String> {
    let server = server.trim().trim_end_matches('/');
    if server.is_empty() {
        return Err(usage("--server needs a URL such as http://host:8194"));
    }
    if server.starts_with("https://") {
        return Err(usage(format!(
            "--server {server}: https is not supported by this client; reach the server over http (a private network or an SSH tunnel)"
        )));
    }
    if server.starts_with("http://") {
        Ok(server.to_string())
    } else if server.contains("://") {
        Err(usage(format!(
            "--server {server}: only http:// URLs are supported"
        )))
    } else {
        Ok(format!("http://{server}"))
    }
}

/// What `run` checked, for a remote run.
pub(super) struct RemoteRun<'a> {
    pub server: &'a str,
    pub key: &'a str,
    pub language: Language,
    pub code: String,
    pub how: Invocation,
    pub stdin: Option<Box<dyn Read + Send>>,
    pub max_input_mb: u64,
    pub network: bool,
    pub as_json: bool,
}

/// The whole stdin, read before the request (it travels inside it), up to the limit.
fn read_stdin(source: Option<Box<dyn Read + Send>>, limit_mb: u64) -> (Vec<u8>, bool) {
    let Some(source) = source else {
        return (Vec::new(), false);
    };
    let mut data = Vec::new();
    let (_, cut) = copy_bounded(source, &mut data, limit_mb << 20);
    (data, cut)
}

pub(super) fn run_remote(run: RemoteRun<'_>) -> anyhow::Result<ExitCode> {
    let RemoteRun {
        server,
        key,
        language,
        code,
        how,
        stdin,
        max_input_mb,
        network,
        as_json,
    } = run;
    let base = server_base(server)?;
    let (input, cut) = read_stdin(stdin, max_input_mb);
    let code = prelude::launcher(language, &code, &how, &input);
    drop(input);
    let url = format!("{base}/v1/sandbox/run");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(REMOTE_TIMEOUT)
        .build()
        .context("cannot set up the HTTP client")?;
    let started = Instant::now();
    let body = RemoteRequest {
        language: language.as_str(),
        code: &code,
        preload: "",
        enable_network: network,
        wait_for_exit: true,
    };
    let (status, text) = rt
        .block_on(async {
            let r = client
                .post(&url)
                .header("X-Api-Key", key)
                .json(&body)
                .send()
                .await?;
            let status = r.status().as_u16();
            Ok::<_, reqwest::Error>((status, r.text().await?))
        })
        .map_err(|e| RemoteError::Unreachable {
            url: base.clone(),
            reason: error_chain(&e),
        })?;
    let duration = started.elapsed();
    match status {
        401 => return Err(RemoteError::Unauthorized { url: base }.into()),
        503 => return Err(RemoteError::Busy { url: base }.into()),
        413 => {
            return Err(usage(format!(
                "the sandbox server at {base} refused the snippet as too large (HTTP 413): the code and its stdin travel together, base64-encoded, within the server's 16 MiB"
            )));
        }
        _ => {}
    }
    let not_a_sandbox = || RemoteError::NotASandbox {
        url: base.clone(),
        status,
        body: text.chars().take(200).collect(),
    };
    let envelope: Envelope<RunData> = serde_json::from_str(&text).map_err(|_| not_a_sandbox())?;
    match envelope.code {
        0 => {}
        // The server judged the request itself wrong: unsupported language, network off.
        -400 => {
            return Err(usage(format!(
                "the sandbox server at {base} refused the request: {}",
                envelope.message
            )));
        }
        _ => {
            return Err(RemoteError::Failed {
                url: base,
                message: envelope.message,
            }
            .into());
        }
    }
    let data = envelope.data.ok_or_else(not_a_sandbox)?;
    let result = Outcome {
        limit: LimitHit::recognise(data.exit_code, &data.error),
        stdout: data.stdout,
        stderr: data.stderr,
        error: data.error,
        exit_code: data.exit_code,
        duration,
        files: Vec::new(),
        refused: Vec::new(),
        notes: cut
            .then(|| stdin_cut_note(max_input_mb))
            .into_iter()
            .collect(),
    };
    Ok(result.finish(as_json, false))
}

/// reqwest's top-level message is generic ("error sending request"); the cause is below.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_are_normalised() {
        assert_eq!(
            server_base("http://h:8194/").unwrap(),
            "http://h:8194".to_string()
        );
        assert_eq!(server_base("h:8194").unwrap(), "http://h:8194".to_string());
        assert!(server_base("https://h").is_err());
        assert!(server_base("ftp://h").is_err());
        assert!(server_base(" ").is_err());
    }
}
