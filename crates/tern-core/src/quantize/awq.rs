//! AWQ (Lin et al. 2023): the input channels that carry large activations matter most, so
//! scale them up before quantizing (W·diag(s)) and fold 1/s into whatever produces the input.
//! s = mean|x|^α per input channel (normalized so √(max·min) = 1); α is searched on a grid
//! over [0, 1] for the smallest output error ‖X·Ŵᵀ − X·Wᵀ‖² on calibration rows, where Ŵ is the
//! group-wise round-to-nearest of W·diag(s) scaled back. (The published method also searches
//! a clipping range per group; this implementation does not.)

use super::int4::rtn;

/// Grid points of α in [0, 1].
const ALPHA_STEPS: usize = 20;

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
    let reference: Vec<Vec<f32>> = ws.iter().map(|w| matmul_t(x, n, cols, w)).collect();
    let mut best = (f64::INFINITY, vec![1.0; cols], 0.0);
    for step in 0..=ALPHA_STEPS {
        let alpha = step as f32 / ALPHA_STEPS as f32;
        let s = scales(mean_abs, alpha);
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

/// mean|x|^α, normalized to a geometric middle of 1 and kept away from 0.
pub fn scales(mean_abs: &[f32], alpha: f32) -> Vec<f32> {
    let s: Vec<f32> = mean_abs.iter().map(|&a| a.max(1e-4).powf(alpha)).collect();
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
