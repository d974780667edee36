//! Packed K-quants (Q4_K, Q5_K, Q6_K) against Q8_K activations.
//!
//! Per super-block and activation row, each sub-block's integer dots (`vpdpbusd`) are scaled by
//! the 16 rows' sub-block scales with one `vpmulld` and summed in int32 over the super-block.
//! The mins (Q4_K/Q5_K) and Q6_K's offset of 32 need Σ scale·Σa per sub-block: one `vpdpwssd`
//! per pair of 16-element activation sums (the Q8_K `bsums`, broadcast as an int16 pair)
//! against the rows' (scale, scale) or (scale_2i, scale_2i+1) pairs. One float FMA per
//! super-block then applies d·d_a (and dmin·d_a).

use super::{bcast4, dispatch_c, f16x16, load, run4, Tile};
use crate::kernels::dtype::QK_K;
use std::arch::x86_64::*;

/// Activation rows per tile: 3 int32 and 1 float register per row stay in registers.
pub(super) const C: usize = 6;

/// The bsums pair (2i, 2i+1) of super-block b of activation row p, broadcast.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn bsum_pair(p: *const i16, i: usize) -> __m512i {
    _mm512_set1_epi32((p.add(2 * i) as *const i32).read_unaligned())
}

/// 16 unsigned bytes → 16 int32 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn u8x16(p: *const u8) -> __m512i {
    _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))
}

/// 16 signed bytes → 16 int32 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn i8x16(p: *const u8) -> __m512i {
    _mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i))
}

/// Tile entry for Q4_K (FIVE = false) and Q5_K.
pub(crate) unsafe fn tile_k4<const FIVE: bool>(t: &Tile, g: usize, c0: usize, nc: usize) {
    match FIVE {
        false => dispatch_c!(k4_c, [False], nc, t, g, c0),
        true => dispatch_c!(k4_c, [True], nc, t, g, c0),
    }
}

/// A type-level bool, so the dispatch macro can pass the variant as a type.
pub(crate) trait Bool {
    const V: bool;
}
pub(crate) struct False;
pub(crate) struct True;
impl Bool for False {
    const V: bool = false;
}
impl Bool for True {
    const V: bool = true;
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn k4_c<F: Bool, const NC: usize>(t: &Tile, g: usize, c0: usize) {
    let five = F::V;
    let bytes = if five { 64 + 256 + 512 + 2048 } else { 64 + 256 + 2048 };
    let k = t.pm.cols;
    let nb = k / QK_K;
    let a = t.acts;
    let ap: [*const i8; NC] = std::array::from_fn(|c| a.qs.as_ptr().add((c0 + c) * k));
    let dp: [*const f32; NC] = std::array::from_fn(|c| a.d.as_ptr().add((c0 + c) * nb));
    let bp: [*const i16; NC] = std::array::from_fn(|c| a.bsums.as_ptr().add((c0 + c) * nb * 16));
    let base = t.pm.group_ptr(g);
    let mut acc = [_mm512_setzero_ps(); NC];
    for b in 0..nb {
        let blk = base.add(b * bytes);
        let qs = blk.add(if five { 320 + 512 } else { 320 });
        let mut isum = [_mm512_setzero_si512(); NC];
        for j in 0..8 {
            let q = qs.add(256 * j);
            let qh = five.then(|| blk.add(320 + 64 * j));
            let mut dots = [_mm512_setzero_si512(); NC];
            for r in 0..8 {
                let w = run4(q, qh, r);
                for c in 0..NC {
                    dots[c] = _mm512_dpbusd_epi32(dots[c], w, bcast4(ap[c].add(b * QK_K + 32 * j + 4 * r)));
                }
            }
            let sc = u8x16(blk.add(64 + 16 * j));
            for c in 0..NC {
                isum[c] = _mm512_add_epi32(isum[c], _mm512_mullo_epi32(dots[c], sc));
            }
        }
        // Σ_j m_j·(Σa of sub-block j): the pair (bsums 2j, 2j+1) against (m_j, m_j).
        let mut imin = [_mm512_setzero_si512(); NC];
        for j in 0..8 {
            let mn = u8x16(blk.add(192 + 16 * j));
            let mn2 = _mm512_or_si512(mn, _mm512_slli_epi32(mn, 16));
            for c in 0..NC {
                imin[c] = _mm512_dpwssd_epi32(imin[c], mn2, bsum_pair(bp[c].add(16 * b), j));
            }
        }
        let (d, dmin) = (f16x16(blk), f16x16(blk.add(32)));
        for c in 0..NC {
            let da = _mm512_set1_ps(*dp[c].add(b));
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[c]), _mm512_mul_ps(d, da), acc[c]);
            acc[c] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(imin[c]), _mm512_mul_ps(dmin, da), acc[c]);
        }
    }
    for c in 0..NC {
        t.store(g, c0 + c, acc[c]);
    }
}

