//! Text in and out: the bundle's `tokenizer.json` (through the `tokenizers` crate) and chat template
//! (`chat_template.jinja` or `chat_template` in `tokenizer_config.json`, rendered with `minijinja`;
//! Llama 4's format when the checkpoint has none). A rendered conversation already starts with BOS, so it
//! is tokenized without the tokenizer's own special tokens: never a double BOS.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::RuntimeError;

/// Llama 4's chat format (shared/llama4.md), used when the checkpoint ships no template.
pub const LLAMA4_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}<|header_start|>{{ message.role }}<|header_end|>\n\n\
{{ message.content | trim }}<|eot|>{% endfor %}{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}";

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A bundle's tokenizer and chat template.
pub struct TextCodec {
    tokenizer: tokenizers::Tokenizer,
    template: String,
    bos_token: String,
    /// Bytes of the longest token (at least 1): a text of n bytes has at least n / this many tokens.
    max_token_bytes: usize,
}

/// Template instructions one rendering may run (a conversation takes thousands): an endless loop in a
/// chat template ends with an error instead of hanging.
const TEMPLATE_FUEL: u64 = 50_000_000;

#[derive(Deserialize)]
struct TokenizerConfig {
    chat_template: Option<serde_json::Value>,
    bos_token: Option<serde_json::Value>,
}

fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// An output sink that stops a rendering once it passes `max` bytes.
struct CappedWriter {
    bytes: Vec<u8>,
    max: usize,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes.extend_from_slice(buf);
        if self.bytes.len() > self.max {
            return Err(std::io::Error::other("rendered output too long"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl TextCodec {
    /// Loads `tokenizer.json` and the chat template from a bundle folder.
    pub fn load(dir: &Path) -> Result<TextCodec, RuntimeError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(RuntimeError::Io {
                path: path.display().to_string(),
                message: "not found: text needs a bundle compiled from a checkpoint folder that has one (token ids still work)".into(),
            });
        }
        let bytes = std::fs::read(&path).map_err(|e| RuntimeError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let config: Option<TokenizerConfig> =
            std::fs::read_to_string(dir.join("tokenizer_config.json"))
                .ok()
                .map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|e| RuntimeError::BadManifest {
                    path: dir.join("tokenizer_config.json").display().to_string(),
                    message: e.to_string(),
                })?;
        let from_config = config
            .as_ref()
            .and_then(|c| c.chat_template.as_ref())
            .and_then(|t| match t {
                serde_json::Value::String(s) => Some(s.clone()),
                // A list of named templates: the default one.
                serde_json::Value::Array(list) => list
                    .iter()
                    .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|e| e.get("template")?.as_str().map(str::to_string)),
                _ => None,
            });
        let template = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(t) => t,
            Err(_) => from_config.unwrap_or_else(|| LLAMA4_TEMPLATE.to_string()),
        };
        let bos_token = config
            .and_then(|c| c.bos_token.as_ref().and_then(token_text))
            .unwrap_or_else(|| "<|begin_of_text|>".to_string());
        Self::from_parts(&path.display().to_string(), &bytes, template, bos_token)
    }

