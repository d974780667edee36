//! AVX2 kernels for the 32-element block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) against Q8_0/Q8_1
//! activations.
//!
//! Per block: unsigned weights q (0..15 / 0..31) × int8 activations via `vpmaddubsw` +
//! `vpmaddwd`, scaled by d_w·d_a. The weights' offset/min is folded out of the inner loop:
//! value = d·q + m gives Σ d·d_a·(q·a) + m·s_a, with s_a = d_a·Σa from the activations, so
//! the m·s_a part is one scalar FMA per block and activation row.
//! Q8_0 weights are signed and use the abs/sign trick instead.

use super::util::{bytes_from_bits32, dispatch_rc, f16, hsum, nibbles16, rd_u16};
use crate::kernels::dtype::QK;
use crate::kernels::matmul::Mm;
use std::arch::x86_64::*;
use std::ops::Range;

pub(crate) trait Q32 {
    const BYTES: usize;
    /// Signed weights (Q8_0): no min, sign trick in the product.
    const SIGNED: bool;
    /// (d, m) with value = d·q + m for the unsigned q that `q` returns.
    unsafe fn scale_min(b: *const u8) -> (f32, f32);
    /// The block's 32 quants in element order.
    unsafe fn q(b: *const u8) -> __m256i;
}

pub(crate) struct Q4_0;
pub(crate) struct Q4_1;
pub(crate) struct Q5_0;
pub(crate) struct Q5_1;
pub(crate) struct Q8_0;