/// Tile entry for Q6_K.
pub(crate) unsafe fn tile_q6k(t: &Tile, g: usize, c0: usize, nc: usize) {
    dispatch_c!(q6k_c, [], nc, t, g, c0)
}

/// Bits 2p, 2p+1 of every byte of h, moved to bits 4, 5 (the rest of each byte is masked off
/// by the caller).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn crumb(h: __m512i, p: usize) -> __m512i {
    match p {
        0 => _mm512_slli_epi16(h, 4),
        1 => _mm512_slli_epi16(h, 2),
        2 => h,
        _ => _mm512_srli_epi16(h, 2),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q6k_c<const NC: usize>(t: &Tile, g: usize, c0: usize) {
    const BYTES: usize = 32 + 256 + 2048 + 1024;
    let k = t.pm.cols;
    let nb = k / QK_K;
    let a = t.acts;
    let ap: [*const i8; NC] = std::array::from_fn(|c| a.qs.as_ptr().add((c0 + c) * k));
    let dp: [*const f32; NC] = std::array::from_fn(|c| a.d.as_ptr().add((c0 + c) * nb));
    let bp: [*const i16; NC] = std::array::from_fn(|c| a.bsums.as_ptr().add((c0 + c) * nb * 16));
    let base = t.pm.group_ptr(g);
    let (low, hi2) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
    let mut acc = [_mm512_setzero_ps(); NC];
    for b in 0..nb {
        let blk = base.add(b * BYTES);
        let (sc, ql, qh) = (blk.add(32), blk.add(288), blk.add(288 + 2048));
        let mut isum = [_mm512_setzero_si512(); NC];
        // Sub-blocks j and j + 8 share their nibble vectors (low and high halves).
        for j in 0..8 {
            let mut lo = [_mm512_setzero_si512(); NC];
            let mut hi = [_mm512_setzero_si512(); NC];
            for e in 0..4 {
                let run = 4 * j + e;
                let v = load(ql.add(64 * run));
                let h = load(qh.add(64 * (run % 16)));
                // (crumb & 0x30) | nibble in one ternary-logic op.
                let w_lo = _mm512_ternarylogic_epi32::<0xEA>(crumb(h, run / 16), hi2, _mm512_and_si512(v, low));
                let nib_hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                let w_hi = _mm512_ternarylogic_epi32::<0xEA>(crumb(h, 2 + run / 16), hi2, nib_hi);
                for c in 0..NC {
                    let x = ap[c].add(b * QK_K + 4 * run);
                    lo[c] = _mm512_dpbusd_epi32(lo[c], w_lo, bcast4(x));
                    hi[c] = _mm512_dpbusd_epi32(hi[c], w_hi, bcast4(x.add(128)));
                }
            }
            let (s_lo, s_hi) = (i8x16(sc.add(16 * j)), i8x16(sc.add(16 * (j + 8))));
            for c in 0..NC {
                let part = _mm512_add_epi32(_mm512_mullo_epi32(lo[c], s_lo), _mm512_mullo_epi32(hi[c], s_hi));
                isum[c] = _mm512_add_epi32(isum[c], part);
            }
        }
        // The offset: 32·Σ_j scale_j·(Σa of sub-block j), pairs of sub-blocks at a time.
        let mut ioff = [_mm512_setzero_si512(); NC];
        for i in 0..8 {
            let s0 = i8x16(sc.add(32 * i));
            let s1 = i8x16(sc.add(32 * i + 16));
            let pair = _mm512_or_si512(_mm512_and_si512(s0, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(s1, 16));
            for c in 0..NC {
                ioff[c] = _mm512_dpwssd_epi32(ioff[c], pair, bsum_pair(bp[c].add(16 * b), i));
            }
        }
        let d = f16x16(blk);
        for c in 0..NC {
            let total = _mm512_sub_epi32(isum[c], _mm512_slli_epi32(ioff[c], 5));
            let dd = _mm512_mul_ps(d, _mm512_set1_ps(*dp[c].add(b)));
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), dd, acc[c]);
        }
    }
    for c in 0..NC {
        t.store(g, c0 + c, acc[c]);
    }
}