    /// A codec from the bytes of a `tokenizer.json` (named `label` in errors), a chat template and
    /// the BOS token's text.
    pub fn from_parts(
        label: &str,
        tokenizer_json: &[u8],
        template: String,
        bos_token: String,
    ) -> Result<TextCodec, RuntimeError> {
        let tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json).map_err(|e| {
            RuntimeError::BadManifest {
                path: label.to_string(),
                message: format!("invalid tokenizer: {e}"),
            }
        })?;
        // A token's UTF-8 spelling is at least as long as the bytes it stands for (byte-level BPE
        // spells each byte as one character of one or two bytes), so no prompt that fits is refused.
        let max_token_bytes = tokenizer
            .get_vocab(true)
            .keys()
            .map(|t| t.len())
            .max()
            .unwrap_or(1)
            .max(1);
        Ok(TextCodec {
            tokenizer,
            template,
            bos_token,
            max_token_bytes,
        })
    }

    /// Token ids of plain text, with the tokenizer's special tokens (BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, RuntimeError> {
        self.encode_with(text, true)
    }

    /// The same codec with another chat template.
    pub fn set_template(&mut self, template: String) {
        self.template = template;
    }

    /// Refuses `text` when it certainly holds more than `max_tokens` tokens (before tokenizing it,
    /// which would allocate in proportion to its length).
    pub fn check_length(&self, text: &str, max_tokens: usize) -> Result<(), RuntimeError> {
        let least = text.len() / self.max_token_bytes;
        if least > max_tokens {
            return Err(RuntimeError::TextTooLong {
                bytes: text.len(),
                least,
                max: max_tokens,
            });
        }
        Ok(())
    }

    fn encode_with(&self, text: &str, special: bool) -> Result<Vec<i64>, RuntimeError> {
        let enc = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| RuntimeError::Tokenizer(format!("cannot tokenize: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// The conversation rendered with the chat template.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, RuntimeError> {
        self.render_capped(messages, add_generation_prompt, usize::MAX)
    }

    /// [`TextCodec::render`], failing once the output passes `max_bytes` or the template runs out of
    /// fuel (an endless loop).
    pub fn render_capped(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        max_bytes: usize,
    ) -> Result<String, RuntimeError> {
        let mut env = minijinja::Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_template("chat", &self.template)
            .map_err(|e| RuntimeError::ChatTemplate(format!("invalid: {e}")))?;
        let ctx = minijinja::context! { messages => messages, add_generation_prompt => add_generation_prompt, bos_token => &self.bos_token };
        let mut out = CappedWriter {
            bytes: Vec::new(),
            max: max_bytes,
        };
        env.get_template("chat")
            .and_then(|t| t.render_captured_to(ctx, &mut out).map(|_| ()))
            .map_err(|e| {
                if out.bytes.len() > out.max {
                    RuntimeError::ChatTemplate(format!(
                        "the rendered conversation passes {max_bytes} bytes, more than the bundle's positions can hold"
                    ))
                } else {
                    RuntimeError::ChatTemplate(format!("cannot render it: {e}"))
                }
            })?;
        String::from_utf8(out.bytes)
            .map_err(|_| RuntimeError::ChatTemplate("it rendered invalid UTF-8".into()))
    }

    /// Token ids of a rendered conversation (BOS from the template only).
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<i64>, RuntimeError> {
        self.encode_with(&self.render(messages, add_generation_prompt)?, false)
    }

    /// [`TextCodec::encode_chat`] refusing conversations longer than `max_tokens` before tokenizing.
    pub fn encode_chat_bounded(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        max_tokens: usize,
    ) -> Result<Vec<i64>, RuntimeError> {
        let max_bytes = max_tokens
            .saturating_add(1)
            .saturating_mul(self.max_token_bytes);
        let text = self.render_capped(messages, add_generation_prompt, max_bytes)?;
        self.check_length(&text, max_tokens)?;
        self.encode_with(&text, false)
    }

    /// Text of token ids; special tokens are left out when `skip_special`.
    pub fn decode(&self, ids: &[i64], skip_special: bool) -> Result<String, RuntimeError> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer
            .decode(&ids, skip_special)
            .map_err(|e| RuntimeError::Tokenizer(format!("cannot decode: {e}")))
    }
}

/// Turns a stream of token ids into text deltas, holding back bytes of incomplete UTF-8 characters.
pub struct Detokenizer<'c> {
    codec: &'c TextCodec,
    ids: Vec<i64>,
    emitted: usize,
}

impl<'c> Detokenizer<'c> {
    /// A detokenizer for `codec`.
    pub fn new(codec: &'c TextCodec) -> Detokenizer<'c> {
        Detokenizer {
            codec,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: i64) -> Result<String, RuntimeError> {
        self.ids.push(id);
        let text = self.codec.decode(&self.ids, true)?;
        if text.ends_with('\u{fffd}') || text.len() < self.emitted {
            return Ok(String::new());
        }
        let delta = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(delta)
    }

    /// All text so far.
    pub fn text(&self) -> Result<String, RuntimeError> {
        self.codec.decode(&self.ids, true)
    }
}
