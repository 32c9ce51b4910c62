//! Choosing the next token from logits: greedy, or seeded temperature sampling restricted by
//! top-k and top-p. Deterministic for a given seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{ModelError, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0 = all).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

impl Sampling {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return Err(ModelError::Input(format!(
                "temperature = {} must be between 0 and 100",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Input(format!(
                "top_p = {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

pub struct Sampler {
    cfg: Sampling,
    rng: StdRng,
}

impl Sampler {
    pub fn new(cfg: Sampling) -> Result<Self> {
        cfg.validate()?;
        let rng = StdRng::seed_from_u64(cfg.seed);
        Ok(Self { cfg, rng })
    }

    /// Picks a token id from `logits` (one row, length vocab).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.cfg.temperature;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l * inv_t))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        // Stable order (by logit, then id) keeps sampling reproducible across platforms.
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.cfg.top_k > 0 {
            cand.truncate(self.cfg.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.cfg.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, p) in probs.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[cand.len() - 1].0
    }
}

/// Index of the largest logit; the first one on ties (NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest() {
        let mut s = Sampler::new(Sampling::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_limits_choice() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let cfg = Sampling {
            temperature: 1.5,
            top_p: 1.0,
            top_k: 3,
            seed: 7,
        };
        let run = |cfg: &Sampling| {
            let mut s = Sampler::new(cfg.clone()).unwrap();
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = run(&cfg);
        assert_eq!(a, run(&cfg));
        let mut top3: Vec<u32> = (0..50u32).collect();
        top3.sort_by(|&x, &y| logits[y as usize].total_cmp(&logits[x as usize]));
        top3.truncate(3);
        assert!(a.iter().all(|t| top3.contains(t)), "{a:?} outside {top3:?}");
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert!(distinct.len() > 1, "temperature sampling never varied");
        let other = run(&Sampling { seed: 8, ..cfg });
        assert_ne!(a, other);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // p = softmax([10, 9, 0, ...]): the first two hold > 0.99 of the mass.
        let mut logits = vec![0.0f32; 20];
        logits[4] = 10.0;
        logits[11] = 9.0;
        let mut s = Sampler::new(Sampling {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 0,
            seed: 1,
        })
        .unwrap();
        for _ in 0..100 {
            let t = s.sample(&logits);
            assert!(t == 4 || t == 11, "sampled {t} outside the nucleus");
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        let e = Sampler::new(Sampling {
            top_p: 0.0,
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("top_p = 0"), "{e}");
        assert!(
            Sampler::new(Sampling {
                temperature: f32::NAN,
                ..Default::default()
            })
            .is_err()
        );
    }
}
