//! OpenAI's HTTP API over the engine: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (plain
//! and server-sent events), `/health` and `/metrics`. Every refusal is an OpenAI error object with the
//! status a client expects; nothing a request sends can panic the server.

mod request;
mod response;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use herd_runtime::{Message, Model, Prompt, RuntimeError};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::engine::{Engine, Job};
use super::metrics::Metrics;
use request::{chat_prompt, params, ChatRequest, Common, CompletionRequest, PromptField};
use response::{pump, stream_response, whole_response, Kind, Meta, Piece};

/// What every handler shares.
pub struct App {
    pub model: Arc<Model>,
    pub engine: Engine,
    pub metrics: Arc<Metrics>,
    pub api_key: Option<String>,
    /// The model id clients name.
    pub name: String,
    /// Llama Guard, checking the conversation before and the answer after generation.
    pub guard: Option<Arc<super::guard::Guard>>,
}

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    code: &'static str,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            code,
        }
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let body = json!({"error": {"message": self.message, "type": kind, "code": self.code}});
        (self.status, Json(body)).into_response()
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> ApiError {
        match e {
            RuntimeError::TooLong { .. }
            | RuntimeError::TooLongWithNew { .. }
            | RuntimeError::TextTooLong { .. } => ApiError::new(
                StatusCode::BAD_REQUEST,
                "context_length_exceeded",
                e.to_string(),
            ),
            e if e.is_request_error() => ApiError::bad(e.to_string()),
            e => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                e.to_string(),
            ),
        }
    }
}

fn body<T>(parsed: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    parsed.map(|Json(v)| v).map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "the request body is larger than the server's --max-body",
            )
        } else {
            ApiError::bad(format!("malformed request: {}", e.body_text()))
        }
    })
}

/// How a request body is read: at most `max` bytes (a larger declared length is refused at once, 413),
/// all of it within `timeout` (408), so a client cannot hold a request open by sending nothing.
#[derive(Clone, Copy)]
pub struct BodyLimits {
    pub max: usize,
    pub timeout: std::time::Duration,
}

/// Reads the body under [`BodyLimits`] before the handler sees it.
pub async fn limit_body(
    State(limits): State<BodyLimits>,
    request: Request,
    next: Next,
) -> Response {
    let max = limits.max;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("the request body is larger than the server's --max-body ({max} bytes)"),
        )
        .into_response()
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return too_large();
    }
    let (parts, body) = request.into_parts();
    let bytes = match tokio::time::timeout(limits.timeout, axum::body::to_bytes(body, max)).await {
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} s (--body-timeout)",
                    limits.timeout.as_secs_f64()
                ),
            )
            .into_response()
        }
        Ok(Err(_)) => return too_large(),
        Ok(Ok(bytes)) => bytes,
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// Refuses `/v1/*` requests without the server's key (`Authorization: Bearer KEY`).
pub async fn authorize(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            let e = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "missing or wrong API key: send `Authorization: Bearer KEY`",
            );
            app.metrics
                .request(request.uri().path(), 401, std::time::Duration::ZERO);
            return e.into_response();
        }
    }
    next.run(request).await
}

pub async fn health() -> &'static str {
    "ok\n"
}

pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

pub async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": app.name, "object": "model", "created": 0, "owned_by": "herd"}],
    }))
}

pub async fn completions(
    State(app): State<Arc<App>>,
    request: Result<Json<CompletionRequest>, JsonRejection>,
) -> Response {
    let started = Instant::now();
    let response = match body(request) {
        Ok(r) => {
            let (prompt, turns) = match r.prompt {
                PromptField::Text(t) => {
                    let turn = Message {
                        role: "user".into(),
                        content: t.clone(),
                    };
                    (Prompt::Text(t), vec![turn])
                }
                PromptField::Ids(ids) => {
                    let text = app
                        .model
                        .text()
                        .and_then(|c| c.decode(&ids, true).ok())
                        .unwrap_or_default();
                    let turn = Message {
                        role: "user".into(),
                        content: text,
                    };
                    (Prompt::Ids(ids), vec![turn])
                }
            };
            generate(&app, prompt, turns, r.common, Kind::Completion).await
        }
        Err(e) => Err(e),
    };
    finish(&app, "/v1/completions", started, response)
}

