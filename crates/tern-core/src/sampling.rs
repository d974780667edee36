//! Turning logits into the next token: penalties, temperature, top-k, top-p, min-p and a
//! seeded RNG; plus log-probabilities with top-N alternatives.

use crate::rng::Rng;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// Divides positive / multiplies negative logits of every token seen (prompt and output).
    pub repetition_penalty: f32,
    /// OpenAI semantics: subtracted once from tokens already generated.
    pub presence_penalty: f32,
    /// OpenAI semantics: subtracted per occurrence in the generated tokens.
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }

    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!("temperature must be a finite number >= 0, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p must be in (0, 1], got {}", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            bail!("min_p must be in [0, 1], got {}", self.min_p);
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            bail!("repetition_penalty must be > 0, got {}", self.repetition_penalty);
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                bail!("{name} must be in [-2, 2], got {v}");
            }
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Log-probability of a chosen token and the most likely alternatives at that step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Occurrences of each generated token (for presence/frequency penalties).
    counts: HashMap<u32, u32>,
    /// Every token seen, prompt included (for the repetition penalty).
    seen: Vec<bool>,
    candidates: Vec<(u32, f32)>,
    dist: Vec<(u32, f64)>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32], vocab: usize) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
        let mut seen = vec![false; vocab];
        for &t in prompt {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        Ok(Sampler {
            params,
            rng: Rng::new(seed),
            counts: HashMap::new(),
            seen,
            candidates: Vec::new(),
            dist: Vec::new(),
        })
    }

    /// Records a generated token (for penalties).
    pub fn accept(&mut self, token: u32) {
        *self.counts.entry(token).or_default() += 1;
        if let Some(s) = self.seen.get_mut(token as usize) {
            *s = true;
        }
    }

    /// Greedy with no penalties: the token is the argmax of the raw logits.
    pub fn is_plain_greedy(&self) -> bool {
        let p = &self.params;
        p.is_greedy() && p.repetition_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0
    }

    /// Picks the next token; `logits` are modified in place (penalties, temperature).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        if self.params.is_greedy() {
            self.apply_penalties(logits);
            return argmax(logits);
        }
        let r = self.rng.next_f32() as f64;
        draw(self.distribution(logits), r)
    }

    /// The distribution the next token is drawn from: penalties, temperature, top-k, min-p and
    /// top-p applied, as (token, probability) summing to 1 (one token with probability 1 when
    /// greedy). `logits` are modified in place.
    pub fn distribution(&mut self, logits: &mut [f32]) -> &[(u32, f64)] {
        self.apply_penalties(logits);
        self.dist.clear();
        let p = &self.params;
        if p.is_greedy() {
            self.dist.push((argmax(logits), 1.0));
            return &self.dist;
        }
        let inv_t = 1.0 / p.temperature;
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l * inv_t)));
        let max = c.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
        let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            c.truncate(p.top_k);
        }
        // top-p measures mass against the distribution it sees: the top-k survivors (or all).
        let z: f64 = c.iter().map(|x| ((x.1 - max) as f64).exp()).sum();
        // min-p keeps tokens with p >= min_p * p_max, i.e. logit >= max + ln(min_p); top-p and
        // min-p each keep a prefix of the sorted tokens, so filtering first gives the same set.
        if p.min_p > 0.0 {
            let threshold = max + p.min_p.ln();
            c.retain(|x| x.1 >= threshold);
        }
        if p.top_p < 1.0 {
            // The nucleus usually lies within the first few hundred tokens: sort a head first.
            let head = 1024.min(c.len());
            if head < c.len() {
                c.select_nth_unstable_by(head - 1, by_logit_desc);
            }
            c[..head].sort_unstable_by(by_logit_desc);
            let head_mass: f64 = c[..head].iter().map(|x| ((x.1 - max) as f64).exp()).sum();
            if head_mass / z < p.top_p as f64 {
                c.sort_unstable_by(by_logit_desc);
            }
            let mut cum = 0.0f64;
            let mut keep = c.len();
            for (i, x) in c.iter().enumerate() {
                cum += ((x.1 - max) as f64).exp() / z;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
        let total: f64 = c.iter().map(|x| ((x.1 - max) as f64).exp()).sum();
        self.dist.extend(c.iter().map(|&(id, l)| (id, ((l - max) as f64).exp() / total)));
        &self.dist
    }

    /// The sampling settings.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// A uniform number in [0, 1) from this request's generator (speculative acceptance tests).
    pub fn uniform(&mut self) -> f64 {
        self.rng.next_f32() as f64
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for (l, _) in logits.iter_mut().zip(&self.seen).filter(|(_, &s)| s) {
                *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
    }
}

/// The token at cumulative probability `r` ∈ [0, 1) of `dist` (the last one if rounding leaves
/// `r` past the end).
pub fn draw(dist: &[(u32, f64)], mut r: f64) -> u32 {
    for &(id, p) in dist {
        if r < p {
            return id;
        }
        r -= p;
    }
    dist.last().map_or(0, |x| x.0)
}

/// Index of the largest logit (the lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// log_softmax(logits)[token] and the `top_n` most likely tokens, from raw model logits.
pub fn logprobs(logits: &[f32], token: u32, top_n: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = (logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>()).ln() as f32 + max;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(top_n);
    if top_n > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let n = top_n.min(idx.len());
        let cmp = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        if n < idx.len() {
            idx.select_nth_unstable_by(n - 1, cmp);
        }
        idx.truncate(n);
        idx.sort_unstable_by(cmp);
        top.extend(idx.iter().map(|&i| (i, logits[i as usize] - log_sum)));
    }
    TokenLogprob { token, logprob: logits[token as usize] - log_sum, top }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams { temperature: t, seed: Some(42), ..Default::default() }
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy(), &[], 4).unwrap();
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0, 3.0]), 1);
    }

    #[test]
    fn same_seed_same_samples() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = || {
            let mut s = Sampler::new(params(1.0), &[], 50).unwrap();
            (0..20).map(|_| s.sample(&mut logits.clone())).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
        assert!(run().iter().collect::<std::collections::HashSet<_>>().len() > 3);
    }

    #[test]
    fn top_k_and_top_p_restrict_support() {
        let logits = [5.0, 4.0, 3.0, 0.0, -1.0];
        let mut s = Sampler::new(SamplingParams { top_k: 2, ..params(1.0) }, &[], 5).unwrap();
        assert!((0..200).all(|_| s.sample(&mut logits.clone()) < 2));
        // probabilities ≈ .665 .245 .09 ...: top_p 0.8 keeps the first two.
        let mut s = Sampler::new(SamplingParams { top_p: 0.8, ..params(1.0) }, &[], 5).unwrap();
        assert!((0..200).all(|_| s.sample(&mut logits.clone()) < 2));
        let mut s = Sampler::new(SamplingParams { min_p: 0.3, ..params(1.0) }, &[], 5).unwrap();
        assert!((0..200).all(|_| s.sample(&mut logits.clone()) < 2));
    }

    #[test]
    fn sampling_frequencies_follow_softmax() {
        let logits = [1.0f32, 0.0, -1.0];
        let mut s = Sampler::new(params(1.0), &[], 3).unwrap();
        let mut counts = [0usize; 3];
        let n = 20_000;
        for _ in 0..n {
            counts[s.sample(&mut logits.clone()) as usize] += 1;
        }
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for (c, l) in counts.iter().zip(logits) {
            assert!((*c as f32 / n as f32 - l.exp() / z).abs() < 0.015, "{counts:?}");
        }
    }

    #[test]
    fn penalties_change_logits() {
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                presence_penalty: 1.0,
                frequency_penalty: 0.5,
                ..SamplingParams::greedy()
            },
            &[0],
            3,
        )
        .unwrap();
        s.accept(1);
        s.accept(1);
        let mut l = [4.0, 4.0, -1.0];
        s.apply_penalties(&mut l);
        assert_eq!(l, [2.0, 4.0 / 2.0 - 1.0 - 1.0, -1.0]);
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        for (p, msg) in [
            (SamplingParams { temperature: -1.0, ..Default::default() }, "temperature"),
            (SamplingParams { temperature: f32::NAN, ..Default::default() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p"),
            (SamplingParams { top_p: 1.5, ..Default::default() }, "top_p"),
            (SamplingParams { min_p: -0.1, ..Default::default() }, "min_p"),
            (SamplingParams { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty"),
            (SamplingParams { presence_penalty: 3.0, ..Default::default() }, "presence_penalty"),
        ] {
            let err = p.validate().unwrap_err().to_string();
            assert!(err.contains(msg), "{err}");
        }
    }

    #[test]
    fn logprobs_are_normalized_and_sorted() {
        let lp = logprobs(&[1.0, 3.0, 2.0], 2, 2);
        let z = (1f32.exp() + 3f32.exp() + 2f32.exp()).ln();
        assert!((lp.logprob - (2.0 - z)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
    }
}
