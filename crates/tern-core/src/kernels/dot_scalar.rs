//! Scalar dot products of one weight row with one quantized activation row: the reference
//! (test oracle) for the SIMD kernels and the fallback on CPUs without them.
//!
//! Integer parts are computed exactly per block, then scaled, as llama.cpp's scalar code does.

use super::acts::QuantizedActs;
use super::blocks::{bf16_to_f32, f16_to_f32, le_f16, le_u16, le_u32, q3k_scales, scale_min_k4};
use super::dtype::{DType, QK, QK_K};

/// dot(W row `w`, activation row `i`); `w` holds exactly one row of `acts.k()` elements.
pub(crate) fn dot_row(dtype: DType, w: &[u8], acts: &QuantizedActs, i: usize) -> f32 {
    let k = acts.k;
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => {
            let a = &acts.f[i * k..(i + 1) * k];
            let mut sum = 0.0f32;
            for (j, &x) in a.iter().enumerate() {
                let wv = match dtype {
                    DType::F32 => f32::from_le_bytes(w[4 * j..4 * j + 4].try_into().unwrap()),
                    DType::F16 => f16_to_f32(le_u16(w, 2 * j)),
                    _ => bf16_to_f32(le_u16(w, 2 * j)),
                };
                sum += wv * x;
            }
            sum
        }
        DType::F8E4M3 => {
            let a = &acts.f[i * k..(i + 1) * k];
            a.iter().zip(w).map(|(&x, &b)| x * super::fp8::e4m3_to_f32(b)).sum()
        }
        DType::I8 => {
            let a = &acts.qs[i * k..(i + 1) * k];
            let sum: i32 = a.iter().zip(w).map(|(&x, &b)| x as i32 * b as i8 as i32).sum();
            acts.d[i] * sum as f32
        }
        DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => dot_q32(dtype, w, acts, i),
        _ => dot_k(dtype, w, acts, i),
    }
}

/// The 32 weight values of one block as integers, and its (scale, min) with
/// value = scale * q + min (min = 0 for the symmetric types, whose q are signed).
#[inline]
pub(crate) fn q32_block(dtype: DType, b: &[u8]) -> ([i32; 32], f32, f32) {
    let mut q = [0i32; 32];
    match dtype {
        DType::Q4_0 | DType::Q4_1 => {
            let (off, qs) = if dtype == DType::Q4_0 { (8, &b[2..18]) } else { (0, &b[4..20]) };
            for j in 0..16 {
                q[j] = (qs[j] & 0xF) as i32 - off;
                q[j + 16] = (qs[j] >> 4) as i32 - off;
            }
        }
        DType::Q5_0 | DType::Q5_1 => {
            let (off, h, qs) =
                if dtype == DType::Q5_0 { (16, le_u32(b, 2), &b[6..22]) } else { (0, le_u32(b, 4), &b[8..24]) };
            for j in 0..16 {
                q[j] = ((qs[j] & 0xF) as u32 | (((h >> j) << 4) & 0x10)) as i32 - off;
                q[j + 16] = ((qs[j] >> 4) as u32 | ((h >> (j + 12)) & 0x10)) as i32 - off;
            }
        }
        DType::Q8_0 => {
            for (j, v) in q.iter_mut().enumerate() {
                *v = b[2 + j] as i8 as i32;
            }
        }
        _ => unreachable!(),
    }
    let m = match dtype {
        DType::Q4_1 | DType::Q5_1 => le_f16(b, 2),
        _ => 0.0,
    };
    (q, le_f16(b, 0), m)
}

fn dot_q32(dtype: DType, w: &[u8], acts: &QuantizedActs, i: usize) -> f32 {
    let k = acts.k;
    let nb = k / QK;
    let bb = dtype.block_bytes();
    let a = &acts.qs[i * k..(i + 1) * k];
    let (ad, asum) = (&acts.d[i * nb..(i + 1) * nb], &acts.s[i * nb..(i + 1) * nb]);
    let mut sum = 0.0f32;
    for b in 0..nb {
        let (q, d, m) = q32_block(dtype, &w[b * bb..(b + 1) * bb]);
        let idot: i32 = q.iter().zip(&a[b * QK..]).map(|(&q, &a)| q * a as i32).sum();
        sum += d * ad[b] * idot as f32 + m * asum[b];
    }
    sum
}

