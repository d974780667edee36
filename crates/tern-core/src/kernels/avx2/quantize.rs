//! AVX2 activation quantization; must match `acts::quantize_*_scalar` bit for bit.

use super::util::hsum_i32;
use crate::kernels::dtype::{QK, QK_K};
use std::arch::x86_64::*;

/// Q8_0/Q8_1-style quantization of one row (blocks of 32).
pub(crate) fn q8x32_row(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    assert!(x.len() == qs.len() && x.len() == d.len() * QK && d.len() == s.len());
    // SAFETY: lengths checked; the caller checked the CPU level.
    unsafe { q8x32_row_avx2(x, qs, d, s) }
}

/// Q8_K quantization of one row (super-blocks of 256).
pub(crate) fn q8k_row(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
    assert!(x.len() == qs.len() && x.len() == d.len() * QK_K && bsums.len() == d.len() * 16);
    // SAFETY: as above.
    unsafe { q8k_row_avx2(x, qs, d, bsums) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

/// Max |x| over 32 floats at p.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn amax32(p: *const f32) -> f32 {
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_andnot_ps(sign, _mm256_loadu_ps(p));
    for j in 1..4 {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * j))));
    }
    hmax(m)
}

/// Rounds x*id (half to even) for 32 floats and packs them to int8 in order; returns the
/// 8 lanes of partial sums as i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quant32(p: *const f32, id: __m256, out: *mut i8) -> __m256i {
    const R: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let q0 = _mm256_cvtps_epi32(_mm256_round_ps::<R>(_mm256_mul_ps(_mm256_loadu_ps(p), id)));
    let q1 = _mm256_cvtps_epi32(_mm256_round_ps::<R>(_mm256_mul_ps(_mm256_loadu_ps(p.add(8)), id)));
    let q2 = _mm256_cvtps_epi32(_mm256_round_ps::<R>(_mm256_mul_ps(_mm256_loadu_ps(p.add(16)), id)));
    let q3 = _mm256_cvtps_epi32(_mm256_round_ps::<R>(_mm256_mul_ps(_mm256_loadu_ps(p.add(24)), id)));
    let sums = _mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3));
    // packs interleave 128-bit lanes; the final permute restores element order.
    let a = _mm256_packs_epi32(q0, q1);
    let b = _mm256_packs_epi32(q2, q3);
    let c = _mm256_packs_epi16(a, b);
    let c = _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(out as *mut __m256i, c);
    sums
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8x32_row_avx2(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for b in 0..d.len() {
        let p = x.as_ptr().add(b * QK);
        let amax = amax32(p);
        let dd = amax / 127.0;
        let id = if dd != 0.0 { 1.0 / dd } else { 0.0 };
        let sums = quant32(p, _mm256_set1_ps(id), qs.as_mut_ptr().add(b * QK));
        // Round d through f16 like ggml's block_q8_0.
        let dr = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(dd))));
        d[b] = dr;
        s[b] = dr * hsum_i32(sums) as f32;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8k_row_avx2(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
    for b in 0..d.len() {
        let p = x.as_ptr().add(b * QK_K);
        let mut amax = 0.0f32;
        for j in 0..8 {
            amax = amax.max(amax32(p.add(32 * j)));
        }
        let dd = amax / 127.0;
        let id = _mm256_set1_ps(if dd != 0.0 { 1.0 / dd } else { 0.0 });
        for j in 0..8 {
            let out = qs.as_mut_ptr().add(b * QK_K + 32 * j);
            quant32(p.add(32 * j), id, out);
            // Sums of 16: widen to i16 and add pairs horizontally.
            let v = _mm256_loadu_si256(out as *const __m256i);
            let lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v));
            let hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1));
            bsums[16 * b + 2 * j] = hsum_i16(lo);
            bsums[16 * b + 2 * j + 1] = hsum_i16(hi);
        }
        d[b] = dd;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_i16(v: __m256i) -> i16 {
    hsum_i32(_mm256_madd_epi16(v, _mm256_set1_epi16(1))) as i16
}
