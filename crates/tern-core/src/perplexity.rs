//! Perplexity of a model on a text: non-overlapping windows of `ctx` tokens, every predicted
//! token of a window scored. `reference/perplexity.py` runs the same procedure in transformers.
//!
//! The whole text is tokenized once without special tokens. Window w holds tokens
//! `w·ctx .. (w+1)·ctx`. A model that expects BOS sees `[BOS] + window` and all `ctx` tokens
//! are scored; otherwise it sees the window and tokens 1.. are scored (`ctx − 1`).

use crate::model::decoder::{Decoder, LogitsFor};
use crate::model::kv_cache::KvDtype;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};

/// Negative log-likelihood sums of one window (natural log).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WindowScore {
    pub n: usize,
    pub sum_nll: f64,
    pub sum_sq_nll: f64,
}

/// Perplexity over windows, with the standard error of the mean negative log-likelihood
/// carried to the perplexity (ppl · stderr of the mean).
#[derive(Clone, Debug)]
pub struct Perplexity {
    pub tokens_scored: usize,
    pub mean_nll: f64,
    pub ppl: f64,
    pub ppl_stderr: f64,
}

impl Perplexity {
    pub fn from_windows(windows: &[WindowScore]) -> Result<Perplexity> {
        let n: usize = windows.iter().map(|w| w.n).sum();
        if n < 2 {
            bail!("perplexity needs at least 2 scored tokens, got {n}");
        }
        let sum: f64 = windows.iter().map(|w| w.sum_nll).sum();
        let sum_sq: f64 = windows.iter().map(|w| w.sum_sq_nll).sum();
        let mean = sum / n as f64;
        let var = ((sum_sq - n as f64 * mean * mean) / (n - 1) as f64).max(0.0);
        let ppl = mean.exp();
        Ok(Perplexity { tokens_scored: n, mean_nll: mean, ppl, ppl_stderr: ppl * (var / n as f64).sqrt() })
    }
}

/// The windows of `tokens` (at most `max_windows`), each `ctx` tokens long.
pub fn windows(tokens: &[u32], ctx: usize, max_windows: Option<usize>) -> Result<Vec<&[u32]>> {
    if ctx < 2 {
        bail!("--ctx must be at least 2, got {ctx}");
    }
    let n = (tokens.len() / ctx).min(max_windows.unwrap_or(usize::MAX));
    if n == 0 {
        bail!("the text has {} tokens, fewer than one window of {ctx}", tokens.len());
    }
    Ok(tokens.chunks_exact(ctx).take(n).collect())
}

/// Tokenizes `text` as the procedure does and checks the window fits the model's context.
pub fn tokenize(tokenizer: &Tokenizer, text: &str, ctx: usize, max_context: usize) -> Result<Vec<u32>> {
    let bos = usize::from(tokenizer.add_bos);
    if ctx + bos > max_context {
        bail!("--ctx {ctx} (+{bos} BOS) exceeds the model's context of {max_context} tokens");
    }
    tokenizer.encode(text, false)
}

/// Scores one window on a fresh cache whose K/V rows are stored as `kv`.
pub fn score_window(decoder: &mut Decoder, window: &[u32], bos: Option<u32>, kv: KvDtype) -> Result<WindowScore> {
    let input: Vec<u32> = bos.into_iter().chain(window.iter().copied()).collect();
    let mut cache = decoder.new_cache_of(input.len(), kv);
    let mut logits = Vec::new();
    decoder.forward(&input, &mut cache, LogitsFor::All, &mut logits)?;
    let vocab = decoder.config().vocab_size;
    // Row r predicts input[r + 1]; without BOS the first window token has no prediction.
    let mut s = WindowScore { n: 0, sum_nll: 0.0, sum_sq_nll: 0.0 };
    for (r, &target) in input.iter().enumerate().skip(1) {
        let row = &logits[(r - 1) * vocab..r * vocab];
        let nll = -log_softmax_at(row, target as usize);
        if !nll.is_finite() {
            bail!("non-finite log-likelihood at window position {r}");
        }
        s.n += 1;
        s.sum_nll += nll;
        s.sum_sq_nll += nll * nll;
    }
    Ok(s)
}

/// log softmax(row)[i] in f64.
fn log_softmax_at(row: &[f32], i: usize) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    row[i] as f64 - max - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_of_known_values() {
        // nll values 1, 2, 3 and 4 in two windows: mean 2.5, sample variance 5/3.
        let w =
            [WindowScore { n: 2, sum_nll: 3.0, sum_sq_nll: 5.0 }, WindowScore { n: 2, sum_nll: 7.0, sum_sq_nll: 25.0 }];
        let p = Perplexity::from_windows(&w).unwrap();
        assert_eq!(p.tokens_scored, 4);
        assert!((p.mean_nll - 2.5).abs() < 1e-12);
        assert!((p.ppl - 2.5f64.exp()).abs() < 1e-9);
        assert!((p.ppl_stderr - 2.5f64.exp() * (5.0 / 3.0 / 4.0f64).sqrt()).abs() < 1e-9);
        assert!(Perplexity::from_windows(&w[..0]).is_err());
    }

    #[test]
    fn windows_do_not_overlap_and_drop_the_tail() {
        let t: Vec<u32> = (0..10).collect();
        let w = windows(&t, 4, None).unwrap();
        assert_eq!(w, vec![&[0, 1, 2, 3][..], &[4, 5, 6, 7][..]]);
        assert_eq!(windows(&t, 4, Some(1)).unwrap().len(), 1);
        assert!(windows(&t, 11, None).is_err());
        assert!(windows(&t, 1, None).is_err());
    }

    #[test]
    fn log_softmax_matches_the_definition() {
        let row = [1.0f32, 2.0, 3.0];
        let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
        assert!((log_softmax_at(&row, 1) - (2.0 - z.ln())).abs() < 1e-12);
    }
}
