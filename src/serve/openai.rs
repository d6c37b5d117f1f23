//! OpenAI's HTTP API over the engine: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (plain
//! and server-sent events), `/health` and `/metrics`. Every refusal is an OpenAI error object with the
//! status a client expects; nothing a request sends can panic the server.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use herd_runtime::text::Detokenizer;
use herd_runtime::vision::ImageSource;
use herd_runtime::{
    GenerateParams, Message, Model, Prompt, RuntimeError, SampleParams, Sampling, StopReason,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::engine::{Engine, Event, Job};
use super::metrics::Metrics;

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
            RuntimeError::TooLong { .. } | RuntimeError::TooLongWithNew { .. } => ApiError::new(
                StatusCode::BAD_REQUEST,
                "context_length_exceeded",
                e.to_string(),
            ),
            RuntimeError::Param(_) | RuntimeError::Image { .. } => ApiError::bad(e.to_string()),
            _ => ApiError::new(
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

/// Refuses a body whose declared length is over `max` at once (413), without waiting for it.
pub async fn limit_body(State(max): State<usize>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("the request body is larger than the server's --max-body ({max} bytes)"),
        )
        .into_response();
    }
    next.run(request).await
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

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Ids(Vec<i64>),
}

/// Fields shared by both endpoints (unknown fields are ignored, as OpenAI's clients send many).
#[derive(Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    ignore_eos: bool,
    n: Option<usize>,
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    prompt: PromptField,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Content,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
#[serde(tag = "type")]
enum Part {
    #[serde(rename = "text")]
    Text { text: String },
    #[serde(rename = "image_url")]
    Image { image_url: ImageUrl },
}

#[derive(Deserialize)]
struct ImageUrl {
    url: String,
}

#[derive(Deserialize)]
pub struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: Common,
}

/// Which response shape a generation answers in.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
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

/// The conversation as a prompt (image parts become `<|image|>` placeholders, in order), and its turns.
fn chat_prompt(messages: Vec<ChatMessage>) -> Result<(Prompt, Vec<Message>), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad("messages is empty"));
    }
    let mut images = Vec::new();
    let mut turns = Vec::new();
    for (i, m) in messages.into_iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(ApiError::bad(format!(
                "messages[{i}]: role `{}` is not system, user or assistant",
                m.role
            )));
        }
        let content = match m.content {
            Content::Text(t) => t,
            Content::Parts(parts) => {
                let mut text = String::new();
                for part in parts {
                    match part {
                        Part::Text { text: t } => text.push_str(&t),
                        Part::Image { image_url } => {
                            images.push(data_uri_image(&image_url.url, images.len())?);
                            text.push_str("<|image|>");
                        }
                    }
                }
                text
            }
        };
        turns.push(Message {
            role: m.role,
            content,
        });
    }
    let chat = Prompt::Chat(turns.clone());
    let prompt = if images.is_empty() {
        chat
    } else {
        Prompt::WithImages {
            prompt: Box::new(chat),
            images,
        }
    };
    Ok((prompt, turns))
}

/// A `data:image/png;base64,...` (or jpeg) URI's bytes; remote URLs are refused.
fn data_uri_image(url: &str, index: usize) -> Result<ImageSource, ApiError> {
    let rest = url.strip_prefix("data:").ok_or_else(|| {
        ApiError::bad("image_url: only data: URIs (base64 PNG or JPEG) are accepted; the server fetches no remote URLs")
    })?;
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| ApiError::bad("image_url: a data: URI needs a comma before its data"))?;
    if !(meta.starts_with("image/png") || meta.starts_with("image/jpeg"))
        || !meta.ends_with(";base64")
    {
        return Err(ApiError::bad(
            "image_url: the data: URI must be image/png or image/jpeg, base64",
        ));
    }
    let data = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::bad(format!("image_url: bad base64: {e}")))?;
    Ok(ImageSource::Bytes {
        label: format!("image {index}"),
        data,
    })
}

/// Sampling and stopping from the request's fields.
fn params(common: &Common, max_tokens: usize) -> Result<(GenerateParams, Vec<String>), ApiError> {
    if common.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("n: only 1 completion per request"));
    }
    let temperature = common.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad("temperature must be between 0 and 2"));
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p must be in (0, 1]"));
    }
    let sampling = if temperature == 0.0 {
        Sampling::Greedy
    } else {
        let seed = common.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Sampling::Sample(SampleParams {
            temperature,
            top_p,
            seed,
            ..SampleParams::default()
        })
    };
    let stops = match &common.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) if v.len() <= 4 => v.clone(),
        Some(Stop::Many(_)) => return Err(ApiError::bad("stop: at most 4 sequences")),
    };
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::bad("stop: sequences must not be empty"));
    }
    Ok((
        GenerateParams {
            max_new_tokens: max_tokens,
            sampling,
            stop_ids: common.ignore_eos.then(Vec::new),
            stop_strings: Vec::new(),
            return_logits: false,
        },
        stops,
    ))
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

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
}

