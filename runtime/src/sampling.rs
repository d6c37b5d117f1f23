//! Choosing the next token from logits: greedy, or seeded sampling with repetition penalty, temperature,
//! top-k, top-p and min-p (applied in that order).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::RuntimeError;

/// Parameters of sampling.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleParams {
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches top_p; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of tokens already seen by this; 1 is off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SampleParams {
    fn default() -> SampleParams {
        SampleParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

/// How the next token is chosen.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Sampling {
    /// The most likely token (the first on ties), as transformers' greedy search.
    #[default]
    Greedy,
    /// A seeded draw from the filtered distribution.
    Sample(SampleParams),
}

impl Sampling {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let Sampling::Sample(p) = self else {
            return Ok(());
        };
        let bad = |name: &'static str, message: String| {
            Err(RuntimeError::Parameter {
                name,
                message: format!("{name} {message}"),
            })
        };
        if !(p.temperature.is_finite() && p.temperature > 0.0) {
            return bad(
                "temperature",
                format!("must be a positive number, got {}", p.temperature),
            );
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", p.top_p));
        }
        if !(0.0..1.0).contains(&p.min_p) {
            return bad("min_p", format!("must be in [0, 1), got {}", p.min_p));
        }
        if !(p.repetition_penalty.is_finite() && p.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!("must be a positive number, got {}", p.repetition_penalty),
            );
        }
        Ok(())
    }
}

/// A sampler with its random state.
pub struct Sampler {
    sampling: Sampling,
    rng: StdRng,
}

impl Sampler {
    /// A sampler for `sampling`.
    pub fn new(sampling: Sampling) -> Sampler {
        let seed = match &sampling {
            Sampling::Sample(p) => p.seed,
            Sampling::Greedy => 0,
        };
        Sampler {
            sampling,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The next token for `logits`, given the tokens seen so far (for the repetition penalty).
    pub fn next(&mut self, logits: &[f32], seen: &[i64]) -> i64 {
        let Sampling::Sample(p) = &self.sampling else {
            return argmax(logits);
        };
        let mut scores = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            let mut ids: Vec<usize> = seen
                .iter()
                .filter_map(|&t| usize::try_from(t).ok())
                .filter(|&t| t < scores.len())
                .collect();
            ids.sort_unstable();
            ids.dedup();
            for t in ids {
                scores[t] = if scores[t] > 0.0 {
                    scores[t] / p.repetition_penalty
                } else {
                    scores[t] * p.repetition_penalty
                };
            }
        }
        let mut ranked: Vec<(usize, f32)> = scores.iter().copied().enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            ranked.truncate(p.top_k);
        }
        // Scale the distance to the best score, never the score itself: a tiny temperature then
        // tends to greedy instead of overflowing to inf - inf = NaN.
        let max = ranked.first().map_or(0.0, |r| r.1);
        let mut probs: Vec<f32> = ranked
            .iter()
            .map(|r| ((r.1 - max) / p.temperature).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        let mut kept = 0;
        let mut mass = 0.0;
        for q in &probs {
            if kept > 0 && *q < p.min_p * probs[0] {
                break;
            }
            kept += 1;
            mass += q;
            if mass >= p.top_p {
                break;
            }
        }
        let draw: f32 = self.rng.random::<f32>() * mass;
        let mut acc = 0.0;
        for (i, q) in probs[..kept].iter().enumerate() {
            acc += q;
            if draw < acc {
                return ranked[i].0 as i64;
            }
        }
        ranked[kept - 1].0 as i64
    }
}

/// Index of the largest logit, the first on ties.
pub fn argmax(logits: &[f32]) -> i64 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(p: SampleParams, logits: &[f32], seen: &[i64], n: usize) -> Vec<i64> {
        let mut s = Sampler::new(Sampling::Sample(p));
        (0..n).map(|_| s.next(logits, seen)).collect()
    }

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(
            Sampler::new(Sampling::Greedy).next(&[0.1, 3.0, 3.0, -1.0], &[]),
            1
        );
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let params = SampleParams {
            temperature: 0.8,
            top_k: 5,
            seed: 42,
            ..Default::default()
        };
        let a = sample(params.clone(), &logits, &[], 20);
        assert_eq!(a, sample(params, &logits, &[], 20));
        let mut ranked: Vec<usize> = (0..50).collect();
        ranked.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]).then(x.cmp(&y)));
        assert!(
            a.iter().all(|t| ranked[..5].contains(&(*t as usize))),
            "{a:?}"
        );
    }

    #[test]
    fn tiny_top_p_and_high_min_p_are_greedy() {
        let logits = [0.0, 2.0, 1.0, 1.9];
        assert!(sample(
            SampleParams {
                top_p: 1e-6,
                seed: 1,
                ..Default::default()
            },
            &logits,
            &[],
            10
        )
        .iter()
        .all(|&t| t == 1));
        // min_p 0.95: 1.9 (p ratio e^-0.1 = 0.905) is dropped.
        assert!(sample(
            SampleParams {
                min_p: 0.95,
                seed: 2,
                ..Default::default()
            },
            &logits,
            &[],
            20
        )
        .iter()
        .all(|&t| t == 1));
    }

    #[test]
    fn repetition_penalty_pushes_seen_tokens_down() {
        let logits = [0.0, 2.0, 1.95, -5.0];
        let greedy_like = SampleParams {
            top_k: 1,
            repetition_penalty: 2.0,
            ..Default::default()
        };
        assert_eq!(sample(greedy_like.clone(), &logits, &[], 1), vec![1]);
        assert_eq!(
            sample(greedy_like, &logits, &[1, 1], 1),
            vec![2],
            "token 1 (2.0 -> 1.0) falls below token 2"
        );
    }

    #[test]
    fn bad_parameters_are_rejected() {
        let check = |p: SampleParams| Sampling::Sample(p).validate().unwrap_err().to_string();
        assert!(check(SampleParams {
            temperature: 0.0,
            ..Default::default()
        })
        .contains("temperature"));
        assert!(check(SampleParams {
            top_p: 1.5,
            ..Default::default()
        })
        .contains("top_p"));
        assert!(check(SampleParams {
            min_p: 1.0,
            ..Default::default()
        })
        .contains("min_p"));
        assert!(check(SampleParams {
            repetition_penalty: 0.0,
            ..Default::default()
        })
        .contains("repetition_penalty"));
    }
}
