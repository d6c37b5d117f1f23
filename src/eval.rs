//! Comparing a bundle's next-token distributions with a reference bundle: KL divergence and top-1
//! agreement over teacher-forced prompts (the fixture's golden prompts when the checkpoint has them, plus
//! seeded random prompts).

use herd_runtime::sampling::argmax;
use std::path::Path;

use anyhow::{Context, Result};
use herd_runtime::manifest::Accuracy;
use herd_runtime::{Model, RuntimeOptions};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Random prompts added to the fixture prompts.
pub const RANDOM_PROMPTS: usize = 8;
/// Length of each random prompt.
pub const RANDOM_PROMPT_TOKENS: usize = 24;

/// Prompts for an evaluation: `prompt{n}.input_ids` of `model_dir/goldens.safetensors` when present,
/// then `RANDOM_PROMPTS` seeded random prompts.
pub fn prompts(
    model_dir: Option<&Path>,
    vocab: usize,
    max_positions: usize,
) -> Result<Vec<Vec<i64>>> {
    anyhow::ensure!(
        vocab > 0 && max_positions > 0,
        "no prompts can be drawn from a vocabulary of {vocab} tokens and {max_positions} positions"
    );
    let mut out = Vec::new();
    let goldens = match model_dir {
        Some(d) => herd_ir::model_file(d, "goldens.safetensors")?,
        None => None,
    };
    if let Some(path) = goldens {
        let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| path.display().to_string())?;
        let mut names: Vec<String> = st
            .names()
            .into_iter()
            .filter(|n| n.ends_with(".input_ids"))
            .map(|n| n.to_string())
            .collect();
        names.sort();
        for name in names {
            let t = st.tensor(&name)?;
            anyhow::ensure!(
                t.dtype() == safetensors::Dtype::I64,
                "{}: `{name}` is {:?}, expected I64 token ids",
                path.display(),
                t.dtype()
            );
            out.push(
                t.data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            );
        }
    }
    let mut rng = SmallRng::seed_from_u64(20261127);
    let len = RANDOM_PROMPT_TOKENS.min(max_positions);
    for _ in 0..RANDOM_PROMPTS {
        out.push(
            (0..len)
                .map(|_| rng.random_range(0..vocab as i64))
                .collect(),
        );
    }
    Ok(out)
}

/// KL(reference || candidate) and top-1 agreement at every position of every prompt.
pub fn compare(
    candidate: &Model,
    reference: &Model,
    prompts: &[Vec<i64>],
    reference_name: &str,
) -> Result<Accuracy> {
    let vocab = candidate.bundle.manifest.model.vocab_size;
    anyhow::ensure!(
        reference.bundle.manifest.model.vocab_size == vocab,
        "the bundles have different vocabularies"
    );
    let (mut kl_sum, mut kl_max, mut agree, mut positions) = (0f64, 0f64, 0usize, 0usize);
    for prompt in prompts {
        let p = reference.prompt_logits(prompt)?;
        let q = candidate.prompt_logits(prompt)?;
        for (rp, rq) in p.chunks_exact(vocab).zip(q.chunks_exact(vocab)) {
            let (lp, lq) = (log_softmax(rp), log_softmax(rq));
            let kl: f64 = lp
                .iter()
                .zip(&lq)
                .map(|(a, b)| a.exp() * (a - b))
                .sum::<f64>()
                .max(0.0);
            kl_sum += kl;
            kl_max = kl_max.max(kl);
            agree += (argmax(rp) == argmax(rq)) as usize;
            positions += 1;
        }
    }
    Ok(Accuracy {
        reference: reference_name.to_string(),
        prompts: prompts.len(),
        positions,
        kl_mean: kl_sum / positions.max(1) as f64,
        kl_max,
        top1_agreement: agree as f64 / positions.max(1) as f64,
    })
}

/// One line: KL mean and max, top-1 agreement, and what they were measured over.
pub fn describe(a: &Accuracy) -> String {
    format!(
        "KL mean {:.3e}, max {:.3e} nats; top-1 agreement {:.1}% over {} positions of {} prompts",
        a.kl_mean,
        a.kl_max,
        a.top1_agreement * 100.0,
        a.positions,
        a.prompts
    )
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    let log_sum = sum.ln() + max;
    logits.iter().map(|&v| v as f64 - log_sum).collect()
}

/// Loads both bundles (the candidate with `candidate_options`) and compares them.
pub fn compare_bundles(
    candidate: &Path,
    candidate_options: &RuntimeOptions,
    reference: &Path,
    prompt_source: Option<&Path>,
    reference_name: &str,
) -> Result<Accuracy> {
    let cand = Model::load(candidate, candidate_options)?;
    let refm = Model::load(reference, &RuntimeOptions::default())?;
    let m = &cand.bundle.manifest.model;
    let prompts = prompts(prompt_source, m.vocab_size, m.max_positions)?;
    compare(&cand, &refm, &prompts, reference_name)
}

/// Stores `accuracy` in the bundle's manifest (the manifest is not among the checksummed files).
pub fn store(
    bundle: &Path,
    accuracy: &Accuracy,
    rtn: Option<&Accuracy>,
    head_kept: Option<&Accuracy>,
) -> Result<()> {
    herd_runtime::bundle::update_manifest(bundle, |manifest| {
        let q = manifest.quantization.as_mut().ok_or_else(|| {
            herd_runtime::RuntimeError::Unsupported(format!(
                "{}: the bundle is not quantized",
                bundle.display()
            ))
        })?;
        q.accuracy = Some(accuracy.clone());
        if let Some(rtn) = rtn {
            q.rtn_accuracy = Some(rtn.clone());
        }
        if let Some(kept) = head_kept {
            q.head_kept_accuracy = Some(kept.clone());
        }
        Ok(())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_empty_vocabulary_is_refused_not_sampled() {
        let err = super::prompts(None, 0, 64).unwrap_err().to_string();
        assert!(err.contains("vocabulary of 0 tokens"), "{err}");
        assert_eq!(
            super::prompts(None, 10, 64).unwrap().len(),
            super::RANDOM_PROMPTS
        );
    }
}
