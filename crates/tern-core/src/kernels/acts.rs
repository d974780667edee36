//! Activation quantization (as llama.cpp does it), into a reusable buffer.
//!
//! The activation format follows the weight type:
//! - Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 weights: blocks of 32 int8 with scale `d = amax/127` (rounded
//!   through f16 like ggml's Q8_0/Q8_1) and `s = d * sum(q)` (Q8_1's sum; it turns the
//!   weights' offset/min into one multiply per block instead of per element).
//! - K-quant weights: Q8_K, super-blocks of 256 int8 with f32 scale and 16 int16 sums of 16.
//! - I8 weights (W8A8): one int8 scale per row (per token), `d = amax/127` over all k, so the
//!   whole row's product is one integer dot.
//! - F32/F16/BF16/F8E4M3 weights: plain f32 copies.

use super::cpu::{cpu_level, CpuLevel};
use super::dtype::{DType, QK, QK_K};
use super::thread_pool::ThreadPool;
use anyhow::{ensure, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActFormat {
    Empty,
    F32,
    /// 32-element blocks: `qs`, `d`, `s`.
    Q8x32,
    /// 256-element super-blocks: `qs`, `d`, `bsums`.
    Q8K,
    /// One scale per row: `qs`, `d`.
    Q8Row,
}

pub(crate) fn act_format(weight_dtype: DType) -> ActFormat {
    match weight_dtype {
        DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3 => ActFormat::F32,
        DType::I8 => ActFormat::Q8Row,
        DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => ActFormat::Q8x32,
        DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K => ActFormat::Q8K,
    }
}

/// Activation rows quantized for one weight dtype; owns a reusable buffer (no allocation per
/// call once sized).
#[derive(Debug, Clone)]
pub struct QuantizedActs {
    pub(crate) format: ActFormat,
    pub(crate) n_rows: usize,
    pub(crate) k: usize,
    /// F32 format: n_rows × k.
    pub(crate) f: Vec<f32>,
    /// Quantized values, n_rows × k.
    pub(crate) qs: Vec<i8>,
    /// Per-block scales, n_rows × (k / block).
    pub(crate) d: Vec<f32>,
    /// Q8x32: per-block `d * sum(q)`, n_rows × (k / 32).
    pub(crate) s: Vec<f32>,
    /// Q8K: per-16 sums of q, n_rows × (k / 256) × 16.
    pub(crate) bsums: Vec<i16>,
}

impl Default for QuantizedActs {
    fn default() -> Self {
        Self::new()
    }
}

impl QuantizedActs {
    pub fn new() -> Self {
        QuantizedActs {
            format: ActFormat::Empty,
            n_rows: 0,
            k: 0,
            f: Vec::new(),
            qs: Vec::new(),
            d: Vec::new(),
            s: Vec::new(),
            bsums: Vec::new(),
        }
    }

    pub fn n_rows(&self) -> usize {
        self.n_rows
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Whether these activations are in the format `weight_dtype` needs.
    pub fn matches(&self, weight_dtype: DType) -> bool {
        self.format != ActFormat::Empty && self.format == act_format(weight_dtype)
    }

    /// Quantizes `x` (n_rows × k, row-major) for multiplying with `weight_dtype` weights.
    pub fn quantize(&mut self, weight_dtype: DType, x: &[f32], n_rows: usize, k: usize) -> Result<()> {
        self.prepare(weight_dtype, x, n_rows, k)?;
        // SAFETY: prepare sized every buffer for n_rows rows.
        unsafe { self.out().quantize_rows(x, 0..n_rows) };
        Ok(())
    }

    /// Like `quantize`, with the rows split over the pool's threads (worth it for prefill).
    pub fn quantize_parallel(
        &mut self,
        pool: &ThreadPool,
        weight_dtype: DType,
        x: &[f32],
        n_rows: usize,
        k: usize,
    ) -> Result<()> {
        self.prepare(weight_dtype, x, n_rows, k)?;
        let out = self.out();
        let nt = pool.n_threads();
        if nt == 1 || n_rows < 2 * nt {
            unsafe { out.quantize_rows(x, 0..n_rows) };
            return Ok(());
        }
        pool.run(|ti, nt| {
            let per = n_rows.div_ceil(nt);
            let r0 = (ti * per).min(n_rows);
            let r1 = ((ti + 1) * per).min(n_rows);
            // SAFETY: threads write disjoint row ranges of buffers sized by prepare.
            unsafe { out.quantize_rows(x, r0..r1) };
        });
        Ok(())
    }

    fn out(&mut self) -> RowsOut {
        RowsOut {
            format: self.format,
            k: self.k,
            f: self.f.as_mut_ptr(),
            qs: self.qs.as_mut_ptr(),
            d: self.d.as_mut_ptr(),
            s: self.s.as_mut_ptr(),
            bsums: self.bsums.as_mut_ptr(),
        }
    }

    fn prepare(&mut self, weight_dtype: DType, x: &[f32], n_rows: usize, k: usize) -> Result<()> {
        let bl = weight_dtype.block_len();
        ensure!(k.is_multiple_of(bl), "activations for {weight_dtype}: k={k} is not a multiple of {bl}");
        ensure!(
            n_rows.checked_mul(k) == Some(x.len()),
            "activations: x has {} values, expected n_rows*k = {n_rows}*{k}",
            x.len()
        );
        self.format = act_format(weight_dtype);
        self.n_rows = n_rows;
        self.k = k;
        let n = n_rows * k;
        match self.format {
            ActFormat::F32 => resize(&mut self.f, n, 0.0),
            ActFormat::Q8x32 => {
                resize(&mut self.qs, n, 0);
                resize(&mut self.d, n / QK, 0.0);
                resize(&mut self.s, n / QK, 0.0);
            }
            ActFormat::Q8K => {
                resize(&mut self.qs, n, 0);
                resize(&mut self.d, n / QK_K, 0.0);
                resize(&mut self.bsums, n / QK_K * 16, 0);
            }
            ActFormat::Q8Row => {
                resize(&mut self.qs, n, 0);
                resize(&mut self.d, n_rows, 0.0);
            }
            ActFormat::Empty => unreachable!(),
        }
        Ok(())
    }
}

/// Raw views of the output buffers, so that pool threads can fill disjoint rows.
#[derive(Clone, Copy)]
struct RowsOut {
    format: ActFormat,
    k: usize,
    f: *mut f32,
    qs: *mut i8,
    d: *mut f32,
    s: *mut f32,
    bsums: *mut i16,
}

// SAFETY: only used to hand disjoint row ranges to pool threads.
unsafe impl Sync for RowsOut {}
unsafe impl Send for RowsOut {}

impl RowsOut {
    /// Quantizes rows `rows` of `x`.
    ///
    /// Safety: buffers sized by `prepare` for at least `rows.end` rows; concurrent callers use
    /// disjoint `rows`.
    unsafe fn quantize_rows(&self, x: &[f32], rows: std::ops::Range<usize>) {
        use std::slice::from_raw_parts_mut as mk;
        let k = self.k;
        let level = cpu_level();
        for r in rows {
            let xr = &x[r * k..(r + 1) * k];
            match self.format {
                ActFormat::F32 => std::ptr::copy_nonoverlapping(xr.as_ptr(), self.f.add(r * k), k),
                ActFormat::Q8x32 => {
                    let nb = k / QK;
                    let qs = mk(self.qs.add(r * k), k);
                    let d = mk(self.d.add(r * nb), nb);
                    let s = mk(self.s.add(r * nb), nb);
                    #[cfg(target_arch = "x86_64")]
                    if level >= CpuLevel::Avx2 {
                        super::avx2::quantize::q8x32_row(xr, qs, d, s);
                        continue;
                    }
                    quantize_q8x32_scalar(xr, qs, d, s);
                }
                ActFormat::Q8K => {
                    let nb = k / QK_K;
                    let qs = mk(self.qs.add(r * k), k);
                    let d = mk(self.d.add(r * nb), nb);
                    let bs = mk(self.bsums.add(r * nb * 16), nb * 16);
                    #[cfg(target_arch = "x86_64")]
                    if level >= CpuLevel::Avx2 {
                        super::avx2::quantize::q8k_row(xr, qs, d, bs);
                        continue;
                    }
                    quantize_q8k_scalar(xr, qs, d, bs);
                }
                ActFormat::Q8Row => quantize_q8row(xr, mk(self.qs.add(r * k), k), &mut *self.d.add(r)),
                ActFormat::Empty => {}
            }
        }
        let _ = level;
    }
}

fn resize<T: Copy>(v: &mut Vec<T>, n: usize, fill: T) {
    if v.len() != n {
        v.resize(n, fill);
    }
}

/// Scalar Q8_0/Q8_1 quantization of one row (the oracle for the SIMD version).
/// Rounds half to even, as `_mm256_round_ps` does, so both agree bit for bit.
pub(crate) fn quantize_q8x32_scalar(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for (b, (xb, qb)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let dd = amax / 127.0;
        let id = if dd != 0.0 { 1.0 / dd } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in qb.iter_mut().zip(xb) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        let dr = half::f16::from_f32(dd).to_f32();
        d[b] = dr;
        s[b] = dr * sum as f32;
    }
}

/// One row as int8 with one scale: d = amax / 127 (rounding half to even).
pub(crate) fn quantize_q8row(x: &[f32], qs: &mut [i8], d: &mut f32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    *d = amax / 127.0;
    let id = if *d != 0.0 { 1.0 / *d } else { 0.0 };
    for (q, v) in qs.iter_mut().zip(x) {
        *q = ((v * id).round_ties_even() as i32).clamp(-127, 127) as i8;
    }
}

/// Scalar Q8_K quantization of one row.
pub(crate) fn quantize_q8k_scalar(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
    for (b, (xb, qb)) in x.chunks_exact(QK_K).zip(qs.chunks_exact_mut(QK_K)).enumerate() {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let dd = amax / 127.0;
        let id = if dd != 0.0 { 1.0 / dd } else { 0.0 };
        for (q, v) in qb.iter_mut().zip(xb) {
            *q = ((v * id).round_ties_even() as i32).clamp(-127, 127) as i8;
        }
        for (j, bs) in bsums[16 * b..16 * b + 16].iter_mut().enumerate() {
            *bs = qb[16 * j..16 * j + 16].iter().map(|&q| q as i16).sum();
        }
        d[b] = dd;
    }
}
