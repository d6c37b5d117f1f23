//! `herd run BUNDLE --input-ids 1,2,3 | --prompt TEXT [--image PATH ...]`: generate from a compiled
//! bundle.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use herd_runtime::{GenerateParams, Model, Prompt, SampleParams, Sampling, StopReason};
use serde_json::json;

/// Sampling options shared by `run` and `chat`.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Number of tokens to generate at most.
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// Pick the most likely token each step (the default unless --temperature is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"])]
    pub greedy: bool,
    /// Sample with this temperature instead of greedy decoding.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// With --temperature: keep only the K most likely tokens (0 keeps all).
    #[arg(long, default_value_t = 0, requires = "temperature")]
    pub top_k: usize,
    /// With --temperature: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0, requires = "temperature")]
    pub top_p: f32,
    /// With --temperature: drop tokens less likely than P times the most likely one.
    #[arg(long, default_value_t = 0.0, requires = "temperature")]
    pub min_p: f32,
    /// With --temperature: penalise tokens already seen (1 is off, 1.1 is mild).
    #[arg(long, default_value_t = 1.0, requires = "temperature")]
    pub repetition_penalty: f32,
    /// With --temperature: random seed, for reproducible samples.
    #[arg(long, default_value_t = 0, requires = "temperature")]
    pub seed: u64,
    /// Do not stop at the bundle's stop tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Also stop when the generated text contains this (repeatable; needs the bundle's tokenizer).
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// Generation parameters from these arguments.
    pub fn params(&self, return_logits: bool) -> GenerateParams {
        GenerateParams {
            max_new_tokens: self.max_new_tokens,
            sampling: match self.temperature {
                Some(temperature) => Sampling::Sample(SampleParams {
                    temperature,
                    top_k: self.top_k,
                    top_p: self.top_p,
                    min_p: self.min_p,
                    repetition_penalty: self.repetition_penalty,
                    seed: self.seed,
                }),
                None => Sampling::Greedy,
            },
            stop_ids: self.ignore_eos.then(Vec::new),
            stop_strings: self.stop.clone(),
            return_logits,
        }
    }
}

/// Arguments of `herd run`.
#[derive(Args)]
pub struct RunArgs {
    /// A bundle folder made by `herd compile`.
    pub bundle: PathBuf,
    /// Prompt token ids, comma separated (e.g. 1,2,3).
    #[arg(long, value_delimiter = ',', num_args = 1.., required_unless_present = "prompt", conflicts_with = "prompt")]
    pub input_ids: Vec<i64>,
    /// Prompt text (tokenized with the bundle's tokenizer, BOS added); the output is streamed as text.
    #[arg(long)]
    pub prompt: Option<String>,
    /// A PNG or JPEG image for the prompt (repeatable, in order; bundles compiled with their vision
    /// encoder). Each `<|image|>` in the prompt takes the next image; without one the images come first.
    #[arg(long = "image", value_name = "PATH")]
    pub images: Vec<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Write the logits of every generated token as float32 .npy [N, vocab]; row 0 comes from the prefill.
    #[arg(long, value_name = "FILE.npy")]
    pub dump_logits: Option<PathBuf>,
    /// Print one JSON object (output_ids, text, prefill_ms, decode_tokens_per_s, ...).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: super::runtime_args::RuntimeArgs,
}

/// Runs the command.
pub fn run(args: &RunArgs) -> Result<()> {
    let model = Model::load(&args.bundle, &args.runtime.options())?;
    let mut prompt = match &args.prompt {
        Some(text) => Prompt::Text(text.clone()),
        None => Prompt::Ids(args.input_ids.clone()),
    };
    if !args.images.is_empty() {
        prompt = Prompt::WithImages {
            prompt: Box::new(prompt),
            images: args
                .images
                .iter()
                .map(|p| herd_runtime::vision::ImageSource::Path(p.clone()))
                .collect(),
        };
    }
    let stream_text = args.prompt.is_some() && !args.json;
    let start = std::time::Instant::now();
    let mut stream = model.stream(
        prompt,
        &args.sampling.params(args.dump_logits.is_some()),
        None,
    )?;
    let (mut ids, mut text, mut rows) = (Vec::new(), String::new(), Vec::new());
    let mut first_token = None;
    for event in &mut stream {
        let event = event?;
        first_token.get_or_insert_with(|| start.elapsed());
        if stream_text {
            out!("{}", event.text);
            std::io::stdout().flush().ok();
        }
        ids.push(event.id);
        text.push_str(&event.text);
        rows.extend(event.logits.unwrap_or_default());
    }
    let prefill = first_token.unwrap_or_default();
    let decode = start.elapsed().saturating_sub(prefill);
    if let Some(path) = &args.dump_logits {
        let vocab = model.bundle.manifest.model.vocab_size;
        let array = ndarray::Array2::from_shape_vec((ids.len(), vocab), rows)?;
        let tmp = path.with_extension("npy.partial");
        ndarray_npy::write_npy(&tmp, &array)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    }
    let decoded = ids.len().saturating_sub(1);
    let decode_tps = if decoded > 0 && decode.as_secs_f64() > 0.0 {
        decoded as f64 / decode.as_secs_f64()
    } else {
        0.0
    };
    let stop = match stream.stop_reason().unwrap_or(StopReason::MaxTokens) {
        StopReason::MaxTokens => "max_tokens",
        StopReason::StopToken => "stop_token",
        StopReason::StopString => "stop_string",
        StopReason::Cancelled => "cancelled",
    };
    if args.json {
        let summary = json!({
            "output_ids": ids,
            "text": text,
            "prefill_ms": prefill.as_secs_f64() * 1e3,
            "decode_ms": decode.as_secs_f64() * 1e3,
            "decode_tokens_per_s": decode_tps,
            "stop_reason": stop,
            "peak_rss_bytes": crate::driver::peak_rss_bytes(),
        });
        outln!("{summary}");
    } else {
        if stream_text {
            outln!();
        } else {
            let list: Vec<String> = ids.iter().map(|t| t.to_string()).collect();
            outln!("{}", list.join(","));
        }
        eprintln!(
            "{} tokens, first after {:.1} ms, then {decode_tps:.1} tokens/s; stopped: {stop}",
            ids.len(),
            prefill.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