/// Text as generated, and how it ended.
enum Piece {
    Text(String),
    End {
        reason: &'static str,
        tokens: usize,
        /// The guard's categories when it refused.
        filtered: Option<String>,
    },
    Failed(String),
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

/// Turns the engine's tokens into text pieces: stop sequences end the generation (their text left out,
/// and text that may begin one held back until it cannot). With a guard the text is held until the
/// guard has read the whole answer.
fn pump(
    app: Arc<App>,
    mut events: mpsc::UnboundedReceiver<Event>,
    stops: Vec<String>,
    turns: Vec<Message>,
) -> mpsc::Receiver<Piece> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let model = app.model.clone();
        let Some(codec) = model.text() else {
            let _ = tx
                .send(Piece::Failed("the bundle has no tokenizer".into()))
                .await;
            return;
        };
        let mut detokenizer = Detokenizer::new(codec);
        let (mut all, mut sent, mut tokens) = (String::new(), 0usize, 0usize);
        let reason = loop {
            let Some(event) = events.recv().await else {
                break "stop";
            };
            match event {
                Event::Token(id) => {
                    tokens += 1;
                    match detokenizer.push(id) {
                        Ok(delta) => all.push_str(&delta),
                        Err(e) => {
                            let _ = tx.send(Piece::Failed(e.to_string())).await;
                            return;
                        }
                    }
                    if let Some(at) = stops.iter().filter_map(|s| all.find(s.as_str())).min() {
                        all.truncate(at);
                        break "stop";
                    }
                    let upto = if app.guard.is_some() {
                        sent
                    } else {
                        all.len() - held_back(&all, &stops)
                    };
                    if upto > sent {
                        if tx
                            .send(Piece::Text(all[sent..upto].to_string()))
                            .await
                            .is_err()
                        {
                            return; // the client went away; dropping `events` cancels the row
                        }
                        sent = upto;
                    }
                }
                Event::Done(StopReason::MaxTokens) => break "length",
                Event::Done(_) => break "stop",
                Event::Failed(message) => {
                    let _ = tx.send(Piece::Failed(message)).await;
                    return;
                }
            }
        };
        drop(events);
        let mut filtered = None;
        if let Some(guard) = &app.guard {
            match check(&app, guard.clone(), turns, Some(all.clone())).await {
                Ok(verdict) => filtered = verdict,
                Err(e) => {
                    let _ = tx.send(Piece::Failed(e.message)).await;
                    return;
                }
            }
        }
        if filtered.is_none() && all.len() > sent {
            let _ = tx.send(Piece::Text(all[sent..].to_string())).await;
        }
        let reason = if filtered.is_some() {
            "content_filter"
        } else {
            reason
        };
        let _ = tx
            .send(Piece::End {
                reason,
                tokens,
                filtered,
            })
            .await;
    });
    rx
}

/// Bytes at the end of `text` that could start a stop sequence (held back until more text decides).
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for stop in stops {
        for len in (1..stop.len()).rev() {
            if len > hold && stop.is_char_boundary(len) && text.ends_with(&stop[..len]) {
                hold = len;
                break;
            }
        }
    }
    hold
}

fn usage(meta: &Meta, tokens: usize) -> Value {
    json!({"prompt_tokens": meta.prompt_tokens, "completion_tokens": tokens, "total_tokens": meta.prompt_tokens + tokens})
}

async fn whole_response(
    meta: Meta,
    mut pieces: mpsc::Receiver<Piece>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(piece) = pieces.recv().await {
        match piece {
            Piece::Text(t) => text.push_str(&t),
            Piece::Failed(message) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    message,
                ))
            }
            Piece::End {
                reason,
                tokens,
                filtered,
            } => {
                let choice = match meta.kind {
                    Kind::Completion => {
                        json!({"index": 0, "text": text, "finish_reason": reason, "logprobs": null})
                    }
                    Kind::Chat => {
                        json!({"index": 0, "message": {"role": "assistant", "content": text},
                        "finish_reason": reason})
                    }
                };
                let mut body = json!({
                    "id": meta.id, "created": meta.created, "model": meta.model,
                    "object": if meta.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
                    "choices": [choice], "usage": usage(&meta, tokens),
                });
                if let Some(category) = filtered {
                    body["guard"] = json!({"verdict": "unsafe", "category": category});
                }
                return Ok(Json(body).into_response());
            }
        }
    }
    Err(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "the generation ended without a result",
    ))
}

fn chunk(meta: &Meta, text: Option<&str>, reason: Option<&str>) -> Value {
    let choice = match meta.kind {
        Kind::Completion => {
            json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": reason, "logprobs": null})
        }
        Kind::Chat => {
            let delta = match text {
                Some(t) => json!({"role": "assistant", "content": t}),
                None => json!({}),
            };
            json!({"index": 0, "delta": delta, "finish_reason": reason})
        }
    };
    json!({
        "id": meta.id, "created": meta.created, "model": meta.model,
        "object": if meta.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
        "choices": [choice],
    })
}

fn stream_response(meta: Meta, pieces: mpsc::Receiver<Piece>) -> Response {
    // Chunks while text comes, the last chunk with finish_reason and usage, then `[DONE]`.
    let events = futures_util::stream::unfold(
        (pieces, meta, false, false),
        |(mut pieces, meta, ended, done)| async move {
            if done {
                return None;
            }
            if ended {
                let event = SseEvent::default().data("[DONE]");
                return Some((Ok::<_, Infallible>(event), (pieces, meta, true, true)));
            }
            let data = match pieces.recv().await {
                Some(Piece::Text(t)) => chunk(&meta, Some(&t), None),
                Some(Piece::End {
                    reason,
                    tokens,
                    filtered,
                }) => {
                    let mut last = chunk(&meta, None, Some(reason));
                    last["usage"] = usage(&meta, tokens);
                    if let Some(category) = filtered {
                        last["guard"] = json!({"verdict": "unsafe", "category": category});
                    }
                    let event = SseEvent::default().data(last.to_string());
                    return Some((Ok(event), (pieces, meta, true, false)));
                }
                Some(Piece::Failed(message)) => {
                    let error = json!({"error": {"message": message, "type": "server_error"}});
                    let event = SseEvent::default().data(error.to_string());
                    return Some((Ok(event), (pieces, meta, true, false)));
                }
                None => return None,
            };
            Some((
                Ok(SseEvent::default().data(data.to_string())),
                (pieces, meta, false, false),
            ))
        },
    );
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