/// The 256 weight values of one K-quant super-block as integers (without min), with the
/// per-16 integer scales, the per-16 integer mins and the float (d, dmin):
/// value[j] = d * scale[j/16] * q[j] - dmin * min[j/16].
#[allow(clippy::type_complexity)]
pub(crate) fn k_block(dtype: DType, b: &[u8]) -> ([i32; 256], [i32; 16], [i32; 16], f32, f32) {
    let mut q = [0i32; 256];
    let mut sc = [0i32; 16];
    let mut mn = [0i32; 16];
    let (d, dmin);
    match dtype {
        DType::Q2_K => {
            let (scales, qs) = (&b[0..16], &b[16..80]);
            d = le_f16(b, 80);
            dmin = le_f16(b, 82);
            for (j, s) in scales.iter().enumerate() {
                sc[j] = (s & 0xF) as i32;
                mn[j] = (s >> 4) as i32;
            }
            let mut out = 0;
            for half in 0..2 {
                for shift in [0, 2, 4, 6] {
                    for l in 0..32 {
                        q[out] = ((qs[32 * half + l] >> shift) & 3) as i32;
                        out += 1;
                    }
                }
            }
        }
        DType::Q3_K => {
            let (hm, qs) = (&b[0..32], &b[32..96]);
            for (j, s) in q3k_scales(&b[96..108]).iter().enumerate() {
                sc[j] = *s as i32;
            }
            d = le_f16(b, 108);
            dmin = 0.0;
            let mut out = 0;
            let mut m = 1u8;
            for half in 0..2 {
                for shift in [0, 2, 4, 6] {
                    for l in 0..32 {
                        let lo = ((qs[32 * half + l] >> shift) & 3) as i32;
                        q[out] = lo - if hm[l] & m != 0 { 0 } else { 4 };
                        out += 1;
                    }
                    m <<= 1;
                }
            }
        }
        DType::Q4_K | DType::Q5_K => {
            d = le_f16(b, 0);
            dmin = le_f16(b, 2);
            let scales = &b[4..16];
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, scales);
                sc[2 * j] = s as i32;
                sc[2 * j + 1] = s as i32;
                mn[2 * j] = m as i32;
                mn[2 * j + 1] = m as i32;
            }
            let (qh, qs) = if dtype == DType::Q4_K { (None, &b[16..144]) } else { (Some(&b[16..48]), &b[48..176]) };
            for j in 0..4 {
                for l in 0..32 {
                    let (mut lo, mut hi) = ((qs[32 * j + l] & 0xF) as i32, (qs[32 * j + l] >> 4) as i32);
                    if let Some(qh) = qh {
                        lo += (((qh[l] >> (2 * j)) & 1) as i32) << 4;
                        hi += (((qh[l] >> (2 * j + 1)) & 1) as i32) << 4;
                    }
                    q[64 * j + l] = lo;
                    q[64 * j + 32 + l] = hi;
                }
            }
        }
        DType::Q6_K => {
            let (ql, qh) = (&b[0..128], &b[128..192]);
            for j in 0..16 {
                sc[j] = b[192 + j] as i8 as i32;
            }
            d = le_f16(b, 208);
            dmin = 0.0;
            for n in 0..2 {
                let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
                let q = &mut q[128 * n..];
                for l in 0..32 {
                    q[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    q[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    q[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    q[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                }
            }
        }
        _ => unreachable!(),
    }
    (q, sc, mn, d, dmin)
}

fn dot_k(dtype: DType, w: &[u8], acts: &QuantizedActs, i: usize) -> f32 {
    let k = acts.k;
    let nb = k / QK_K;
    let bb = dtype.block_bytes();
    let a = &acts.qs[i * k..(i + 1) * k];
    let mut sum = 0.0f32;
    for b in 0..nb {
        let (q, sc, mn, d, dmin) = k_block(dtype, &w[b * bb..(b + 1) * bb]);
        let ab = &a[b * QK_K..(b + 1) * QK_K];
        let bsums = &acts.bsums[(i * nb + b) * 16..(i * nb + b + 1) * 16];
        let mut isum = 0i32;
        let mut msum = 0i32;
        for j in 0..16 {
            let part: i32 = (0..16).map(|l| q[16 * j + l] * ab[16 * j + l] as i32).sum();
            isum += sc[j] * part;
            msum += mn[j] * bsums[j] as i32;
        }
        let da = acts.d[i * nb + b];
        sum += da * (d * isum as f32 - dmin * msum as f32);
    }
    sum
}
