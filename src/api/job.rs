//! `POST /v1/sandbox/job`: this server's own endpoint for `sandbox run --server`, which
//! Dify never calls (its `/v1/sandbox/run` is untouched). A run here is the run
//! `sandbox run` makes locally: its script written to /job (its cwd, so tracebacks show
//! source lines), `SANDBOX_OUT` at /tmp/out, its argv, environment and stdin given as
//! such, and its output streamed as it is produced.
//!
//! The answer, once the request is admitted and parsed, is HTTP 200 with one JSON object
//! a line (`application/x-ndjson`), sent as they happen: `{"stdout": B64}` and
//! `{"stderr": B64}` for each chunk of output (base64: a chunk may end inside a UTF-8
//! character), then one `{"end": {...}}` with the status, or one `{"failed": {...}}`
//! when the sandbox could not run it (`code` -400: the request was wrong; -500: the
//! server failed). A run with /job is announced first, `{"started": {"job": NAME}}`:
//! `POST /v1/sandbox/job/interrupt` with `{"job": NAME}` sends its snippet SIGINT. Refusals before that (key, too many requests, a malformed body) are
//! the envelopes `/v1/sandbox/run` answers. A client that goes away stops the run.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ApiError, AppState, request};
use crate::engine::{LimitHit, RunError, RunRequest, Sink, StdinFeed, Stream};
use crate::job::stage::{Stage, StageError, Stager};
use crate::protocol::job::{InterruptRequest, JobEnd, JobEvent, JobFailed, JobRequest, JobStarted};
use crate::protocol::{Invocation, check_variable};
use crate::runtime::Language;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn line(event: &JobEvent) -> Bytes {
    // An enum of strings and numbers always serialises.
    let mut text = serde_json::to_vec(event).unwrap_or_default();
    text.push(b'\n');
    Bytes::from(text)
}

/// Counts a request in flight for as long as its answer streams.
struct Admitted(Arc<AppState>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the request asks for, checked.
struct Checked {
    language: Language,
    code: String,
    script: Option<String>,
    invocation: Invocation,
    stdin: Vec<u8>,
    network: bool,
}

fn check(req: JobRequest) -> Result<Checked, ApiError> {
    let Some(language) = Language::parse(&req.language).filter(|l| l.as_str() == req.language)
    else {
        return Err(ApiError::unsupported_language());
    };
    if req.code.is_empty() {
        return Err(ApiError::bad_request(
            "missing field `code`: it is required",
        ));
    }
    for (name, value) in &req.env {
        check_variable(name, value)
            .map_err(|e| ApiError::bad_request(format!("field `env`: {e}")))?;
    }
    if req.argv.iter().any(|a| a.contains('\0')) || req.filename.contains('\0') {
        return Err(ApiError::bad_request(
            "fields `argv` and `filename` must not hold NUL characters",
        ));
    }
    let stdin = base64::engine::general_purpose::STANDARD
        .decode(req.stdin.as_bytes())
        .map_err(|e| ApiError::bad_request(format!("field `stdin` is not base64: {e}")))?;
    Ok(Checked {
        language,
        code: req.code,
        script: req.script,
        invocation: Invocation {
            filename: req.filename,
            argv: req.argv,
            env: req.env,
        },
        stdin,
        network: req.enable_network,
    })
}

pub async fn job(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let before = state.in_flight.fetch_add(1, Ordering::AcqRel);
    let admitted = Admitted(state.clone());
    if before >= state.engine.config.max_requests {
        state.metrics.count("unknown", "rejected");
        return Err(ApiError::too_many());
    }
    let body = request::read_body(&headers, body).await?;
    let req: JobRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("the request body is not a job request: {e}"))
    })?;
    let job = check(req)?;
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let cancel = CancellationToken::new();
    // The answer's body holds this: a client that goes away drops it, which stops the run.
    let stop_on_drop = cancel.clone().drop_guard();
    let id = state.request_ids.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(run_job(state.clone(), id, job, tx, cancel));
    let stream = futures::stream::unfold(
        (rx, stop_on_drop, admitted),
        |(mut rx, guard, admitted)| async move {
            let chunk = rx.recv().await?;
            Some((
                Ok::<_, std::convert::Infallible>(chunk),
                (rx, guard, admitted),
            ))
        },
    );
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn run_job(
    state: Arc<AppState>,
    id: u64,
    job: Checked,
    tx: mpsc::UnboundedSender<Bytes>,
    cancel: CancellationToken,
) {
    let language = job.language;
    let started = Instant::now();
    let result = execute(&state, job, &tx, cancel).await;
    let (event, outcome) = match result {
        Ok((end, outcome)) => (JobEvent::End(end), outcome),
        Err(failed) => {
            let outcome = if failed.code == -400 {
                "invalid"
            } else {
                "internal"
            };
            (JobEvent::Failed(failed), outcome)
        }
    };
    state.metrics.count(language.as_str(), outcome);
    tracing::info!(
        request_id = id,
        language = language.as_str(),
        duration_ms = started.elapsed().as_millis() as u64,
        outcome,
        "job finished"
    );
    let _ = tx.send(line(&event));
}

