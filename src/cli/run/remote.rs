//! `sandbox run --server URL`: the same snippet on a remote `sandbox serve`, reported
//! like a local run. It goes to the server's own job endpoint (`api::job`), which runs
//! it as a local run is run (/job, `SANDBOX_OUT`, its argv, environment and stdin) and
//! streams its output back; a server without that endpoint gets Dify's, with the
//! invocation inside the code (see `prelude`). http:// or https:// (rustls).

use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::Serialize;

use super::report::{Outcome, stdin_cut_note};
use super::{StopSignals, prelude, usage};
use crate::protocol::Invocation;
use crate::protocol::Language;
use crate::protocol::LimitHit;
use crate::protocol::copy_bounded;
use crate::protocol::envelope::{Envelope, RunData};
use crate::protocol::job::{InterruptRequest, JobEvent, JobRequest};
use nix::sys::signal::Signal;

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
    #[error("the TLS connection to the sandbox server at {url} failed: {problem}")]
    Tls { url: String, problem: String },
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
        return Err(usage(
            "--server needs a URL such as http://host:8194 or https://sandbox.example.com",
        ));
    }
    if server.starts_with("http://") || server.starts_with("https://") {
        Ok(server.to_string())
    } else if server.contains("://") {
        Err(usage(format!(
            "--server {server}: only http:// and https:// URLs are supported"
        )))
    } else {
        Ok(format!("http://{server}"))
    }
}

/// What `run` checked, for a remote run.
pub(super) struct RemoteRun<'a> {
    pub server: &'a str,
    pub key: &'a str,
    /// PEM file of the CA(s) to trust instead of the system's (`--cacert`).
    pub cacert: Option<&'a std::path::Path>,
    pub language: Language,
    pub code: String,
    pub how: Invocation,
    /// The script's file name, for a file; none for -e and stdin.
    pub script: Option<String>,
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

type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// The HTTP client: hyper over rustls with ring; the system's trust roots (the platform
/// verifier: the CA bundle on Linux, the keychain on macOS), or only the CAs of
/// `--cacert`, as curl's option of that name.
struct Http {
    client: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
}

impl Http {
    fn new(cacert: Option<&std::path::Path>) -> anyhow::Result<Self> {
        // ring, not aws-lc-rs: cc alone builds it, for musl too. Deprecated only for
        // lacking post-quantum key exchange, which a sandbox server's client can do
        // without.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("cannot set up TLS")?;
        let config = match cacert {
            Some(path) => builder
                .with_root_certificates(private_roots(path)?)
                .with_no_client_auth(),
            None => {
                let verifier = rustls_platform_verifier::Verifier::new(provider)
                    .context("cannot read this system's trust roots")?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier))
                    .with_no_client_auth()
            }
        };
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        Ok(Self { client })
    }

    /// POST `body` as JSON to `url` with the key; the answer's head, its body to read.
    async fn post(
        &self,
        url: &str,
        key: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, Box<dyn std::error::Error + Send + Sync>>
    {
        let request = hyper::Request::post(url)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("X-Api-Key", key)
            .body(Full::new(Bytes::from(body)))?;
        match tokio::time::timeout(REMOTE_TIMEOUT, self.client.request(request)).await {
            Ok(answer) => Ok(answer?),
            Err(_) => Err(format!("no answer within {} s", REMOTE_TIMEOUT.as_secs()).into()),
        }
    }
}

/// The CA certificates of a PEM file, the only ones trusted with `--cacert`.
fn private_roots(path: &std::path::Path) -> anyhow::Result<rustls::RootCertStore> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| {
        usage(format!(
            "--cacert {}: {e}; give a readable PEM file of the server's CA",
            path.display()
        ))
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| {
            usage(format!(
                "--cacert {}: not a PEM certificate ({e}); give the server's CA certificate",
                path.display()
            ))
        })?;
        roots.add(cert).map_err(|e| {
            usage(format!(
                "--cacert {}: a certificate in it cannot be a trust root: {e}",
                path.display()
            ))
        })?;
    }
    if roots.is_empty() {
        return Err(usage(format!(
            "--cacert {}: no certificate in it (-----BEGIN CERTIFICATE-----); give the server's CA certificate",
            path.display()
        )));
    }
    Ok(roots)
}

