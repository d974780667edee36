//! AWQ (Lin et al. 2023): the input channels that carry large activations matter most, so
//! scale them up before quantizing (W·diag(s)) and fold 1/s into whatever produces the input.
//! s = mean|x|^α / mean|ŵ|^(1−α) per input channel, ŵ the weights relative to their group's
//! largest |w| (AutoAWQ's default "duo" scaling; normalized so √(max·min) = 1); α is searched on
//! a grid over [0, 1] for the smallest output error ‖X·Ŵᵀ − X·Wᵀ‖² on calibration rows, where Ŵ
//! is the group-wise round-to-nearest of W·diag(s) scaled back. Optionally (`--awq-clip`), as
//! published, a clipping range per (row, group) of the scaled weights: clamped to ±r·max|w| for
//! the shrink ratio r with the smallest output error on the calibration rows (`clip`).

use super::int4::{rtn, Grid};
use crate::kernels::ThreadPool;

/// Grid points of α in [0, 1].
const ALPHA_STEPS: usize = 20;
/// Most calibration rows the α search measures on.
const SEARCH_ROWS: usize = 128;

/// The scales for matrices `ws` (each out_j × cols, row-major) that share inputs `x`
/// (n × cols) with mean absolute values `mean_abs`; returns (scales, α).
pub fn search_scales(
    x: &[f32],
    n: usize,
    cols: usize,
    mean_abs: &[f32],
    ws: &[&[f32]],
    group: usize,
) -> (Vec<f32>, f32) {
    // Every α costs a quantization and a product per row of x: an evenly spaced subset of at
    // most SEARCH_ROWS rows measures them.
    let picked: Vec<f32>;
    let (x, n) = if n > SEARCH_ROWS {
        picked = (0..SEARCH_ROWS).flat_map(|j| x[j * n / SEARCH_ROWS * cols..][..cols].iter().copied()).collect();
        (&picked[..], SEARCH_ROWS)
    } else {
        (x, n)
    };
    let reference: Vec<Vec<f32>> = ws.iter().map(|w| matmul_t(x, n, cols, w)).collect();
    let w_mean = relative_weight_means(ws, cols, group);
    let mut best = (f64::INFINITY, vec![1.0; cols], 0.0);
    for step in 0..=ALPHA_STEPS {
        let alpha = step as f32 / ALPHA_STEPS as f32;
        let s = scales(mean_abs, &w_mean, alpha);
        let mut err = 0f64;
        for (w, want) in ws.iter().zip(&reference) {
            let approx = fake_quantize(w, cols, &s, group);
            let got = matmul_t(x, n, cols, &approx);
            err += got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
        }
        if err < best.0 {
            best = (err, s, alpha);
        }
    }
    (best.1, best.2)
}

/// Per input channel, the mean over all rows of `ws` of |w| / (the largest |w| of its group).
fn relative_weight_means(ws: &[&[f32]], cols: usize, group: usize) -> Vec<f32> {
    let mut sum = vec![0f64; cols];
    let mut rows = 0;
    for w in ws {
        for row in w.chunks_exact(cols) {
            for (g, chunk) in row.chunks(group).enumerate() {
                let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs())) + 1e-6;
                for (j, v) in chunk.iter().enumerate() {
                    sum[g * group + j] += (v.abs() / amax) as f64;
                }
            }
            rows += 1;
        }
    }
    sum.iter().map(|&v| (v / rows.max(1) as f64) as f32).collect()
}

