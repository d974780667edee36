//! Small AVX2 helpers shared by the kernels.

use std::arch::x86_64::*;

/// f16 bits → f32 with F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f16(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rd_u16(p: *const u8) -> u16 {
    std::ptr::read_unaligned(p as *const u16)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Sum of the 8 int32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// 16 bytes of nibbles → 32 bytes: low nibbles (elements 0..15), then high (16..31).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn nibbles16(p: *const u8) -> __m256i {
    // Same 16 bytes in both halves; the high half shifted right by 4 (one variable shift).
    let x = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
    let x = _mm256_srlv_epi32(x, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    _mm256_and_si256(x, _mm256_set1_epi8(0x0F))
}

/// 32 bits at p → 32 bytes, 0xFF where the bit (of the same index) is set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn bytes_from_bits32(p: *const u8) -> __m256i {
    let x = std::ptr::read_unaligned(p as *const u32);
    let shuf =
        _mm256_setr_epi64x(0x0000_0000_0000_0000, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// Calls `$f::<R, C>($args)` for runtime `nr`, `nc` in 1..=4.
macro_rules! dispatch_rc {
    ($f:ident, $t:ty, $nr:expr, $nc:expr, $($args:expr),*) => {
        match ($nr, $nc) {
            (1, 1) => $f::<$t, 1, 1>($($args),*),
            (1, 2) => $f::<$t, 1, 2>($($args),*),
            (1, 3) => $f::<$t, 1, 3>($($args),*),
            (1, 4) => $f::<$t, 1, 4>($($args),*),
            (2, 1) => $f::<$t, 2, 1>($($args),*),
            (2, 2) => $f::<$t, 2, 2>($($args),*),
            (2, 3) => $f::<$t, 2, 3>($($args),*),
            (2, 4) => $f::<$t, 2, 4>($($args),*),
            (3, 1) => $f::<$t, 3, 1>($($args),*),
            (3, 2) => $f::<$t, 3, 2>($($args),*),
            (3, 3) => $f::<$t, 3, 3>($($args),*),
            (3, 4) => $f::<$t, 3, 4>($($args),*),
            (4, 1) => $f::<$t, 4, 1>($($args),*),
            (4, 2) => $f::<$t, 4, 2>($($args),*),
            (4, 3) => $f::<$t, 4, 3>($($args),*),
            (4, 4) => $f::<$t, 4, 4>($($args),*),
            _ => unreachable!("tile {}x{}", $nr, $nc),
        }
    };
}
pub(crate) use dispatch_rc;
