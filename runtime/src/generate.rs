//! Streaming generation: a prompt (token ids, text, or a conversation) fed to a fresh session, then one
//! token per iterator step with the text it completes. Ends at max tokens, a stop id, a stop string, or
//! cancellation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::RuntimeError;
use crate::model::{GenerateParams, Model, StopReason};
use crate::sampling::Sampler;
use crate::session::Session;
use crate::text::{Detokenizer, Message};

/// What to generate after.
#[derive(Clone, Debug)]
pub enum Prompt {
    Ids(Vec<i64>),
    /// Plain text, tokenized with the tokenizer's special tokens (BOS).
    Text(String),
    /// A conversation rendered with the chat template, ending with the assistant's header.
    Chat(Vec<Message>),
    /// A prompt with images (bundles compiled with their vision encoder): each `<|image|>` placeholder
    /// of the prompt takes the next image; without placeholders the images come first.
    WithImages {
        prompt: Box<Prompt>,
        images: Vec<crate::vision::ImageSource>,
    },
}

/// Token ids of `prompt` with image layouts expanded, and the image feature rows for its `<|patch|>`
/// tokens (empty without images).
pub fn prepare_prompt(model: &Model, prompt: Prompt) -> Result<(Vec<i64>, Vec<f32>), RuntimeError> {
    let text = || {
        model.text().ok_or(RuntimeError::NoTokenizer {
            needed_for: "a text prompt",
        })
    };
    let without_images = |ids: Vec<i64>| -> Result<(Vec<i64>, Vec<f32>), RuntimeError> {
        if let Some(info) = &model.bundle.manifest.vision {
            let placeholders = ids.iter().filter(|&&t| t == info.tokens.image).count();
            if placeholders > 0 {
                return Err(RuntimeError::ImageMismatch(format!(
                    "the prompt has {placeholders} <|image|> placeholder(s) but no image was given (pass the images with it, e.g. --image)"
                )));
            }
        }
        Ok((ids, Vec::new()))
    };
    let max = model.context();
    let encode = |t: &str| -> Result<Vec<i64>, RuntimeError> {
        let codec = text()?;
        codec.check_length(t, max)?;
        codec.encode(t)
    };
    let encode_chat = |messages: &[crate::Message]| -> Result<Vec<i64>, RuntimeError> {
        text()?.encode_chat_bounded(messages, true, max)
    };
    Ok(match prompt {
        Prompt::Ids(ids) => without_images(ids)?,
        Prompt::Text(t) => without_images(encode(&t)?)?,
        Prompt::Chat(messages) => without_images(encode_chat(&messages)?)?,
        Prompt::WithImages { prompt, images } => {
            let m = &model.bundle.manifest;
            let info = m.vision.as_ref().ok_or(RuntimeError::NoVision)?;
            if images.len() > info.max_images {
                return Err(RuntimeError::ImageMismatch(format!(
                    "{} images given; this bundle takes at most {} per prompt (herd compile --max-images)",
                    images.len(),
                    info.max_images
                )));
            }
            let ids = match *prompt {
                Prompt::WithImages { .. } => {
                    return Err(RuntimeError::Call("nested image prompts".into()))
                }
                Prompt::Ids(ids) => ids,
                Prompt::Text(t) => encode(&t)?,
                Prompt::Chat(messages) => encode_chat(&messages)?,
            };
            let tiles = images
                .iter()
                .map(|source| {
                    crate::vision::load_image(source)
                        .map(|img| crate::vision::preprocess(&img, info))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let layouts: Vec<Vec<i64>> = tiles
                .iter()
                .map(|t| crate::vision::image_prompt_tokens(t, info))
                .collect();
            let ids = crate::vision::expand_prompt(&ids, &layouts, info, m.bos_token_id)?;
            // Refuse an over-long prompt before spending the vision encoder on it.
            if ids.len() > max {
                return Err(RuntimeError::TooLong {
                    len: ids.len(),
                    max,
                });
            }
            (ids, model.encode_images(&tiles)?)
        }
    })
}

/// One generated token.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    pub id: i64,
    /// The text this token completes (empty without a tokenizer, or inside a multi-byte character).
    pub text: String,
    /// The logits the token was chosen from, when `return_logits` was asked for.
    pub logits: Option<Vec<f32>>,
}

/// The tokens of one generation, as an iterator.
pub struct TokenStream<'m> {
    session: Session<'m>,
    params: GenerateParams,
    sampler: Sampler,
    detokenizer: Option<Detokenizer<'m>>,
    stop_ids: Vec<i64>,
    seen: Vec<i64>,
    logits: Option<Vec<f32>>,
    produced: usize,
    stop: Option<StopReason>,
    cancel: Option<Arc<AtomicBool>>,
}