/// A whole answer's body, as text.
async fn read_text(body: hyper::body::Incoming) -> Result<String, hyper::Error> {
    let bytes = body.collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// What went wrong, said for a person: a TLS failure names the certificate's problem.
fn unreachable(base: &str, e: &(dyn std::error::Error + 'static)) -> RemoteError {
    match tls_problem(e) {
        Some(problem) => RemoteError::Tls {
            url: base.to_string(),
            problem,
        },
        None => RemoteError::Unreachable {
            url: base.to_string(),
            reason: error_chain(e),
        },
    }
}

/// The rustls error below `e`, in words with the fix; io errors hide their inner error
/// from `source()`, so each is opened too.
fn tls_problem(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    use rustls::{CertificateError, Error as Tls};
    /// The rustls error in `e` or below it (through io errors' inner errors too).
    fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Tls> {
        if let Some(tls) = e.downcast_ref::<Tls>() {
            return Some(tls);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && let Some(tls) = find(inner)
        {
            return Some(tls);
        }
        e.source().and_then(find)
    }
    {
        if let Some(tls) = find(e) {
            let fix = match tls {
                Tls::InvalidCertificate(CertificateError::UnknownIssuer) => {
                    "its certificate is signed by a CA this client does not trust; pass that CA with --cacert FILE (or add it to the system's trust store)"
                }
                Tls::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                ) => {
                    "its certificate is not valid for the name in --server; use the name the certificate was issued for"
                }
                Tls::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. },
                ) => "its certificate has expired; the server needs a new one",
                Tls::InvalidCertificate(
                    CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
                ) => "its certificate is not valid yet; check this machine's clock",
                Tls::InvalidCertificate(_) => "its certificate was refused",
                Tls::InvalidMessage(_) => {
                    "it did not answer in TLS; `sandbox serve` itself speaks plain http (use http://, or put a TLS proxy in front of it)"
                }
                _ => "the TLS handshake failed",
            };
            return Some(format!("{fix} ({tls})"));
        }
    }
    None
}

pub(super) fn run_remote(run: RemoteRun<'_>) -> anyhow::Result<ExitCode> {
    let base = server_base(run.server)?;
    let client = Http::new(run.cacert)?;
    let (input, cut) = read_stdin(run.stdin, run.max_input_mb);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let started = Instant::now();
    let job = JobRequest {
        language: run.language.as_str().to_string(),
        code: run.code.clone(),
        script: run.script.clone(),
        filename: run.how.filename.clone(),
        argv: run.how.argv.clone(),
        env: run.how.env.clone(),
        stdin: base64::engine::general_purpose::STANDARD.encode(&input),
        enable_network: run.network,
    };
    let stream_out = !run.as_json;
    let job_name = std::sync::Mutex::new(None);
    let answered = rt.block_on(async {
        let mut stop = StopSignals::new().context("cannot watch for SIGINT and SIGTERM")?;
        let job = send_job(&client, &base, run.key, &job, stream_out, &job_name);
        tokio::pin!(job);
        let mut interrupted = false;
        loop {
            tokio::select! {
                answer = &mut job => return answer,
                signal = stop.recv() => {
                    // The first SIGINT goes to the snippet, as a local run's does; a
                    // second one, SIGTERM or SIGHUP close the connection, which stops
                    // the run.
                    let name = job_name.lock().ok().and_then(|n| n.clone());
                    if let (Signal::SIGINT, false, Some(name)) = (signal, interrupted, name)
                        && interrupt_job(&client, &base, run.key, &name).await
                    {
                        interrupted = true;
                        continue;
                    }
                    return Ok(Answered::Stopped(signal));
                }
            }
        }
    })?;
    let notes: Vec<String> = cut
        .then(|| stdin_cut_note(run.max_input_mb))
        .into_iter()
        .collect();
    // Closing the connection stopped the run on the server.
    let stopped = |signal: Signal| {
        let _ = std::io::stdout().flush();
        Outcome {
            stdout: String::new(),
            stderr: String::new(),
            error: String::new(),
            exit_code: 128 + signal as i32,
            duration: started.elapsed(),
            limit: None,
            files: Vec::new(),
            refused: Vec::new(),
            notes: vec![format!(
                "stopped by {}: the run was killed",
                signal.as_str()
            )],
        }
    };
    let mut result = match answered {
        Answered::Streamed(result) => result,
        Answered::Stopped(signal) => stopped(signal),
        // A server from before the job endpoint: Dify's, with the invocation inside the
        // code.
        Answered::NoJobEndpoint => {
            let code = prelude::launcher(run.language, &run.code, &run.how, &input);
            drop(input);
            let body = RemoteRequest {
                language: run.language.as_str(),
                code: &code,
                preload: "",
                enable_network: run.network,
                wait_for_exit: true,
            };
            let answer = rt.block_on(async {
                let mut stop = StopSignals::new().context("cannot watch for SIGINT and SIGTERM")?;
                tokio::select! {
                    answer = legacy(&client, &base, run.key, &body) => answer.map(Ok),
                    signal = stop.recv() => Ok(Err(signal)),
                }
            })?;
            let (answer, streamed) = match answer {
                Ok(answer) => (answer, false),
                Err(signal) => (stopped(signal), true),
            };
            return Ok(Outcome {
                notes: answer.notes.into_iter().chain(notes).collect(),
                duration: started.elapsed(),
                ..answer
            }
            .finish(run.as_json, streamed));
        }
    };
    result.notes.extend(notes);
    Ok(result.finish(run.as_json, stream_out))
}

