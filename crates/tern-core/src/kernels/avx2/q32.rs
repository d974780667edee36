//! AVX2 kernels for the 32-element block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) against Q8_0/Q8_1
//! activations.
//!
//! Per block: unsigned weights q (0..15 / 0..31) × int8 activations via `vpmaddubsw` +
//! `vpmaddwd` (or one `vpdpbusd` where AVX-512 VNNI exists), scaled by d_w·d_a. The weights' offset/min is folded out of the inner loop:
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

/// The kernels, generated once per instruction set: `$dot` sums groups of four u8 × i8
/// products into i32 lanes. Both variants give the same integers (the 16-bit pair sums of
/// `vpmaddubsw` cannot saturate for these block types), so results are identical.
macro_rules! q32_kernels {
    ($name:ident, $features:literal, $dot:ident) => {
        pub(crate) mod $name {
            use super::*;

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

            /// R weight rows × C activation rows: each weight block is unpacked once for C rows. Every
            /// output is accumulated exactly as `decode` does (8 float lanes over the blocks, then a
            /// horizontal sum), so a row's result never depends on the rest of the batch.
            #[target_feature(enable = $features)]
            unsafe fn tile_rc<T: Q32, const R: usize, const C: usize>(m: &Mm, r0: usize, c0: usize) {
                let k = m.k;
                let nb = k / QK;
                let a = m.acts;
                let wp: [*const u8; R] = std::array::from_fn(|r| m.w.add((r0 + r) * m.row_bytes));
                let ap: [*const i8; C] = std::array::from_fn(|c| a.qs.as_ptr().add((c0 + c) * k));
                let dp: [*const f32; C] = std::array::from_fn(|c| a.d.as_ptr().add((c0 + c) * nb));
                let sp: [*const f32; C] = std::array::from_fn(|c| a.s.as_ptr().add((c0 + c) * nb));
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
                            let p = if T::SIGNED { $dot(qa[r], _mm256_sign_epi8(av, q[r])) } else { $dot(q[r], av) };
                            let i = _mm256_cvtepi32_ps(p);
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

            /// One activation row (decode): scales converted in the loop, offsets/mins accumulated as
            /// scalars, so each weight byte is touched once.
            #[target_feature(enable = $features)]
            unsafe fn decode<T: Q32, const R: usize>(m: &Mm, r0: usize, c: usize) {
                let k = m.k;
                let nb = k / QK;
                let a = m.acts;
                let wp: [*const u8; R] = std::array::from_fn(|r| m.w.add((r0 + r) * m.row_bytes));
                let ap = a.qs.as_ptr().add(c * k);
                let dp = a.d.as_ptr().add(c * nb);
                let sp = a.s.as_ptr().add(c * nb);
                let mut acc = [_mm256_setzero_ps(); R];
                let mut corr = [0.0f32; R];
                for b in 0..nb {
                    let av = _mm256_loadu_si256(ap.add(b * QK) as *const __m256i);
                    let da = *dp.add(b);
                    let sa = *sp.add(b);
                    for r in 0..R {
                        let blk = wp[r].add(b * T::BYTES);
                        // Rows are streamed from memory once: fetch ahead so unpacking overlaps the loads.
                        _mm_prefetch::<_MM_HINT_T0>(blk.add(crate::kernels::avx2::PREFETCH) as *const i8);
                        let q = T::q(blk);
                        let (d, mn) = T::scale_min(blk);
                        let p =
                            if T::SIGNED { $dot(_mm256_sign_epi8(q, q), _mm256_sign_epi8(av, q)) } else { $dot(q, av) };
                        let i = _mm256_cvtepi32_ps(p);
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
        }
    };
}

/// 8 lanes of Σ(4 u8 × i8) with AVX2: `vpmaddubsw` then `vpmaddwd` against ones.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_maddubs(q: __m256i, a: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(q, a), _mm256_set1_epi16(1))
}

/// The same in one AVX-512 VNNI instruction (`vpdpbusd` on 256 bits).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn dot_vnni(q: __m256i, a: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, a)
}

q32_kernels!(avx2, "avx2,fma,f16c", dot_maddubs);
q32_kernels!(vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", dot_vnni);
