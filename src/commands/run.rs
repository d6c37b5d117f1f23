//! `herd run BUNDLE --input-ids 1,2,3`: generate tokens from a compiled bundle.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use herd_runtime::{GenerateParams, Model, Sampling, StopReason};
use serde_json::json;

/// Arguments of `herd run`.
#[derive(Args)]
pub struct RunArgs {
    /// A bundle folder made by `herd compile`.
    pub bundle: PathBuf,
    /// Prompt token ids, comma separated (e.g. 1,2,3).
    #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
    pub input_ids: Vec<i64>,
    /// Number of tokens to generate at most.
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// Pick the most likely token each step (the default unless --temperature is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p", "seed"])]
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
    /// With --temperature: random seed, for reproducible samples.
    #[arg(long, default_value_t = 0, requires = "temperature")]
    pub seed: u64,
    /// Do not stop at the bundle's stop tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Write the logits of every generated token as float32 .npy [N, vocab]; row 0 comes from the prefill.
    #[arg(long, value_name = "FILE.npy")]
    pub dump_logits: Option<PathBuf>,
    /// Print one JSON object (output_ids, prefill_ms, decode_tokens_per_s, ...).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: super::runtime_args::RuntimeArgs,
}

/// Runs the command.
pub fn run(args: &RunArgs) -> Result<()> {
    let options = args.runtime.options();
    let model = Model::load(&args.bundle, &options)?;
    let sampling = match args.temperature {
        Some(temperature) => Sampling::Sample {
            temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        None => Sampling::Greedy,
    };
    let params = GenerateParams {
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_ids: args.ignore_eos.then(Vec::new),
        return_logits: args.dump_logits.is_some(),
    };
    let out = model.generate(&args.input_ids, &params)?;
    if let Some(path) = &args.dump_logits {
        let vocab = model.bundle.manifest.model.vocab_size;
        let flat: Vec<f32> = out.step_logits.iter().flatten().copied().collect();
        let array = ndarray::Array2::from_shape_vec((out.step_logits.len(), vocab), flat)?;
        let tmp = path.with_extension("npy.partial");
        ndarray_npy::write_npy(&tmp, &array)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    }
    let decoded = out.tokens.len().saturating_sub(1);
    let decode_tps = if decoded > 0 && out.decode.as_secs_f64() > 0.0 {
        decoded as f64 / out.decode.as_secs_f64()
    } else {
        0.0
    };
    if args.json {
        let summary = json!({
            "output_ids": out.tokens,
            "prompt_tokens": args.input_ids.len(),
            "prefill_ms": out.prefill.as_secs_f64() * 1e3,
            "decode_ms": out.decode.as_secs_f64() * 1e3,
            "decode_tokens_per_s": decode_tps,
            "stop_reason": match out.stop { StopReason::MaxTokens => "max_tokens", StopReason::StopToken => "stop_token" },
        });
        println!("{summary}");
    } else {
        let ids: Vec<String> = out.tokens.iter().map(|t| t.to_string()).collect();
        println!("{}", ids.join(","));
        eprintln!(
            "prefill {} tokens in {:.1} ms; decode {:.1} tokens/s",
            args.input_ids.len(),
            out.prefill.as_secs_f64() * 1e3,
            decode_tps
        );
    }
    Ok(())
}
