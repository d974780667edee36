//! Calibration statistics of a layer's matrix-product inputs, gathered by running the
//! full-precision model over calibration text (every layer sees the unquantized model's
//! activations): the Hessian Σ x·xᵀ for GPTQ, mean |x| per channel and a sample of rows for AWQ,
//! the largest |x| per channel for LLM.int8().

use crate::kernels::ThreadPool;
use crate::model::decoder::{Decoder, LinearInput};

/// What to gather.
#[derive(Clone, Copy, Debug)]
pub struct Wanted {
    pub hessian: bool,
    /// Rows kept per input for AWQ's search (0: none, and no mean |x|), spread evenly over the
    /// calibration windows.
    pub sample_rows: usize,
    /// Largest |x| per channel (LLM.int8()'s outlier features).
    pub abs_max: bool,
}

/// Statistics of one input (one layer, one `LinearInput`).
#[derive(Default)]
pub struct InputStats {
    pub width: usize,
    pub tokens: usize,
    /// Lower triangle filled, f32 sums (cols × cols).
    pub hessian: Vec<f32>,
    pub abs_sum: Vec<f64>,
    pub abs_max: Vec<f32>,
    pub sample: Vec<f32>,
}

impl InputStats {
    /// The full symmetric Hessian in f64.
    pub fn hessian_f64(&self) -> Vec<f64> {
        let n = self.width;
        (0..n * n).map(|e| self.hessian[(e / n).max(e % n) * n + (e / n).min(e % n)] as f64).collect()
    }

    pub fn mean_abs(&self) -> Vec<f32> {
        self.abs_sum.iter().map(|&s| (s / self.tokens.max(1) as f64) as f32).collect()
    }

    pub fn sample_rows(&self) -> usize {
        self.sample.len() / self.width.max(1)
    }
}

pub const INPUTS: [LinearInput; 4] = [LinearInput::Attention, LinearInput::Output, LinearInput::Ffn, LinearInput::Down];

fn index(which: LinearInput) -> usize {
    INPUTS.iter().position(|&i| i == which).expect("every input is listed")
}

/// Per layer, per `INPUTS` entry.
pub struct Calibration {
    pub layers: Vec<[InputStats; 4]>,
}

impl Calibration {
    pub fn get(&self, layer: usize, which: LinearInput) -> &InputStats {
        &self.layers[layer][index(which)]
    }
}

/// Runs `windows` through `decoder` (each on a fresh cache), gathering `wanted`; `progress`
/// gets the number of windows done.
pub fn gather(
    decoder: &mut Decoder,
    windows: &[&[u32]],
    wanted: Wanted,
    pool: &ThreadPool,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<Calibration> {
    let n_layers = decoder.config().n_layers;
    let mut cal = Calibration { layers: (0..n_layers).map(|_| Default::default()).collect() };
    let per_window = wanted.sample_rows.div_ceil(windows.len().max(1));
    for (wi, w) in windows.iter().enumerate() {
        let mut cache = decoder.new_cache(w.len());
        let mut logits = Vec::new();
        let chunk = crate::model::decoder::SeqChunk { seq: 0, tokens: w, pos0: 0, logits: None };
        let n = w.len();
        let mut observe = |li: usize, which: LinearInput, rows: &[f32]| {
            let s = &mut cal.layers[li][index(which)];
            add_rows(s, rows, n, wanted, (wi, per_window), pool);
        };
        decoder.forward_batch_observed(&[chunk], &mut cache, &mut logits, Some(&mut observe))?;
        progress(wi + 1);
    }
    Ok(cal)
}

/// Adds the n rows of calibration window number `window` to `s`; at most `per_window` of them
/// join the sample. The first position of a window matters to the sample: where a model uses
/// it as an attention sink its activations are outsized, and they meet the few large weights
/// that must not be clipped.
pub fn add_rows(
    s: &mut InputStats,
    rows: &[f32],
    n: usize,
    wanted: Wanted,
    (window, per_window): (usize, usize),
    pool: &ThreadPool,
) {
    let k = rows.len() / n;
    if s.width == 0 {
        s.width = k;
        if wanted.hessian {
            s.hessian = vec![0.0; k * k];
        }
        if wanted.sample_rows > 0 {
            s.abs_sum = vec![0.0; k];
        }
        if wanted.abs_max {
            s.abs_max = vec![0.0; k];
        }
    }
    if wanted.abs_max {
        for row in rows.chunks_exact(k) {
            s.abs_max.iter_mut().zip(row).for_each(|(m, &v)| *m = m.max(v.abs()));
        }
    }
    s.tokens += n;
    if wanted.sample_rows > 0 {
        for row in rows.chunks_exact(k) {
            s.abs_sum.iter_mut().zip(row).for_each(|(a, &v)| *a += v.abs() as f64);
        }
        let keep = per_window.min(wanted.sample_rows - s.sample_rows()).min(n);
        // Evenly spaced, from a phase that moves with the window: each position of a window is
        // sampled as often as any other (the first one included, but not in every window, where
        // it would be over-represented).
        let phase = n.checked_div(keep).map_or(0, |stride| window * 7919 % stride);
        for j in 0..keep {
            let t = phase + j * n / keep;
            s.sample.extend_from_slice(&rows[t * k..(t + 1) * k]);
        }
    }
    if wanted.hessian {
        // H[i][j] += Σ_t x_t[i]·x_t[j] (lower triangle), as dots of the transposed rows; threads
        // take interleaved i so their shares of the triangle are even.
        let xt: Vec<f32> = (0..k * n).map(|e| rows[(e % n) * k + e / n]).collect();
        let h = Shared(s.hessian.as_mut_ptr());
        pool.run(|t, nt| {
            let h = &h;
            for i in (t..k).step_by(nt) {
                let xi = &xt[i * n..(i + 1) * n];
                for j in 0..=i {
                    // SAFETY: row i of H belongs to one thread.
                    unsafe { *h.0.add(i * k + j) += crate::model::ops::dot(xi, &xt[j * n..(j + 1) * n]) };
                }
            }
        });
    }
}

struct Shared(*mut f32);
// SAFETY: threads write disjoint rows.
unsafe impl Sync for Shared {}
