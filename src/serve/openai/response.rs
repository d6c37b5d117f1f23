//! Responses: the engine's tokens turned into text (stop sequences, the guard's hold), as one JSON
//! body or as server-sent events in OpenAI's chunk format.

use std::convert::Infallible;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use herd_runtime::text::Detokenizer;
use herd_runtime::{Message, StopReason};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::super::engine::Event;
use super::{check, ApiError, App};

/// Which response shape a generation answers in.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Kind {
    Completion,
    Chat,
}

pub(super) struct Meta {
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) kind: Kind,
    pub(super) prompt_tokens: usize,
}

/// Text as generated, and how it ended.
pub(super) enum Piece {
    Text(String),
    End {
        reason: &'static str,
        tokens: usize,
        /// The guard's categories when it refused.
        filtered: Option<String>,
    },
    Failed(String),
}

/// Turns the engine's tokens into text pieces: stop sequences end the generation (their text left out,
/// and text that may begin one held back until it cannot). With a guard the text is held until the
/// guard has read the whole answer.
pub(super) fn pump(
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

pub(super) async fn whole_response(
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

pub(super) fn stream_response(meta: Meta, pieces: mpsc::Receiver<Piece>) -> Response {
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