/// How a remote run ended for this command.
enum Answered {
    /// Its output came as it was produced (and went to the terminal unless --json).
    Streamed(Outcome),
    /// SIGINT, SIGTERM or SIGHUP came first.
    Stopped(Signal),
    /// The server has no job endpoint (HTTP 404).
    NoJobEndpoint,
}

/// SIGINT into a job's snippet, through the server; whether it was delivered.
async fn interrupt_job(client: &Http, base: &str, key: &str, job: &str) -> bool {
    let body = serde_json::to_vec(&InterruptRequest { job: job.into() }).unwrap_or_default();
    let Ok(answer) = client
        .post(&format!("{base}/v1/sandbox/job/interrupt"), key, body)
        .await
    else {
        return false;
    };
    let ok = answer.status().is_success();
    let text = read_text(answer.into_body()).await.unwrap_or_default();
    ok && serde_json::from_str::<Envelope<serde_json::Value>>(&text).is_ok_and(|e| e.code == 0)
}

/// Refusals that come as HTTP statuses, the same on both endpoints.
fn refused_by_status(base: &str, status: u16) -> Option<anyhow::Error> {
    let url = base.to_string();
    match status {
        401 => Some(RemoteError::Unauthorized { url }.into()),
        503 => Some(RemoteError::Busy { url }.into()),
        413 => Some(usage(format!(
            "the sandbox server at {base} refused the snippet as too large (HTTP 413): the code and its stdin travel together, base64-encoded, within the server's 16 MiB"
        ))),
        _ => None,
    }
}

/// An envelope's refusal (`code` not 0), as this command's error.
fn refused_by_envelope(base: &str, code: i32, message: String) -> anyhow::Error {
    match code {
        // The server judged the request itself wrong: unsupported language, network off.
        -400 => usage(format!(
            "the sandbox server at {base} refused the request: {message}"
        )),
        _ => RemoteError::Failed {
            url: base.to_string(),
            message,
        }
        .into(),
    }
}