impl<'m> TokenStream<'m> {
    pub(crate) fn new(
        model: &'m Model,
        prompt: Prompt,
        params: GenerateParams,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<TokenStream<'m>, RuntimeError> {
        params.sampling.validate()?;
        let (ids, features) = prepare_prompt(model, prompt)?;
        if ids.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        // The session's cache holds the model's context (--kv-context, else the bundle's maximum).
        crate::decode::check_room(ids.len(), params.max_new_tokens, model.context())?;
        if params.stop_strings.iter().any(String::is_empty) {
            return Err(RuntimeError::Parameter {
                name: "stop",
                message: "a stop string is empty (it would stop after the first token): give a non-empty text".into(),
            });
        }
        if !params.stop_strings.is_empty() && model.text().is_none() {
            return Err(RuntimeError::NoTokenizer {
                needed_for: "a stop string",
            });
        }
        let mut session = model.session()?;
        let logits = if params.max_new_tokens > 0 {
            Some(session.feed_with_images(&ids, &features)?)
        } else {
            None
        };
        Ok(TokenStream {
            session,
            sampler: Sampler::new(params.sampling.clone()),
            detokenizer: model.text().map(Detokenizer::new),
            stop_ids: params
                .stop_ids
                .clone()
                .unwrap_or_else(|| model.bundle.manifest.stop_token_ids.clone()),
            seen: ids,
            logits,
            produced: 0,
            stop: if params.max_new_tokens == 0 {
                Some(StopReason::MaxTokens)
            } else {
                None
            },
            params,
            cancel,
        })
    }

    /// Why the stream ended (None while it runs).
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop
    }

    /// The session, e.g. for its `kv_bytes()`.
    pub fn session(&self) -> &Session<'m> {
        &self.session
    }

    fn step(&mut self) -> Result<Option<TokenEvent>, RuntimeError> {
        if self.stop.is_some() {
            return Ok(None);
        }
        if self
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            self.stop = Some(StopReason::Cancelled);
            return Ok(None);
        }
        let Some(logits) = self.logits.take() else {
            return Ok(None);
        };
        let id = self.sampler.next(&logits, &self.seen);
        self.seen.push(id);
        self.produced += 1;
        let text = match self.detokenizer.as_mut() {
            Some(d) => d.push(id)?,
            None => String::new(),
        };
        if self.stop_ids.contains(&id) {
            self.stop = Some(StopReason::StopToken);
        } else if !self.params.stop_strings.is_empty() && {
            let all = self
                .detokenizer
                .as_ref()
                .map(|d| d.text())
                .transpose()?
                .unwrap_or_default();
            self.params
                .stop_strings
                .iter()
                .any(|s| all.contains(s.as_str()))
        } {
            self.stop = Some(StopReason::StopString);
        } else if self.produced == self.params.max_new_tokens {
            self.stop = Some(StopReason::MaxTokens);
        } else {
            self.logits = Some(self.session.feed(&[id])?);
        }
        Ok(Some(TokenEvent {
            id,
            text,
            logits: self.params.return_logits.then_some(logits),
        }))
    }
}

impl Iterator for TokenStream<'_> {
    type Item = Result<TokenEvent, RuntimeError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.step() {
            Ok(Some(event)) => Some(Ok(event)),
            Ok(None) => None,
            Err(e) => {
                self.stop = Some(StopReason::MaxTokens);
                Some(Err(e))
            }
        }
    }
}
