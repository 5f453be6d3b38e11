//! The Dify sandbox HTTP API (see PROTOCOL.md): routes, auth, envelopes.

mod conn;
pub mod job;
mod request;
pub mod server;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use axum::body::Body;
use axum::extract::{Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tracing::Instrument;

use crate::engine::{Engine, LimitHit, RunError, RunOutcome, RunRequest};
use crate::metrics::{LanguageLabel, Metrics, PoolLabels};
use crate::protocol::MAX_BODY_BYTES;
use crate::protocol::envelope::{DependencyList, Envelope, Nothing, RunData};
use crate::runtime::Language;

pub struct AppState {
    pub engine: Arc<Engine>,
    in_flight: AtomicUsize,
    request_ids: AtomicU64,
    metrics: Metrics,
}

impl AppState {
    pub fn new(engine: Arc<Engine>) -> Arc<Self> {
        let metrics = Metrics::new(&engine.false_ends);
        Arc::new(Self {
            engine,
            in_flight: AtomicUsize::new(0),
            request_ids: AtomicU64::new(1),
            metrics,
        })
    }
}

/// An API failure: HTTP status plus the envelope's code and message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: i32,
    message: String,
}

impl ApiError {
    /// Bad input: the original answers these with HTTP 200 and code -400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::OK,
            code: -400,
            message: message.into(),
        }
    }
    fn unsupported_language() -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: -400,
            message: "unsupported language".into(),
        }
    }
    fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::OK,
            code: -500,
            message: message.into(),
        }
    }
    fn too_large() -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: -400,
            message: format!(
                "the request body is larger than {MAX_BODY_BYTES} bytes ({} MiB), the most this server reads: send a smaller snippet",
                MAX_BODY_BYTES >> 20
            ),
        }
    }
    fn too_many() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: -503,
            message: "Too many requests".into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(Envelope::<()>::failure(self.code, self.message)),
        )
            .into_response()
    }
}

fn success<T: serde::Serialize>(data: T) -> Response {
    Json(Envelope::success(data)).into_response()
}

pub fn router(state: Arc<AppState>) -> Router {
    let sandbox = Router::new()
        .route("/run", post(run))
        // Not Dify's: `sandbox run --server` (see `job`).
        .route("/job", post(job::job))
        .route("/job/interrupt", post(job::interrupt))
        .route("/dependencies", get(list_dependencies))
        .route("/dependencies/update", post(update_dependencies))
        .route("/dependencies/refresh", get(refresh_dependencies))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    let mut metrics_route = Router::new().route("/metrics", get(metrics));
    if state.engine.config.metrics_auth {
        metrics_route =
            metrics_route.route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    }
    Router::new()
        .route("/health", get(|| async { Json("ok") }))
        .nest("/v1/sandbox", sandbox)
        .merge(metrics_route)
        .with_state(state)
}

async fn auth(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = headers.get("x-api-key").map(|v| v.as_bytes());
    if !key_matches(given, state.engine.config.key.as_bytes()) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    next.run(req).await
}

/// Compared in constant time, so the time of a refusal does not tell how much of a
/// guessed key was right. Only a length mismatch returns early, which gives away the
/// length, not the key.
fn key_matches(given: Option<&[u8]>, key: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    given.is_some_and(|g| bool::from(g.ct_eq(key)))
}

/// Counts a request in flight for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn run(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    // Admitted before the body is read, so requests beyond max_requests cost no memory.
    // Decided atomically: the increment that passes max_requests is undone and refused.
    let before = state.in_flight.fetch_add(1, Ordering::AcqRel);
    let _guard = InFlight(&state.in_flight);
    if before >= state.engine.config.max_requests {
        state.metrics.count("unknown", "rejected");
        return Err(ApiError::too_many());
    }
    let started = std::time::Instant::now();
    let id = state.request_ids.fetch_add(1, Ordering::Relaxed);
    let (language, result) = run_admitted(&state, id, &headers, query, body).await;
    let lang = language.map_or("unknown", |l| l.as_str());
    let outcome = match &result {
        Ok(o) => match o.limit {
            Some(limit) => limit.as_str(),
            None if o.exit_code == 0 => "ok",
            None => "error",
        },
        Err(e) if e.code == -400 => "invalid",
        Err(_) => "internal",
    };
    state.metrics.count(lang, outcome);
    if let Ok(o) = &result {
        state
            .metrics
            .duration
            .get_or_create(&LanguageLabel {
                language: lang.to_string(),
            })
            .observe(started.elapsed().as_secs_f64());
        let debug = state.engine.config.debug;
        tracing::info!(
            request_id = id,
            language = lang,
            duration_ms = o.duration.as_millis() as u64,
            outcome,
            limit = o.limit.map_or("none", LimitHit::as_str),
            exit_code = o.exit_code,
            uid = o.uid,
            "run finished"
        );
        if debug {
            tracing::debug!(stdout = %o.stdout, stderr = %o.stderr, "run output");
        }
    }
    result.map(|o| {
        success(RunData {
            stdout: o.stdout,
            stderr: o.stderr,
            error: o.error,
            exit_code: o.exit_code,
        })
    })
}

