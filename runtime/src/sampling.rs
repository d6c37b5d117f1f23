//! Choosing the next token from logits: greedy, or seeded sampling with temperature, top-k and top-p.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::RuntimeError;

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (the first on ties), as transformers' greedy search.
    Greedy,
    /// A draw from the tempered, top-k and top-p filtered distribution.
    Sample {
        temperature: f32,
        /// Keep the k most likely tokens; 0 keeps all.
        top_k: usize,
        /// Keep the smallest set whose probability reaches top_p; 1 keeps all.
        top_p: f32,
        seed: u64,
    },
}

impl Sampling {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        if let Sampling::Sample {
            temperature, top_p, ..
        } = self
        {
            if !(temperature.is_finite() && *temperature > 0.0) {
                return Err(RuntimeError::Param(format!(
                    "temperature must be a positive number, got {temperature}"
                )));
            }
            if !(*top_p > 0.0 && *top_p <= 1.0) {
                return Err(RuntimeError::Param(format!(
                    "top_p must be in (0, 1], got {top_p}"
                )));
            }
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
            Sampling::Sample { seed, .. } => *seed,
            Sampling::Greedy => 0,
        };
        Sampler {
            sampling,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The next token for `logits`.
    pub fn next(&mut self, logits: &[f32]) -> i64 {
        match self.sampling {
            Sampling::Greedy => argmax(logits),
            Sampling::Sample {
                temperature,
                top_k,
                top_p,
                ..
            } => {
                let mut ranked: Vec<(usize, f32)> = logits
                    .iter()
                    .map(|&l| l / temperature)
                    .enumerate()
                    .collect();
                ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                if top_k > 0 {
                    ranked.truncate(top_k);
                }
                let max = ranked.first().map_or(0.0, |r| r.1);
                let mut probs: Vec<f32> = ranked.iter().map(|r| (r.1 - max).exp()).collect();
                let total: f32 = probs.iter().sum();
                probs.iter_mut().for_each(|p| *p /= total);
                let mut kept = 0;
                let mut mass = 0.0;
                for p in &probs {
                    kept += 1;
                    mass += p;
                    if mass >= top_p {
                        break;
                    }
                }
                let draw: f32 = self.rng.random::<f32>() * mass;
                let mut acc = 0.0;
                for (i, p) in probs[..kept].iter().enumerate() {
                    acc += p;
                    if draw < acc {
                        return ranked[i].0 as i64;
                    }
                }
                ranked[kept - 1].0 as i64
            }
        }
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

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(
            Sampler::new(Sampling::Greedy).next(&[0.1, 3.0, 3.0, -1.0]),
            1
        );
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let params = Sampling::Sample {
            temperature: 0.8,
            top_k: 5,
            top_p: 1.0,
            seed: 42,
        };
        let a: Vec<i64> = {
            let mut s = Sampler::new(params.clone());
            (0..20).map(|_| s.next(&logits)).collect()
        };
        let b: Vec<i64> = {
            let mut s = Sampler::new(params);
            (0..20).map(|_| s.next(&logits)).collect()
        };
        assert_eq!(a, b);
        let mut ranked: Vec<usize> = (0..50).collect();
        ranked.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]).then(x.cmp(&y)));
        assert!(
            a.iter().all(|t| ranked[..5].contains(&(*t as usize))),
            "{a:?}"
        );
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let logits = [0.0, 2.0, 1.0, 1.9];
        let mut s = Sampler::new(Sampling::Sample {
            temperature: 1.0,
            top_k: 0,
            top_p: 1e-6,
            seed: 1,
        });
        assert!((0..10).all(|_| s.next(&logits) == 1));
    }

    #[test]
    fn bad_parameters_are_rejected() {
        assert!(Sampling::Sample {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0
        }
        .validate()
        .is_err());
        assert!(Sampling::Sample {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.5,
            seed: 0
        }
        .validate()
        .is_err());
    }
}
