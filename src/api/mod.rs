//! The Dify sandbox HTTP API (see PROTOCOL.md): routes, auth, envelopes.

mod request;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use axum::body::Bytes;
use axum::extract::{Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::deps;
use crate::engine::{Engine, RunError, RunRequest};
use crate::runner::Language;

pub struct AppState {
    pub engine: Arc<Engine>,
    in_flight: AtomicUsize,
    request_ids: AtomicU64,
}

impl AppState {
    pub fn new(engine: Arc<Engine>) -> Arc<Self> {
        Arc::new(Self {
            engine,
            in_flight: AtomicUsize::new(0),
            request_ids: AtomicU64::new(1),
        })
    }
}

/// The envelope every answer uses: `{"code", "message", "data"}`.
#[derive(Debug, Serialize)]
pub struct Envelope {
    code: i32,
    message: String,
    data: Value,
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
            Json(Envelope {
                code: self.code,
                message: self.message,
                data: Value::Null,
            }),
        )
            .into_response()
    }
}

fn success(data: Value) -> Response {
    Json(Envelope {
        code: 0,
        message: "success".into(),
        data,
    })
    .into_response()
}

pub fn router(state: Arc<AppState>) -> Router {
    let sandbox = Router::new()
        .route("/run", post(run))
        .route("/dependencies", get(list_dependencies))
        .route("/dependencies/update", post(update_dependencies))
        .route("/dependencies/refresh", get(refresh_dependencies))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(|| async { Json("ok") }))
        .nest("/v1/sandbox", sandbox)
        .with_state(state)
}

async fn auth(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    if key != Some(state.engine.config.key.as_str()) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    next.run(req).await
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
    body: Bytes,
) -> Result<Response, ApiError> {
    // Decided atomically: the increment that passes max_requests is undone and refused.
    let before = state.in_flight.fetch_add(1, Ordering::AcqRel);
    let _guard = InFlight(&state.in_flight);
    if before >= state.engine.config.max_requests {
        return Err(ApiError::too_many());
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let query: Vec<(String, String)> = query
        .map(|q| serde_urlencoded::from_str(&q))
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("the query string is not valid: {e}")))?
        .unwrap_or_default();
    let req = request::RunBody::parse(content_type, &body, &query)?;
    let language = Language::parse(&req.language)
        .filter(|l| matches!(l, Language::Python3 | Language::Nodejs) && l.as_str() == req.language)
        .ok_or_else(ApiError::unsupported_language)?;
    let config = &state.engine.config;
    if req.enable_network && !config.enable_network {
        return Err(ApiError::bad_request(
            "network is disabled, please enable it in the configuration",
        ));
    }
    let preload = if config.enable_preload {
        req.preload
    } else {
        String::new()
    };
    let id = state.request_ids.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("run", request_id = id, language = %language);
    let outcome = state
        .engine
        .execute(RunRequest {
            language,
            code: req.code,
            preload,
            network: req.enable_network,
            limits: state.engine.default_limits(),
            sink: None,
        })
        .instrument(span)
        .await;
    match outcome {
        Ok(o) => {
            tracing::info!(
                request_id = id,
                language = %language,
                duration_ms = o.duration.as_millis() as u64,
                exit_code = o.exit_code,
                limit = o.limit.map(|l| l.as_str()).unwrap_or("none"),
                uid = o.uid,
                "run finished"
            );
            Ok(success(json!({
                "stdout": o.stdout,
                "stderr": o.stderr,
                "error": o.error,
                "exit_code": o.exit_code,
            })))
        }
        Err(RunError::LanguageUnavailable(l, reason)) => Err(ApiError::internal(format!(
            "{l} is not available on this server: {reason}"
        ))),
        Err(e) => {
            tracing::error!(request_id = id, error = %e, "run failed inside the sandbox");
            Err(ApiError::internal(e.to_string()))
        }
    }
}

fn python_for_deps(state: &AppState) -> Result<std::path::PathBuf, ApiError> {
    state
        .engine
        .runtime(Language::Python3)
        .map(|rt| rt.program.clone())
        .map_err(|e| ApiError::internal(e.to_string()))
}

fn require_python(params: &[(String, String)]) -> Result<(), ApiError> {
    match params
        .iter()
        .find(|(k, _)| k == "language")
        .map(|(_, v)| v.as_str())
    {
        Some("python3") => Ok(()),
        Some(_) => Err(ApiError::unsupported_language()),
        None => Err(ApiError::bad_request(
            "missing field `language`: give language=python3",
        )),
    }
}

async fn dependency_list(state: &AppState) -> Result<Response, ApiError> {
    let python = python_for_deps(state)?;
    let path = state.engine.config.dependencies_path.clone();
    let list = tokio::task::spawn_blocking(move || deps::list(&python, &path))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(success(json!({ "dependencies": list })))
}

async fn list_dependencies(
    State(state): State<Arc<AppState>>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    require_python(&params)?;
    dependency_list(&state).await
}

async fn refresh_dependencies(
    State(state): State<Arc<AppState>>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    require_python(&params)?;
    dependency_list(&state).await
}

async fn update_dependencies(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    // Re-reading the requirements proves the file and the interpreter are usable; the
    // root is rebuilt per run, so there is nothing else to refresh.
    dependency_list(&state).await?;
    Ok(success(json!({})))
}
