//! `--guard GUARD_BUNDLE`: Llama Guard 4 (a dense Llama 4 bundle) as the server's filter. The
//! conversation (and, after generation, the answer) is rendered with the guard checkpoint's own chat
//! template, which carries its category list; the guard's greedy verdict is `safe`, or `unsafe` with
//! the violated category codes on the next line (`S1,S10`), named from that list.

use std::sync::Arc;

use anyhow::{Context, Result};
use herd_runtime::{GenerateParams, Message, Model, RuntimeOptions, Sampling};

/// Tokens the guard may write for its verdict.
const VERDICT_TOKENS: usize = 16;

/// A loaded guard bundle.
pub struct Guard {
    model: Model,
}

impl Guard {
    /// Loads `dir`, which needs its tokenizer and chat template.
    pub fn load(dir: &std::path::Path, options: &RuntimeOptions) -> Result<Arc<Guard>> {
        let model = Model::load(dir, options)
            .with_context(|| format!("loading the guard bundle {}", dir.display()))?;
        if model.text().is_none() {
            anyhow::bail!(
                "{}: the guard bundle needs its tokenizer.json and chat template",
                dir.display()
            );
        }
        Ok(Arc::new(Guard { model }))
    }

    /// The guard's verdict on `turns`, then `answer` as the assistant's turn when given, rendered with
    /// its chat template: None when safe, else the violated categories.
    pub fn verdict(
        &self,
        turns: &[Message],
        answer: Option<&str>,
    ) -> Result<Option<String>, String> {
        let mut messages = turns.to_vec();
        if let Some(a) = answer {
            messages.push(Message {
                role: "assistant".into(),
                content: a.to_string(),
            });
        }
        let codec = self.model.text().ok_or("the guard has no tokenizer")?;
        let prompt = codec.render(&messages, true).map_err(|e| e.to_string())?;
        // The template writes the special tokens itself.
        let ids = codec
            .encode_chat(&messages, true)
            .map_err(|e| e.to_string())?;
        let params = GenerateParams {
            max_new_tokens: VERDICT_TOKENS,
            sampling: Sampling::Greedy,
            stop_ids: None,
            stop_strings: Vec::new(),
            return_logits: false,
        };
        let out = self
            .model
            .generate(&ids, &params)
            .map_err(|e| e.to_string())?;
        let text = codec.decode(&out.tokens, true).map_err(|e| e.to_string())?;
        Ok(parse_verdict(&text, &prompt))
    }
}

/// `safe` -> None; `unsafe` then codes -> their names from the prompt's category list (`S1: Violent
/// Crimes.`), or the codes alone. Anything else is not a refusal.
pub fn parse_verdict(text: &str, prompt: &str) -> Option<String> {
    let mut lines = text.trim().lines();
    if lines.next()?.trim() != "unsafe" {
        return None;
    }
    let codes: Vec<&str> = lines
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    if codes.is_empty() {
        return Some("unsafe (no category given)".into());
    }
    let named: Vec<String> = codes
        .iter()
        .map(|code| {
            prompt
                .lines()
                .find_map(|l| l.trim().strip_prefix(&format!("{code}: ")))
                .map_or(code.to_string(), |name| {
                    format!("{code}: {}", name.trim().trim_end_matches('.'))
                })
        })
        .collect();
    Some(named.join(", "))
}

#[cfg(test)]
mod tests {
    use super::parse_verdict;

    #[test]
    fn verdicts_are_read_with_the_template_category_names() {
        let prompt = "<BEGIN UNSAFE CONTENT CATEGORIES>\nS1: Violent Crimes.\nS10: Hate.\n<END>";
        assert_eq!(parse_verdict("safe", prompt), None);
        assert_eq!(parse_verdict("  safe\n", prompt), None);
        assert_eq!(parse_verdict("something else", prompt), None);
        assert_eq!(
            parse_verdict("unsafe\nS1,S10", prompt).as_deref(),
            Some("S1: Violent Crimes, S10: Hate")
        );
        assert_eq!(parse_verdict("unsafe\nS7", prompt).as_deref(), Some("S7"));
        assert_eq!(
            parse_verdict("unsafe", prompt).as_deref(),
            Some("unsafe (no category given)")
        );
    }
}