/// Everything after admission: parse, check, execute. Returns the language once known.
async fn run_admitted(
    state: &AppState,
    id: u64,
    headers: &HeaderMap,
    query: Option<String>,
    body: Body,
) -> (Option<Language>, Result<RunOutcome, ApiError>) {
    let body = match request::read_body(headers, body).await {
        Ok(b) => b,
        Err(e) => return (None, Err(e)),
    };
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let query: Vec<(String, String)> =
        match query.map(|q| serde_urlencoded::from_str(&q)).transpose() {
            Ok(q) => q.unwrap_or_default(),
            Err(e) => {
                return (
                    None,
                    Err(ApiError::bad_request(format!(
                        "the query string is not valid: {e}"
                    ))),
                );
            }
        };
    let req = match request::RunBody::parse(content_type, &body, &query) {
        Ok(r) => r,
        Err(e) => return (None, Err(e)),
    };
    let Some(language) = Language::parse(&req.language).filter(|l| l.as_str() == req.language)
    else {
        return (None, Err(ApiError::unsupported_language()));
    };
    let config = &state.engine.config;
    let preload = if config.enable_preload {
        req.preload
    } else {
        String::new()
    };
    let span = tracing::info_span!("run", request_id = id, language = %language);
    if config.debug {
        tracing::debug!(parent: &span, code = %req.code, "run requested");
    }
    let outcome = state
        .engine
        .execute(RunRequest {
            language,
            code: req.code,
            preload,
            network: req.enable_network,
            sink: None,
            invocation: Default::default(),
            stdin: None,
            files: Default::default(),
            wait_for_exit: req.wait_for_exit,
            cancel: None,
        })
        .instrument(span.clone())
        .await;
    let _entered = span.enter();
    match outcome {
        Ok(o) => (Some(language), Ok(o)),
        Err(e @ RunError::NetworkDisabled) => {
            (Some(language), Err(ApiError::bad_request(e.to_string())))
        }
        Err(e) => {
            tracing::error!(error = %e, "run failed inside the sandbox");
            (Some(language), Err(ApiError::internal(e.to_string())))
        }
    }
}

fn package_set(
    state: &AppState,
    language: Language,
) -> Result<&Arc<crate::deps::PackageSet>, ApiError> {
    state.engine.package_set(language).ok_or_else(|| {
        ApiError::internal(format!(
            "{language} is not available on this server, so it has no dependencies"
        ))
    })
}

/// The `language` parameter of the dependency endpoints: python3 or nodejs.
fn dependency_language(params: &[(String, String)]) -> Result<Option<Language>, ApiError> {
    match params
        .iter()
        .find(|(k, _)| k == "language")
        .map(|(_, v)| v.as_str())
    {
        Some("python3") => Ok(Some(Language::Python3)),
        Some("nodejs") => Ok(Some(Language::Nodejs)),
        Some(_) => Err(ApiError::unsupported_language()),
        None => Ok(None),
    }
}

fn required_language(params: &[(String, String)]) -> Result<Language, ApiError> {
    dependency_language(params)?.ok_or_else(|| {
        ApiError::bad_request("missing field `language`: give language=python3 or language=nodejs")
    })
}

async fn list_dependencies(
    State(state): State<Arc<AppState>>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let set = package_set(&state, required_language(&params)?)?;
    Ok(success(DependencyList {
        dependencies: set.list(),
    }))
}

/// Re-install a language's dependency file (a new generation beside the old one) and
/// list its packages.
async fn refresh_dependencies(
    State(state): State<Arc<AppState>>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let language = required_language(&params)?;
    let set = package_set(&state, language)?;
    state
        .engine
        .install_packages(language, true)
        .await
        .map_err(ApiError::internal)?;
    Ok(success(DependencyList {
        dependencies: set.list(),
    }))
}

/// Re-install the dependency files: the one `language` names, else every language's.
async fn update_dependencies(
    State(state): State<Arc<AppState>>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let languages = match dependency_language(&params)? {
        Some(language) => vec![language],
        None => Language::ALL
            .into_iter()
            .filter(|l| state.engine.package_set(*l).is_some())
            .collect(),
    };
    for language in languages {
        package_set(&state, language)?;
        state
            .engine
            .install_packages(language, true)
            .await
            .map_err(ApiError::internal)?;
    }
    Ok(success(Nothing {}))
}

/// Prometheus text; the gauges that mirror engine state are read at scrape time.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.metrics;
    m.in_flight
        .set(state.in_flight.load(Ordering::Relaxed) as i64);
    m.queued.set(state.engine.queued());
    m.background.set(state.engine.background_tasks() as i64);
    m.kept_namespaces.set(state.engine.network.kept() as i64);
    for language in Language::ALL {
        let Some(set) = state.engine.package_set(language) else {
            continue;
        };
        let s = set.status();
        let label = LanguageLabel {
            language: language.as_str().into(),
        };
        m.packages_generation
            .get_or_create(&label)
            .set(s.generation as i64);
        m.packages_installed
            .get_or_create(&label)
            .set(s.packages as i64);
        if let Some(ok) = s.last_ok {
            m.packages_last_install_ok
                .get_or_create(&label)
                .set(i64::from(ok));
        }
    }
    for (key, ready) in state.engine.warm_ready() {
        m.warm
            .get_or_create(&PoolLabels {
                language: key.language.to_string(),
                network: key.network.to_string(),
            })
            .set(ready as i64);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::key_matches;

    #[test]
    fn only_the_exact_key_matches() {
        let key = b"dify-sandbox";
        assert!(key_matches(Some(key), key));
        for wrong in [&b"dify-sandboy"[..], b"dify-sandbo", b"dify-sandbox1", b""] {
            assert!(!key_matches(Some(wrong), key), "{wrong:?}");
        }
        assert!(!key_matches(None, key));
    }
}
