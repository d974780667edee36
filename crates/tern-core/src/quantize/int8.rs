//! Per-output-channel symmetric int8: w ≈ s·q with q ∈ −127..=127 and one scale per row,
//! written as GGUF Q8_0 blocks that all carry their row's f16 scale (so any Q8_0 reader loads
//! it; `int8`), or as plain I8 rows with f32 scales beside them (`w8a8`).

use half::f16;

/// Q8_0 blocks of a row-major matrix quantized with one scale per row.
pub fn per_channel_q8_0(w: &[f32], cols: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(w.len() / 32 * 34);
    for row in w.chunks_exact(cols) {
        let amax = row.iter().fold(0f32, |m, &v| m.max(v.abs()));
        let s = f16::from_f32(amax / 127.0);
        let sf = s.to_f32();
        for blk in row.chunks_exact(32) {
            out.extend(s.to_le_bytes());
            out.extend(
                blk.iter().map(|&v| if sf == 0.0 { 0 } else { (v / sf).round().clamp(-127.0, 127.0) as i8 as u8 }),
            );
        }
    }
    out
}

/// I8 rows (q as bytes) and their f32 scales s = max|w| / 127.
pub fn per_channel_i8(w: &[f32], cols: usize) -> (Vec<u8>, Vec<f32>) {
    let mut q = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(w.len() / cols);
    for row in w.chunks_exact(cols) {
        let s = row.iter().fold(0f32, |m, &v| m.max(v.abs())) / 127.0;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        q.extend(row.iter().map(|&v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8));
        scales.push(s);
    }
    (q, scales)
}
