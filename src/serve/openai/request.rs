//! The request bodies of OpenAI's completions and chat endpoints, and what they ask for: the prompt
//! (chat content parts, `data:` URI images) and sampling and stop settings.

use base64::Engine as _;
use herd_runtime::vision::ImageSource;
use herd_runtime::{GenerateParams, Message, Prompt, SampleParams, Sampling};
use serde::Deserialize;
use std::time::{SystemTime, UNIX_EPOCH};

use super::ApiError;

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum PromptField {
    Text(String),
    Ids(Vec<i64>),
}

/// Fields shared by both endpoints (unknown fields are ignored, as OpenAI's clients send many).
#[derive(Deserialize)]
pub(super) struct Common {
    pub(super) model: Option<String>,
    pub(super) max_tokens: Option<usize>,
    pub(super) max_completion_tokens: Option<usize>,
    pub(super) temperature: Option<f32>,
    pub(super) top_p: Option<f32>,
    pub(super) seed: Option<u64>,
    pub(super) stop: Option<Stop>,
    #[serde(default)]
    pub(super) stream: bool,
    #[serde(default)]
    pub(super) ignore_eos: bool,
    pub(super) n: Option<usize>,
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    pub(super) prompt: PromptField,
    #[serde(flatten)]
    pub(super) common: Common,
}

#[derive(Deserialize)]
pub(super) struct ChatMessage {
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
    pub(super) messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub(super) common: Common,
}

/// The conversation as a prompt (image parts become `<|image|>` placeholders, in order), and its turns.
pub(super) fn chat_prompt(messages: Vec<ChatMessage>) -> Result<(Prompt, Vec<Message>), ApiError> {
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
pub(super) fn data_uri_image(url: &str, index: usize) -> Result<ImageSource, ApiError> {
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
pub(super) fn params(
    common: &Common,
    max_tokens: usize,
) -> Result<(GenerateParams, Vec<String>), ApiError> {
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
