//! AVX2 kernels for the K-quants (Q4_K, Q5_K, Q6_K) against Q8_K activations.
//!
//! A super-block of 256 is walked in 8 groups of 32: unsigned quants × int8 activations via
//! `vpmaddubsw`, then `vpmaddwd` with the sub-block scales as int16 (this both widens and
//! scales), summed in int32 over the whole super-block; one float FMA per super-block applies
//! d·d_a. Mins (Q4_K/Q5_K) use the activations' per-16 sums: Σ dmin·m_j·Σa_j in float; Q6_K's
//! offset of 32 is subtracted in the integer sum the same way.

use super::util::{dispatch_rc, hsum};
use crate::kernels::dtype::QK_K;
use crate::kernels::matmul::Mm;
use std::arch::x86_64::*;
use std::ops::Range;

pub(crate) trait Kq {
    const BYTES: usize;
    /// Q4_K/Q5_K: float mins.
    const HAS_MIN: bool;
    type P: Copy;
    /// Per-super-block constants of block b.
    unsafe fn prep(b: *const u8) -> Self::P;
    /// The 32 unsigned quants of group g (elements 32g..32g+32).
    unsafe fn q(b: *const u8, g: usize) -> __m256i;
    /// int16 multipliers for the 16 pair sums of group g.
    unsafe fn scale(p: &Self::P, g: usize) -> __m256i;
    unsafe fn d(p: &Self::P) -> f32;
    /// Added to the super-block's int32 lanes, given the activations' 16 sums of 16.
    unsafe fn icorr(p: &Self::P, bsums: __m256i) -> __m256i;
    /// dmin·m_j for the 8 groups (only with HAS_MIN).
    unsafe fn mins(p: &Self::P) -> __m256;
}

pub(crate) struct Q4K;
pub(crate) struct Q5K;
pub(crate) struct Q6K;

/// Byte-shuffle masks that broadcast int16 lane `lo` to the low 128 bits and `hi` to the high.
static PICK: [[u8; 32]; 8] = {
    let mut t = [[0u8; 32]; 8];
    let mut g = 0;
    while g < 8 {
        let (lo, hi) = if g < 4 { (2 * g, 2 * g + 1) } else { (2 * g - 8, 2 * g - 7) };
        let mut i = 0;
        while i < 8 {
            t[g][2 * i] = (2 * lo) as u8;
            t[g][2 * i + 1] = (2 * lo + 1) as u8;
            t[g][16 + 2 * i] = (2 * hi) as u8;
            t[g][16 + 2 * i + 1] = (2 * hi + 1) as u8;
            i += 1;
        }
        g += 1;
    }
    t
};
/// Same lane `g` in both halves (Q4_K/Q5_K: one scale per group of 32).
static PICK_SAME: [[u8; 32]; 8] = {
    let mut t = [[0u8; 32]; 8];
    let mut g = 0;
    while g < 8 {
        let mut i = 0;
        while i < 16 {
            t[g][2 * i] = (2 * g) as u8;
            t[g][2 * i + 1] = (2 * g + 1) as u8;
            i += 1;
        }
        g += 1;
    }
    t
};

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pick(s: __m256i, mask: &[u8; 32]) -> __m256i {
    _mm256_shuffle_epi8(s, _mm256_loadu_si256(mask.as_ptr() as *const __m256i))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    super::util::f16(super::util::rd_u16(p))
}

#[derive(Clone, Copy)]
pub(crate) struct P4 {
    d: f32,
    scales: __m256i,
    mins: __m256,
}

/// Q4_K/Q5_K: unpack the 12 bytes of 6-bit scales and mins (ggml's kmask trick).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prep_k4(b: *const u8) -> P4 {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let s = b.add(4) as *const u32;
    let (u0, u1, u2) = (s.read_unaligned(), s.add(1).read_unaligned(), s.add(2).read_unaligned());
    // Scales 0..3 come from u0 and 4..7 from the low nibbles of u2 (+ top bits of u0);
    // mins 0..3 from u1 and 4..7 from the high nibbles of u2 (+ top bits of u1).
    let sc_lo = u0 & KMASK1;
    let sc_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let mn_lo = u1 & KMASK1;
    let mn_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let sc8 = _mm_set_epi32(0, 0, sc_hi as i32, sc_lo as i32);
    let mn8 = _mm_set_epi32(0, 0, mn_hi as i32, mn_lo as i32);
    let sc16 = _mm_cvtepu8_epi16(sc8);
    let dmin = f16_at(b.add(2));
    let mins = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn8)), _mm256_set1_ps(dmin));
    P4 { d: f16_at(b), scales: _mm256_broadcastsi128_si256(sc16), mins }
}

