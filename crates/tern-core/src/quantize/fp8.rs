//! FP8 E4M3 weights: w ≈ s·e4m3(w / s) with s = max|w| / 448 per output row (channel) or for
//! the whole matrix (tensor).

use crate::kernels::{e4m3_from_f32, e4m3_to_f32, E4M3_MAX};

/// The codes (row-major) and scales (`rows` of them, or one) of a rows × cols matrix.
pub fn e4m3(w: &[f32], cols: usize, per_tensor: bool) -> (Vec<u8>, Vec<f32>) {
    let amax = |v: &[f32]| v.iter().fold(0f32, |m, &x| m.max(x.abs()));
    let scales: Vec<f32> =
        if per_tensor { vec![amax(w) / E4M3_MAX] } else { w.chunks_exact(cols).map(|r| amax(r) / E4M3_MAX).collect() };
    let mut codes = Vec::with_capacity(w.len());
    for (r, row) in w.chunks_exact(cols).enumerate() {
        let s = scales[if per_tensor { 0 } else { r }];
        // Dividing (not multiplying by 1/s) gives exactly torch's `(w / s).to(float8_e4m3fn)`.
        codes.extend(row.iter().map(|&v| if s > 0.0 { e4m3_from_f32(v / s) } else { 0 }));
    }
    (codes, scales)
}

/// The weights the codes and scales stand for.
pub fn dequantize(codes: &[u8], scales: &[f32], cols: usize) -> Vec<f32> {
    codes
        .chunks_exact(cols)
        .enumerate()
        .flat_map(|(r, row)| {
            let s = scales[if scales.len() == 1 { 0 } else { r }];
            row.iter().map(move |&c| s * e4m3_to_f32(c))
        })
        .collect()
}
