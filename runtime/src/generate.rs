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
        let text = || {
            model.text().ok_or_else(|| {
                RuntimeError::Param("the bundle has no tokenizer.json: pass token ids".into())
            })
        };
        let ids = match prompt {
            Prompt::Ids(ids) => ids,
            Prompt::Text(t) => text()?.encode(&t)?,
            Prompt::Chat(messages) => text()?.encode_chat(&messages, true)?,
        };
        if ids.is_empty() {
            return Err(RuntimeError::Param("the prompt has no tokens".into()));
        }
        let max = model.bundle.manifest.model.max_positions;
        let needed = ids.len() + params.max_new_tokens.saturating_sub(1);
        if needed > max {
            return Err(RuntimeError::TooLong { len: needed, max });
        }
        if !params.stop_strings.is_empty() && model.text().is_none() {
            return Err(RuntimeError::Param(
                "stop strings need the bundle's tokenizer.json".into(),
            ));
        }
        let mut session = model.session()?;
        let logits = if params.max_new_tokens > 0 {
            Some(session.feed(&ids)?)
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