async fn execute(
    state: &AppState,
    job: Checked,
    tx: &mpsc::UnboundedSender<Bytes>,
    cancel: CancellationToken,
) -> Result<(JobEnd, &'static str), JobFailed> {
    let engine = &state.engine;
    let failed = |code: i32, message: String| JobFailed { code, message };
    // /job and /tmp/out need a mount namespace; the chroot level runs without them, as a
    // local run does.
    let stage = match engine.host.level.private_root() {
        true => Some(
            Stage::create(&crate::state::StateDir::new(&engine.config.state_dir)).map_err(|e| {
                failed(
                    -500,
                    format!("cannot create the run's directories in the state directory: {e}"),
                )
            })?,
        ),
        false => None,
    };
    if let Some(name) = stage
        .as_ref()
        .and_then(|s| s.job.parent()?.file_name()?.to_str().map(String::from))
    {
        let _ = tx.send(line(&JobEvent::Started(JobStarted { job: name })));
    }
    let mut invocation = job.invocation;
    if let Some(script) = &job.script {
        invocation.filename = match &stage {
            Some(stage) => {
                let refused = |e: StageError| match e.is_usage() {
                    true => failed(-400, e.to_string()),
                    false => failed(-500, e.to_string()),
                };
                let mut stager = Stager::new(&stage.job, 64).map_err(refused)?;
                stager.add_script(script, &job.code).map_err(refused)?;
                format!("{}/{script}", crate::isolation::spec::JOB_MOUNT)
            }
            None => script.clone(),
        };
    }
    let sink: Sink = {
        let tx = tx.clone();
        Arc::new(move |stream: Stream, bytes: &[u8]| {
            let event = match stream {
                Stream::Stdout => JobEvent::Stdout(b64(bytes)),
                Stream::Stderr => JobEvent::Stderr(b64(bytes)),
            };
            let _ = tx.send(line(&event));
        })
    };
    let limit = job.stdin.len() as u64;
    let request = RunRequest {
        language: job.language,
        code: job.code,
        preload: String::new(),
        network: job.network,
        sink: Some(sink),
        invocation,
        stdin: Some(StdinFeed::new(
            Box::new(std::io::Cursor::new(job.stdin)),
            limit,
        )),
        files: stage.as_ref().map(Stage::files).unwrap_or_default(),
        wait_for_exit: true,
        cancel: Some(cancel),
    };
    let outcome = engine.execute(request).await.map_err(|e| match e {
        e @ (RunError::NetworkDisabled | RunError::TooFewProcesses { .. }) => {
            failed(-400, e.to_string())
        }
        RunError::LanguageUnavailable(..) => failed(-400, e.to_string()),
        e => {
            tracing::error!(error = %e, "job failed inside the sandbox");
            failed(-500, e.to_string())
        }
    })?;
    drop(stage);
    let kind = match outcome.limit {
        Some(limit) => limit.as_str(),
        None if outcome.exit_code == 0 => "ok",
        None => "error",
    };
    let error = match outcome.caught {
        Some(note) if outcome.error.is_empty() => note,
        _ => outcome.error,
    };
    Ok((
        JobEnd {
            exit_code: outcome.exit_code,
            error,
            limit: outcome.limit.map(|l| LimitHit::as_str(l).to_string()),
            duration_ms: outcome.duration.as_millis() as u64,
        },
        kind,
    ))
}

/// `POST /v1/sandbox/job/interrupt`: SIGINT into a job's snippet (through its init), as
/// Ctrl-C to `sandbox run --server` gives it.
pub async fn interrupt(headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let body = request::read_body(&headers, body).await?;
    let req: InterruptRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("the request body is not an interrupt request: {e}"))
    })?;
    // A stage's name: `<pid>-<nanos>`.
    if req.job.is_empty() || !req.job.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        return Err(ApiError::bad_request("field `job`: not a job's name"));
    }
    let sent = tokio::task::spawn_blocking(move || {
        crate::job::interrupt::init_of_job(&req.job).is_some_and(crate::job::interrupt::interrupt)
    })
    .await
    .unwrap_or(false);
    if !sent {
        return Err(ApiError::bad_request(
            "no such job is running (it may have ended)",
        ));
    }
    Ok(super::success(crate::protocol::envelope::Nothing {}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_one_object_a_line_named_by_kind() {
        let out = line(&JobEvent::Stdout(b64(b"hi\n")));
        assert_eq!(&out[..], b"{\"stdout\":\"aGkK\"}\n");
        let end = line(&JobEvent::End(JobEnd {
            exit_code: 3,
            error: "process exited with code 3".into(),
            limit: None,
            duration_ms: 12,
        }));
        let back: JobEvent = serde_json::from_slice(&end).expect("parses back");
        assert!(matches!(back, JobEvent::End(JobEnd { exit_code: 3, .. })));
        let started: JobEvent = serde_json::from_str(r#"{"started":{"job":"12-34"}}"#).unwrap();
        assert_eq!(
            started,
            JobEvent::Started(JobStarted {
                job: "12-34".into()
            })
        );
    }

    #[test]
    fn a_request_is_checked_field_by_field() {
        let ok = JobRequest {
            language: "python3".into(),
            code: "print(1)".into(),
            stdin: b64(b"in"),
            ..Default::default()
        };
        let checked = check(ok.clone()).expect("valid");
        assert_eq!(checked.stdin, b"in");
        let refused = |req: JobRequest| check(req).err().expect("refused").message;
        assert_eq!(
            refused(JobRequest {
                language: "ruby".into(),
                ..ok.clone()
            }),
            "unsupported language"
        );
        assert!(
            refused(JobRequest {
                code: String::new(),
                ..ok.clone()
            })
            .contains("`code`")
        );
        assert!(
            refused(JobRequest {
                env: vec![("A=B".into(), "x".into())],
                ..ok.clone()
            })
            .contains("`env`")
        );
        assert!(
            refused(JobRequest {
                stdin: "not base64!".into(),
                ..ok.clone()
            })
            .contains("`stdin`")
        );
        assert!(
            refused(JobRequest {
                argv: vec!["a\0b".into()],
                ..ok
            })
            .contains("NUL")
        );
        let unknown = serde_json::from_str::<JobRequest>(
            r#"{"language":"python3","code":"x","wait_for_exit":true}"#,
        );
        assert!(unknown.is_err(), "unknown fields are refused");
    }
}