/// mean|x|^α / mean|ŵ|^(1−α), normalized to a geometric middle of 1 and kept away from 0.
fn scales(mean_abs: &[f32], w_mean: &[f32], alpha: f32) -> Vec<f32> {
    let s: Vec<f32> =
        mean_abs.iter().zip(w_mean).map(|(&a, &w)| (a.powf(alpha) / (w.powf(1.0 - alpha) + 1e-4)).max(1e-4)).collect();
    let (lo, hi) = s.iter().fold((f32::MAX, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let norm = (lo * hi).sqrt();
    s.iter().map(|&v| (v / norm).max(1e-4)).collect()
}

/// W·diag(s), quantized group-wise and scaled back by 1/s: what the model computes with.
fn fake_quantize(w: &[f32], cols: usize, s: &[f32], group: usize) -> Vec<f32> {
    let scaled: Vec<f32> = w.iter().enumerate().map(|(e, &v)| v * s[e % cols]).collect();
    let q = rtn(&scaled, w.len() / cols, cols, group).dequantize();
    q.iter().enumerate().map(|(e, &v)| v / s[e % cols]).collect()
}

/// Shrink ratios tried by `clip`: 1, 0.95, ..., 0.55 of a group's largest |w| (AutoAWQ's grid).
const CLIP_STEPS: usize = 10;

/// AWQ's clipping search. For each (row, group) of `w` (rows × cols, the weights as they will be
/// quantized, i.e. already scaled), clamps the group to ±r·max|w_g| for the ratio r whose
/// round-to-nearest grid gives the smallest output error eᵀ·H_g·e on the calibration rows `x`
/// (n × cols, the inputs those weights see), e = w_g − its dequantized codes and H_g = X_gᵀX_g
/// the rows' Gram matrix over the group's columns. The clamped values then quantize to that grid.
pub fn clip(w: &mut [f32], cols: usize, group: usize, x: &[f32], n: usize, pool: &ThreadPool) {
    let groups = cols.div_ceil(group);
    // H_g from the group's columns, transposed so that each entry is one dot product.
    let grams: Vec<Vec<f32>> = (0..groups)
        .map(|g| {
            let (c0, gw) = (g * group, group.min(cols - g * group));
            let xt: Vec<f32> = (0..gw * n).map(|e| x[(e % n) * cols + c0 + e / n]).collect();
            (0..gw * gw).map(|e| crate::model::ops::dot(&xt[(e / gw) * n..][..n], &xt[(e % gw) * n..][..n])).collect()
        })
        .collect();
    let rows = w.len() / cols;
    let wp = SharedRows(w.as_mut_ptr());
    pool.run(|t, nt| {
        let wp = &wp;
        let mut e = vec![0f32; group];
        for r in (t..rows).step_by(nt) {
            // SAFETY: row r belongs to this thread alone.
            let row = unsafe { std::slice::from_raw_parts_mut(wp.0.add(r * cols), cols) };
            for (g, h) in grams.iter().enumerate() {
                let wg = &mut row[g * group..(g * group + group).min(cols)];
                let (lo, hi) = wg.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                let amax = lo.abs().max(hi.abs());
                let mut best = (f64::INFINITY, lo, hi);
                for step in 0..CLIP_STEPS {
                    let bound = amax * (1.0 - step as f32 / (2 * CLIP_STEPS) as f32);
                    let (clo, chi) = (lo.max(-bound), hi.min(bound));
                    let grid = Grid::for_range(clo, chi);
                    for (ev, &v) in e.iter_mut().zip(wg.iter()) {
                        *ev = v - grid.value(grid.code(v));
                    }
                    let gw = wg.len();
                    let err: f64 = (0..gw)
                        .map(|a| e[a] as f64 * crate::model::ops::dot(&h[a * gw..(a + 1) * gw], &e[..gw]) as f64)
                        .sum();
                    if err < best.0 {
                        best = (err, clo, chi);
                    }
                }
                wg.iter_mut().for_each(|v| *v = v.clamp(best.1, best.2));
            }
        }
    });
}

struct SharedRows(*mut f32);
// SAFETY: threads write disjoint rows.
unsafe impl Sync for SharedRows {}

/// x (n × k) · wᵀ (w: m × k) → n × m.
fn matmul_t(x: &[f32], n: usize, k: usize, w: &[f32]) -> Vec<f32> {
    let m = w.len() / k;
    let mut y = vec![0f32; n * m];
    for i in 0..n {
        let xi = &x[i * k..(i + 1) * k];
        for (j, wj) in w.chunks_exact(k).enumerate() {
            y[i * m + j] = crate::model::ops::dot(xi, wj);
        }
    }
    y
}
