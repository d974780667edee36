//! AVX2 kernels for I8 weights (W8A8) against int8 activations with one scale per row: the
//! whole row's product is one exact integer dot (abs/sign trick: |w| as u8 × sign(w)·a through
//! `vpmaddubsw` + `vpmaddwd`, or `vpdpbusd` with AVX-512 VNNI), times the activation row's scale.
//! The weight row's scale is applied by the caller.

use super::util::{dispatch_rc, hsum_i32};
use crate::kernels::matmul::Mm;
use std::arch::x86_64::*;
use std::ops::Range;

/// acc + 8 lanes of Σ(4 u8 × i8) with AVX2 (pair sums stay below i16's limit: |w| ≤ 128, |a| ≤ 127).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_maddubs(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
}

/// The same with one AVX-512 VNNI instruction.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn dot_vnni(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, u, s)
}

macro_rules! i8row_kernels {
    ($name:ident, $features:literal, $dot:ident) => {
        pub(crate) mod $name {
            use super::*;

            /// Tile kernel entry (see `matmul::TileFn`).
            pub(crate) unsafe fn tile(m: &Mm, r0: usize, nr: usize, acts: Range<usize>) {
                let c_step = if acts.len() == 1 { 1 } else { 4 };
                let mut c0 = acts.start;
                while c0 < acts.end {
                    let nc = c_step.min(acts.end - c0);
                    dispatch_rc!(tile_rc, (), nr, nc, m, r0, c0);
                    c0 += nc;
                }
            }

            // `T` only because `dispatch_rc!` passes a type (one kernel here, no codec trait).
            #[allow(clippy::extra_unused_type_parameters)]
            #[target_feature(enable = $features)]
            unsafe fn tile_rc<T, const R: usize, const C: usize>(m: &Mm, r0: usize, c0: usize) {
                let k = m.k;
                let a = m.acts;
                let wp: [*const i8; R] = std::array::from_fn(|r| m.w.add((r0 + r) * m.row_bytes) as *const i8);
                let ap: [*const i8; C] = std::array::from_fn(|c| a.qs.as_ptr().add((c0 + c) * k));
                let mut acc = [[_mm256_setzero_si256(); C]; R];
                let k32 = k / 32 * 32;
                let mut j = 0;
                while j < k32 {
                    let mut w = [_mm256_setzero_si256(); R];
                    let mut u = [_mm256_setzero_si256(); R];
                    for r in 0..R {
                        if C == 1 && j % 64 == 0 {
                            _mm_prefetch::<_MM_HINT_T0>(wp[r].add(j + crate::kernels::avx2::PREFETCH));
                        }
                        w[r] = _mm256_loadu_si256(wp[r].add(j) as *const __m256i);
                        u[r] = _mm256_sign_epi8(w[r], w[r]);
                    }
                    for c in 0..C {
                        let av = _mm256_loadu_si256(ap[c].add(j) as *const __m256i);
                        for r in 0..R {
                            acc[r][c] = $dot(acc[r][c], u[r], _mm256_sign_epi8(av, w[r]));
                        }
                    }
                    j += 32;
                }
                for r in 0..R {
                    for c in 0..C {
                        let mut sum = hsum_i32(acc[r][c]);
                        for jj in k32..k {
                            sum += *wp[r].add(jj) as i32 * *ap[c].add(jj) as i32;
                        }
                        *m.y.add((c0 + c) * m.ldy + r0 + r) = *a.d.as_ptr().add(c0 + c) * sum as f32;
                    }
                }
            }
        }
    };
}

i8row_kernels!(avx2, "avx2,fma,f16c", dot_maddubs);
i8row_kernels!(vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", dot_vnni);
