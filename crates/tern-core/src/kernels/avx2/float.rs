//! AVX2 kernels for F32/F16/BF16/F8E4M3 weights against f32 activations: FMA, converting
//! weights on the fly (F16C for f16, a 16-bit shift for bf16, shifts into f16 bits for E4M3).

use super::util::{dispatch_rc, hsum};
use crate::kernels::blocks::{bf16_to_f32, f16_to_f32};
use crate::kernels::matmul::Mm;
use std::arch::x86_64::*;
use std::ops::Range;

pub(crate) trait FloatW {
    const BYTES: usize;
    /// 8 weights at element offset j of row p, as f32.
    unsafe fn load8(p: *const u8, j: usize) -> __m256;
    unsafe fn load1(p: *const u8, j: usize) -> f32;
}

pub(crate) struct F32;
pub(crate) struct F16;
pub(crate) struct BF16;
pub(crate) struct F8E4M3;

impl FloatW for F32 {
    const BYTES: usize = 4;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u8, j: usize) -> __m256 {
        _mm256_loadu_ps((p as *const f32).add(j))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load1(p: *const u8, j: usize) -> f32 {
        std::ptr::read_unaligned((p as *const f32).add(j))
    }
}

impl FloatW for F16 {
    const BYTES: usize = 2;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u8, j: usize) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * j) as *const __m128i))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load1(p: *const u8, j: usize) -> f32 {
        f16_to_f32(std::ptr::read_unaligned(p.add(2 * j) as *const u16))
    }
}

impl FloatW for BF16 {
    const BYTES: usize = 2;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u8, j: usize) -> __m256 {
        let h = _mm_loadu_si128(p.add(2 * j) as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load1(p: *const u8, j: usize) -> f32 {
        bf16_to_f32(std::ptr::read_unaligned(p.add(2 * j) as *const u16))
    }
}

impl FloatW for F8E4M3 {
    const BYTES: usize = 1;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u8, j: usize) -> __m256 {
        // kernels::e4m3_to_f16_bits_scaled on 8 codes, then the 2⁸ back.
        let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(p.add(j) as *const __m128i));
        let sign = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8);
        let em = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 7);
        _mm256_mul_ps(_mm256_cvtph_ps(_mm_or_si128(sign, em)), _mm256_set1_ps(crate::kernels::E4M3_F16_SCALE))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load1(p: *const u8, j: usize) -> f32 {
        crate::kernels::e4m3_to_f32(*p.add(j))
    }
}

/// Tile kernel entry (see `matmul::TileFn`).
pub(crate) unsafe fn tile<T: FloatW>(m: &Mm, r0: usize, nr: usize, acts: Range<usize>) {
    let c_step = if acts.len() == 1 { 1 } else { 4 };
    let mut c0 = acts.start;
    while c0 < acts.end {
        let nc = c_step.min(acts.end - c0);
        dispatch_rc!(tile_rc, T, nr, nc, m, r0, c0);
        c0 += nc;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_rc<T: FloatW, const R: usize, const C: usize>(m: &Mm, r0: usize, c0: usize) {
    let k = m.k;
    let wp: [*const u8; R] = std::array::from_fn(|r| m.w.add((r0 + r) * m.row_bytes));
    let ap: [*const f32; C] = std::array::from_fn(|c| m.acts.f.as_ptr().add((c0 + c) * k));
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let k8 = k / 8 * 8;
    let mut j = 0;
    while j < k8 {
        let mut w = [_mm256_setzero_ps(); R];
        if C == 1 && (j * T::BYTES) % 64 == 0 {
            for p in wp {
                _mm_prefetch::<_MM_HINT_T0>(p.add(j * T::BYTES + super::PREFETCH) as *const i8);
            }
        }
        for r in 0..R {
            w[r] = T::load8(wp[r], j);
        }
        for c in 0..C {
            let a = _mm256_loadu_ps(ap[c].add(j));
            for r in 0..R {
                acc[r][c] = _mm256_fmadd_ps(w[r], a, acc[r][c]);
            }
        }
        j += 8;
    }
    for r in 0..R {
        for c in 0..C {
            let mut v = hsum(acc[r][c]);
            for jj in k8..k {
                v += T::load1(wp[r], jj) * *ap[c].add(jj);
            }
            *m.y.add((c0 + c) * m.ldy + r0 + r) = v;
        }
    }
}