pub async fn chat(
    State(app): State<Arc<App>>,
    request: Result<Json<ChatRequest>, JsonRejection>,
) -> Response {
    let started = Instant::now();
    let response = match body(request).and_then(|r| chat_prompt(r.messages).map(|p| (p, r.common)))
    {
        Ok(((prompt, turns), common)) => generate(&app, prompt, turns, common, Kind::Chat).await,
        Err(e) => Err(e),
    };
    finish(&app, "/v1/chat/completions", started, response)
}

fn finish(
    app: &App,
    endpoint: &str,
    started: Instant,
    response: Result<Response, ApiError>,
) -> Response {
    let response = response.unwrap_or_else(IntoResponse::into_response);
    app.metrics
        .request(endpoint, response.status().as_u16(), started.elapsed());
    response
}

async fn generate(
    app: &Arc<App>,
    prompt: Prompt,
    turns: Vec<Message>,
    common: Common,
    kind: Kind,
) -> Result<Response, ApiError> {
    if let Some(m) = &common.model {
        if *m != app.name {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!(
                    "model `{m}` is not served here (GET /v1/models lists `{}`)",
                    app.name
                ),
            ));
        }
    }
    let requested = common.max_completion_tokens.or(common.max_tokens);
    if requested == Some(0) {
        return Err(ApiError::bad("max_tokens must be at least 1"));
    }
    // Tokenizing and encoding images run the vision graph: not on the async workers.
    let model = app.model.clone();
    let (ids, features) =
        tokio::task::spawn_blocking(move || herd_runtime::prepare_prompt(&model, prompt))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "tokenizer task failed",
                )
            })??;
    let context = app.model.context();
    let room = context.saturating_sub(ids.len()) + 1;
    let max_tokens = match (requested, kind) {
        (Some(n), _) => n,
        (None, Kind::Completion) => 16.min(room),
        (None, Kind::Chat) => room,
    };
    if ids.len() > context || ids.len() + max_tokens > context + 1 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
            format!(
                "the prompt is {} tokens and max_tokens {max_tokens}; this model's context is {context}",
                ids.len()
            ),
        ));
    }
    let (params, stops) = params(&common, max_tokens)?;
    let meta = Meta {
        id: format!(
            "{}-{}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: app.name.clone(),
        kind,
        prompt_tokens: ids.len(),
    };
    if let Some(guard) = &app.guard {
        if let Some(category) = check(app, guard.clone(), turns.clone(), None).await? {
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.try_send(Piece::End {
                reason: "content_filter",
                tokens: 0,
                filtered: Some(category),
            });
            drop(tx);
            return if common.stream {
                Ok(stream_response(meta, rx))
            } else {
                whole_response(meta, rx).await
            };
        }
    }
    app.metrics.prompt_tokens(ids.len());
    let (tx, rx) = mpsc::unbounded_channel();
    app.engine
        .submit(Job {
            ids: ids.clone(),
            features,
            params,
            events: tx,
        })
        .map_err(|_| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                "the server's queue is full (--max-queue): retry later",
            )
        })?;
    let pieces = pump(app.clone(), rx, stops, turns);
    if common.stream {
        Ok(stream_response(meta, pieces))
    } else {
        whole_response(meta, pieces).await
    }
}

/// The guard's verdict on `turns` (and `answer`), off the async workers; counted in the metrics.
async fn check(
    app: &App,
    guard: Arc<super::guard::Guard>,
    turns: Vec<Message>,
    answer: Option<String>,
) -> Result<Option<String>, ApiError> {
    let verdict = tokio::task::spawn_blocking(move || guard.verdict(&turns, answer.as_deref()))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "guard task failed",
            )
        })?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "guard_error", e))?;
    app.metrics.guard_check(verdict.is_some());
    Ok(verdict)
}