/// `POST /v1/sandbox/job`: the run's output as it comes, then its end.
async fn send_job(
    client: &Http,
    base: &str,
    key: &str,
    job: &JobRequest,
    stream_out: bool,
    started: &std::sync::Mutex<Option<String>>,
) -> anyhow::Result<Answered> {
    let body = serde_json::to_vec(job).context("cannot encode the request")?;
    let response = client
        .post(&format!("{base}/v1/sandbox/job"), key, body)
        .await
        .map_err(|e| unreachable(base, &*e))?;
    let status = response.status().as_u16();
    if status == 404 || status == 405 {
        return Ok(Answered::NoJobEndpoint);
    }
    if let Some(e) = refused_by_status(base, status) {
        return Err(e);
    }
    let streamed = response
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/x-ndjson"));
    if !streamed {
        // An envelope: the request was refused before the run.
        let text = read_text(response.into_body())
            .await
            .map_err(|e| unreachable(base, &e))?;
        let not_a_sandbox = || RemoteError::NotASandbox {
            url: base.to_string(),
            status,
            body: text.chars().take(200).collect(),
        };
        let envelope: Envelope<serde_json::Value> =
            serde_json::from_str(&text).map_err(|_| not_a_sandbox())?;
        return Err(match envelope.code {
            0 => not_a_sandbox().into(),
            code => refused_by_envelope(base, code, envelope.message),
        });
    }
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut pending: Vec<u8> = Vec::new();
    let mut body = response.into_body();
    let broken = |what: String| RemoteError::Unreachable {
        url: base.to_string(),
        reason: what,
    };
    loop {
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let event: JobEvent = serde_json::from_slice(line.trim_ascii())
                .map_err(|e| broken(format!("an answer line is not a job event: {e}")))?;
            let chunk = |data: &str| {
                base64::engine::general_purpose::STANDARD
                    .decode(data.as_bytes())
                    .map_err(|e| broken(format!("an output chunk is not base64: {e}")))
            };
            match event {
                JobEvent::Stdout(data) => {
                    let bytes = chunk(&data)?;
                    if stream_out {
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(&bytes).and_then(|_| out.flush());
                    }
                    stdout.extend_from_slice(&bytes);
                }
                JobEvent::Stderr(data) => {
                    let bytes = chunk(&data)?;
                    if stream_out {
                        let _ = std::io::stderr().lock().write_all(&bytes);
                    }
                    stderr.extend_from_slice(&bytes);
                }
                JobEvent::Started(s) => {
                    if let Ok(mut name) = started.lock() {
                        *name = Some(s.job);
                    }
                }
                JobEvent::Failed(failed) => {
                    return Err(refused_by_envelope(base, failed.code, failed.message));
                }
                JobEvent::End(end) => {
                    return Ok(Answered::Streamed(Outcome {
                        limit: LimitHit::recognise(end.exit_code, &end.error),
                        stdout: String::from_utf8_lossy(&stdout).into_owned(),
                        stderr: String::from_utf8_lossy(&stderr).into_owned(),
                        error: end.error,
                        exit_code: end.exit_code,
                        duration: Duration::from_millis(end.duration_ms),
                        files: Vec::new(),
                        refused: Vec::new(),
                        notes: Vec::new(),
                    }));
                }
            }
        }
        // A run may print nothing for long; the server's timeout bounds it.
        let frame = tokio::time::timeout(REMOTE_TIMEOUT, body.frame())
            .await
            .map_err(|_| broken(format!("no answer within {} s", REMOTE_TIMEOUT.as_secs())))?;
        match frame {
            Some(Ok(frame)) => {
                if let Ok(bytes) = frame.into_data() {
                    pending.extend_from_slice(&bytes);
                }
            }
            Some(Err(e)) => return Err(unreachable(base, &e).into()),
            None => {
                return Err(broken(
                    "the connection ended before the run did; the server may have stopped".into(),
                )
                .into());
            }
        }
    }
}

/// `POST /v1/sandbox/run`, Dify's endpoint, for a server without the job endpoint.
async fn legacy(
    client: &Http,
    base: &str,
    key: &str,
    body: &RemoteRequest<'_>,
) -> anyhow::Result<Outcome> {
    let body = serde_json::to_vec(body).context("cannot encode the request")?;
    let r = client
        .post(&format!("{base}/v1/sandbox/run"), key, body)
        .await
        .map_err(|e| unreachable(base, &*e))?;
    let status = r.status().as_u16();
    let text = read_text(r.into_body())
        .await
        .map_err(|e| unreachable(base, &e))?;
    if let Some(e) = refused_by_status(base, status) {
        return Err(e);
    }
    let not_a_sandbox = || RemoteError::NotASandbox {
        url: base.to_string(),
        status,
        body: text.chars().take(200).collect(),
    };
    let envelope: Envelope<RunData> = serde_json::from_str(&text).map_err(|_| not_a_sandbox())?;
    if envelope.code != 0 {
        return Err(refused_by_envelope(base, envelope.code, envelope.message));
    }
    let data = envelope.data.ok_or_else(not_a_sandbox)?;
    Ok(Outcome {
        limit: LimitHit::recognise(data.exit_code, &data.error),
        stdout: data.stdout,
        stderr: data.stderr,
        error: data.error,
        exit_code: data.exit_code,
        duration: Duration::ZERO,
        files: Vec::new(),
        refused: Vec::new(),
        notes: Vec::new(),
    })
}

/// The client's top-level message is generic ("client error (Connect)"); the cause is below.
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
        assert_eq!(server_base("https://h/").unwrap(), "https://h".to_string());
        assert!(server_base("ftp://h").is_err());
        assert!(server_base(" ").is_err());
    }
}