impl Kq for Q4K {
    const BYTES: usize = 144;
    const HAS_MIN: bool = true;
    type P = P4;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn prep(b: *const u8) -> P4 {
        prep_k4(b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q(b: *const u8, g: usize) -> __m256i {
        let v = _mm256_loadu_si256(b.add(16 + 32 * (g / 2)) as *const __m256i);
        let v = if g.is_multiple_of(2) { v } else { _mm256_srli_epi16(v, 4) };
        _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale(p: &P4, g: usize) -> __m256i {
        pick(p.scales, &PICK_SAME[g])
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn d(p: &P4) -> f32 {
        p.d
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn icorr(_: &P4, _: __m256i) -> __m256i {
        _mm256_setzero_si256()
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn mins(p: &P4) -> __m256 {
        p.mins
    }
}

impl Kq for Q5K {
    const BYTES: usize = 176;
    const HAS_MIN: bool = true;
    type P = P4;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn prep(b: *const u8) -> P4 {
        prep_k4(b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q(b: *const u8, g: usize) -> __m256i {
        let v = _mm256_loadu_si256(b.add(48 + 32 * (g / 2)) as *const __m256i);
        let v = if g.is_multiple_of(2) { v } else { _mm256_srli_epi16(v, 4) };
        let lo = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
        // Bit g of qh[l] is the fifth bit of element 32g + l.
        let bit = _mm256_set1_epi8((1u8 << g) as i8);
        let h = _mm256_loadu_si256(b.add(16) as *const __m256i);
        let h = _mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit);
        _mm256_or_si256(lo, _mm256_and_si256(h, _mm256_set1_epi8(0x10)))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale(p: &P4, g: usize) -> __m256i {
        pick(p.scales, &PICK_SAME[g])
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn d(p: &P4) -> f32 {
        p.d
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn icorr(_: &P4, _: __m256i) -> __m256i {
        _mm256_setzero_si256()
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn mins(p: &P4) -> __m256 {
        p.mins
    }
}

#[derive(Clone, Copy)]
pub(crate) struct P6 {
    d: f32,
    /// Scales 0..7 in both halves, and 8..15.
    s_lo: __m256i,
    s_hi: __m256i,
    /// The 16 scales × 32 as int16, for the offset correction.
    sc32: __m256i,
}

impl Kq for Q6K {
    const BYTES: usize = 210;
    const HAS_MIN: bool = false;
    type P = P6;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn prep(b: *const u8) -> P6 {
        let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(192) as *const __m128i));
        P6 {
            d: f16_at(b.add(208)),
            s_lo: _mm256_permute2x128_si256(sc16, sc16, 0x00),
            s_hi: _mm256_permute2x128_si256(sc16, sc16, 0x11),
            sc32: _mm256_slli_epi16(sc16, 5),
        }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q(b: *const u8, g: usize) -> __m256i {
        let (n, gi) = (g / 4, g % 4);
        let l = _mm256_loadu_si256(b.add(64 * n + 32 * (gi & 1)) as *const __m256i);
        let l = if gi < 2 { l } else { _mm256_srli_epi16(l, 4) };
        let l = _mm256_and_si256(l, _mm256_set1_epi8(0x0F));
        let h = _mm256_loadu_si256(b.add(128 + 32 * n) as *const __m256i);
        let h = _mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * gi as i32));
        let h = _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(3)), 4);
        _mm256_or_si256(l, h)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale(p: &P6, g: usize) -> __m256i {
        pick(if g < 4 { p.s_lo } else { p.s_hi }, &PICK[g])
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn d(p: &P6) -> f32 {
        p.d
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn icorr(p: &P6, bsums: __m256i) -> __m256i {
        _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_madd_epi16(p.sc32, bsums))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn mins(_: &P6) -> __m256 {
        _mm256_setzero_ps()
    }
}

/// Tile kernel entry (see `matmul::TileFn`).
pub(crate) unsafe fn tile<T: Kq>(m: &Mm, r0: usize, nr: usize, acts: Range<usize>) {
    let c_step = if acts.len() == 1 { 1 } else { 4 };
    let mut c0 = acts.start;
    while c0 < acts.end {
        let nc = c_step.min(acts.end - c0);
        dispatch_rc!(tile_rc, T, nr, nc, m, r0, c0);
        c0 += nc;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_rc<T: Kq, const R: usize, const C: usize>(m: &Mm, r0: usize, c0: usize) {
    let k = m.k;
    let nb = k / QK_K;
    let a = m.acts;
    let wp: [*const u8; R] = std::array::from_fn(|r| m.w.add((r0 + r) * m.row_bytes));
    let ap: [*const i8; C] = std::array::from_fn(|c| a.qs.as_ptr().add((c0 + c) * k));
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    for b in 0..nb {
        let wb: [*const u8; R] = std::array::from_fn(|r| wp[r].add(b * T::BYTES));
        // Weight rows are streamed once (decode): fetch ahead so unpacking overlaps the loads.
        for w in wb {
            for line in 0..T::BYTES.div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(w.add(super::PREFETCH + 64 * line) as *const i8);
            }
        }
        let p: [T::P; R] = std::array::from_fn(|r| T::prep(wb[r]));
        let mut iacc = [[_mm256_setzero_si256(); C]; R];
        for g in 0..8 {
            let mut q = [_mm256_setzero_si256(); R];
            let mut s = [_mm256_setzero_si256(); R];
            for r in 0..R {
                q[r] = T::q(wb[r], g);
                s[r] = T::scale(&p[r], g);
            }
            for c in 0..C {
                let av = _mm256_loadu_si256(ap[c].add(b * QK_K + 32 * g) as *const __m256i);
                for r in 0..R {
                    let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(q[r], av), s[r]);
                    iacc[r][c] = _mm256_add_epi32(iacc[r][c], prod);
                }
            }
        }
        for c in 0..C {
            let i = (c0 + c) * nb + b;
            let da = a.d[i];
            let bsums = _mm256_loadu_si256(a.bsums.as_ptr().add(16 * i) as *const __m256i);
            // Σa per group of 32, times d_a (only for mins).
            let asum = if T::HAS_MIN {
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(bsums, ones)), _mm256_set1_ps(da))
            } else {
                _mm256_setzero_ps()
            };
            for r in 0..R {
                let mut iv = iacc[r][c];
                if !T::HAS_MIN {
                    iv = _mm256_add_epi32(iv, T::icorr(&p[r], bsums));
                }
                let sc = _mm256_set1_ps(T::d(&p[r]) * da);
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iv), sc, acc[r][c]);
                if T::HAS_MIN {
                    acc[r][c] = _mm256_fnmadd_ps(T::mins(&p[r]), asum, acc[r][c]);
                }
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            *m.y.add((c0 + c) * m.ldy + r0 + r) = hsum(acc[r][c]);
        }
    }
}