impl Q32 for Q4_0 {
    const BYTES: usize = 18;
    const SIGNED: bool = false;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale_min(b: *const u8) -> (f32, f32) {
        let d = f16(rd_u16(b));
        (d, -8.0 * d)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q(b: *const u8) -> __m256i {
        nibbles16(b.add(2))
    }
}

impl Q32 for Q4_1 {
    const BYTES: usize = 20;
    const SIGNED: bool = false;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale_min(b: *const u8) -> (f32, f32) {
        (f16(rd_u16(b)), f16(rd_u16(b.add(2))))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q(b: *const u8) -> __m256i {
        nibbles16(b.add(4))
    }
}

impl Q32 for Q5_0 {
    const BYTES: usize = 22;
    const SIGNED: bool = false;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale_min(b: *const u8) -> (f32, f32) {
        let d = f16(rd_u16(b));
        (d, -16.0 * d)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q(b: *const u8) -> __m256i {
        let hi = _mm256_and_si256(bytes_from_bits32(b.add(2)), _mm256_set1_epi8(0x10));
        _mm256_or_si256(nibbles16(b.add(6)), hi)
    }
}

impl Q32 for Q5_1 {
    const BYTES: usize = 24;
    const SIGNED: bool = false;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale_min(b: *const u8) -> (f32, f32) {
        (f16(rd_u16(b)), f16(rd_u16(b.add(2))))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q(b: *const u8) -> __m256i {
        let hi = _mm256_and_si256(bytes_from_bits32(b.add(4)), _mm256_set1_epi8(0x10));
        _mm256_or_si256(nibbles16(b.add(8)), hi)
    }
}

impl Q32 for Q8_0 {
    const BYTES: usize = 34;
    const SIGNED: bool = true;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale_min(b: *const u8) -> (f32, f32) {
        (f16(rd_u16(b)), 0.0)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q(b: *const u8) -> __m256i {
        _mm256_loadu_si256(b.add(2) as *const __m256i)
    }
}

/// Tile kernel entry (see `matmul::TileFn`).
pub(crate) unsafe fn tile<T: Q32>(m: &Mm, r0: usize, nr: usize, acts: Range<usize>) {
    if acts.len() == 1 {
        match nr {
            1 => decode::<T, 1>(m, r0, acts.start),
            2 => decode::<T, 2>(m, r0, acts.start),
            3 => decode::<T, 3>(m, r0, acts.start),
            4 => decode::<T, 4>(m, r0, acts.start),
            _ => unreachable!(),
        }
        return;
    }
    let mut c0 = acts.start;
    while c0 < acts.end {
        let nc = 4.min(acts.end - c0);
        dispatch_rc!(tile_rc, T, nr, nc, m, r0, c0);
        c0 += nc;
    }
}

/// R weight rows × C activation rows: each weight block is unpacked once for C rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_rc<T: Q32, const R: usize, const C: usize>(m: &Mm, r0: usize, c0: usize) {
    if C == 4 {
        return tile_r4::<T, R>(m, r0, c0);
    }
    let k = m.k;
    let nb = k / QK;
    let a = m.acts;
    let wp: [*const u8; R] = std::array::from_fn(|r| m.w.add((r0 + r) * m.row_bytes));
    let ap: [*const i8; C] = std::array::from_fn(|c| a.qs.as_ptr().add((c0 + c) * k));
    let dp: [*const f32; C] = std::array::from_fn(|c| a.d.as_ptr().add((c0 + c) * nb));
    let sp: [*const f32; C] = std::array::from_fn(|c| a.s.as_ptr().add((c0 + c) * nb));
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut corr = [[0.0f32; C]; R];
    for b in 0..nb {
        let mut q = [_mm256_setzero_si256(); R];
        let mut dw = [0.0f32; R];
        let mut mw = [0.0f32; R];
        for r in 0..R {
            let blk = wp[r].add(b * T::BYTES);
            q[r] = T::q(blk);
            (dw[r], mw[r]) = T::scale_min(blk);
        }
        let mut qa = q;
        if T::SIGNED {
            for r in 0..R {
                qa[r] = _mm256_sign_epi8(q[r], q[r]);
            }
        }
        for c in 0..C {
            let av = _mm256_loadu_si256(ap[c].add(b * QK) as *const __m256i);
            let da = *dp[c].add(b);
            let sa = *sp[c].add(b);
            for r in 0..R {
                let p = if T::SIGNED {
                    _mm256_maddubs_epi16(qa[r], _mm256_sign_epi8(av, q[r]))
                } else {
                    _mm256_maddubs_epi16(q[r], av)
                };
                let i = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
                acc[r][c] = _mm256_fmadd_ps(i, _mm256_set1_ps(dw[r] * da), acc[r][c]);
                if !T::SIGNED {
                    corr[r][c] += mw[r] * sa;
                }
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            *m.y.add((c0 + c) * m.ldy + r0 + r) = hsum(acc[r][c]) + corr[r][c];
        }
    }
}

/// R weight rows × 4 activation rows, the full prefill tile. The four int32 block sums of a
/// weight row are folded into one vector with two `vphaddd` levels, so the float work per
/// block (convert, scale by d_w·d_a, accumulate, min correction) is done once per weight row
/// for all four activation rows instead of once per pair.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_r4<T: Q32, const R: usize>(m: &Mm, r0: usize, c0: usize) {
    let k = m.k;
    let nb = k / QK;
    let a = m.acts;
    let wp: [*const u8; R] = std::array::from_fn(|r| m.w.add((r0 + r) * m.row_bytes));
    let ap: [*const i8; 4] = std::array::from_fn(|c| a.qs.as_ptr().add((c0 + c) * k));
    let dp: [*const f32; 4] = std::array::from_fn(|c| a.d.as_ptr().add((c0 + c) * nb));
    let sp: [*const f32; 4] = std::array::from_fn(|c| a.s.as_ptr().add((c0 + c) * nb));
    let ones = _mm256_set1_epi16(1);
    // Lanes 0-3 and 4-7 each hold partial sums for activation rows c0..c0+4.
    let mut acc = [_mm256_setzero_ps(); R];
    let mut corr = [_mm_setzero_ps(); R];
    for b in 0..nb {
        let av: [__m256i; 4] = std::array::from_fn(|c| _mm256_loadu_si256(ap[c].add(b * QK) as *const __m256i));
        let da = _mm_setr_ps(*dp[0].add(b), *dp[1].add(b), *dp[2].add(b), *dp[3].add(b));
        let da = _mm256_set_m128(da, da);
        let sa = if T::SIGNED {
            _mm_setzero_ps()
        } else {
            _mm_setr_ps(*sp[0].add(b), *sp[1].add(b), *sp[2].add(b), *sp[3].add(b))
        };
        for r in 0..R {
            let blk = wp[r].add(b * T::BYTES);
            let q = T::q(blk);
            let (dw, mw) = T::scale_min(blk);
            let qa = if T::SIGNED { _mm256_sign_epi8(q, q) } else { q };
            let sums: [__m256i; 4] = std::array::from_fn(|c| {
                let p = if T::SIGNED {
                    _mm256_maddubs_epi16(qa, _mm256_sign_epi8(av[c], q))
                } else {
                    _mm256_maddubs_epi16(q, av[c])
                };
                _mm256_madd_epi16(p, ones)
            });
            let s = _mm256_hadd_epi32(_mm256_hadd_epi32(sums[0], sums[1]), _mm256_hadd_epi32(sums[2], sums[3]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(_mm256_set1_ps(dw), da), acc[r]);
            if !T::SIGNED {
                corr[r] = _mm_fmadd_ps(_mm_set1_ps(mw), sa, corr[r]);
            }
        }
    }
    for r in 0..R {
        let v = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), _mm_add_ps(v, corr[r]));
        for (c, value) in out.into_iter().enumerate() {
            *m.y.add((c0 + c) * m.ldy + r0 + r) = value;
        }
    }
}

/// One activation row (decode): scales converted in the loop, offsets/mins accumulated as
/// scalars, so each weight byte is touched once.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode<T: Q32, const R: usize>(m: &Mm, r0: usize, c: usize) {
    let k = m.k;
    let nb = k / QK;
    let a = m.acts;
    let wp: [*const u8; R] = std::array::from_fn(|r| m.w.add((r0 + r) * m.row_bytes));
    let ap = a.qs.as_ptr().add(c * k);
    let dp = a.d.as_ptr().add(c * nb);
    let sp = a.s.as_ptr().add(c * nb);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut corr = [0.0f32; R];
    for b in 0..nb {
        let av = _mm256_loadu_si256(ap.add(b * QK) as *const __m256i);
        let da = *dp.add(b);
        let sa = *sp.add(b);
        for r in 0..R {
            let blk = wp[r].add(b * T::BYTES);
            // Rows are streamed from memory once: fetch ahead so unpacking overlaps the loads.
            _mm_prefetch::<_MM_HINT_T0>(blk.add(super::PREFETCH) as *const i8);
            let q = T::q(blk);
            let (d, mn) = T::scale_min(blk);
            let p = if T::SIGNED {
                _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(av, q))
            } else {
                _mm256_maddubs_epi16(q, av)
            };
            let i = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
            acc[r] = _mm256_fmadd_ps(i, _mm256_set1_ps(d * da), acc[r]);
            if !T::SIGNED {
                corr[r] += mn * sa;
            }
        }
    }
    for r in 0..R {
        *m.y.add(c * m.ldy + r0 + r) = hsum(acc[r]) + corr[r];
    }
}
