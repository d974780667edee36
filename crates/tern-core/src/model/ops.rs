//! Element-wise and attention helpers of the decoder, in f32. The dot and attention loops use
//! AVX2+FMA when the CPU has it (detected at run time); the scalar versions are the oracle.

use std::sync::OnceLock;

fn has_avx2_fma() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var("TERN_CPU_FEATURES").map_or(true, |v| v != "scalar")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { x86::dot(a, b) };
    }
    dot_scalar(a, b)
}

pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// y += alpha * x
pub fn axpy_scalar(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// out[j] = scale · dot(q, row j), where row j is `rows[j * stride..][..q.len()]`: the
/// attention scores of one query head against consecutive cached keys, in one SIMD loop.
pub fn scaled_dots(q: &[f32], rows: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    assert!(out.is_empty() || (out.len() - 1) * stride + q.len() <= rows.len(), "scaled_dots: rows too short");
    scaled_dots_narrow(q, rows, stride, NO_SCALES, 0, scale, out)
}

/// out += Σ_j w[j] · row j, where row j is `rows[j * stride..][..out.len()]`: one query
/// head's attention-weighted sum of consecutive cached values.
pub fn weighted_sum(w: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    weighted_sum_narrow(w, rows, stride, NO_SCALES, 0, out)
}

/// A stored K/V element: f32, or a narrow one: int8 (with a row scale), f16, bf16 or FP8
/// E4M3 (with a row scale).
pub trait KvElem: Copy + Sync {
    fn to_f32(self) -> f32;
    /// The SIMD loads return the value divided by this (E4M3 goes through f16 at 2⁻⁸).
    const SIMD_SCALE: f32 = 1.0;
    /// 8 elements from `p` as f32 (divided by SIMD_SCALE).
    ///
    /// # Safety
    /// AVX2, FMA and F16C present; 8 elements readable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// 16 elements from `p` as f32 (divided by SIMD_SCALE).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL present; 16 elements readable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

/// f16 bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16Bits(pub u16);
/// bf16 bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16Bits(pub u16);
/// An FP8 E4M3 code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct E4m3(pub u8);

/// Row scales of 1 for the element types that need none (`sstride` 0).
pub const NO_SCALES: &[f32] = &[1.0];

/// out[j] = scale · scales[j * sstride] · dot(q, row j) over narrow rows (see [`scaled_dots`]).
pub fn scaled_dots_narrow<E: KvElem>(
    q: &[f32],
    rows: &[E],
    stride: usize,
    scales: &[f32],
    sstride: usize,
    scale: f32,
    out: &mut [f32],
) {
    assert!(out.is_empty() || (out.len() - 1) * stride + q.len() <= rows.len(), "scaled_dots: rows too short");
    assert!(out.is_empty() || (out.len() - 1) * sstride < scales.len(), "scaled_dots: scales too short");
    #[cfg(target_arch = "x86_64")]
    if x512::fits(q.len()) {
        // SAFETY: AVX-512 checked by `fits`; bounds asserted above.
        return unsafe { x512::scaled_dots(q, rows, stride, scales, sstride, scale, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_f16c() && q.len().is_multiple_of(8) {
        // SAFETY: AVX2+FMA+F16C checked; bounds asserted above.
        return unsafe { x86::scaled_dots_narrow(q, rows, stride, scales, sstride, scale, out) };
    }
    scaled_dots_narrow_scalar(q, rows, stride, scales, sstride, scale, out)
}

pub fn scaled_dots_narrow_scalar<E: KvElem>(
    q: &[f32],
    rows: &[E],
    stride: usize,
    scales: &[f32],
    sstride: usize,
    scale: f32,
    out: &mut [f32],
) {
    for (j, o) in out.iter_mut().enumerate() {
        let r = &rows[j * stride..j * stride + q.len()];
        *o = scale * scales[j * sstride] * q.iter().zip(r).map(|(&a, &b)| a * b.to_f32()).sum::<f32>();
    }
}

/// out += Σ_j w[j] · scales[j * sstride] · row j over narrow rows (see [`weighted_sum`]).
pub fn weighted_sum_narrow<E: KvElem>(
    w: &[f32],
    rows: &[E],
    stride: usize,
    scales: &[f32],
    sstride: usize,
    out: &mut [f32],
) {
    assert!(w.is_empty() || (w.len() - 1) * stride + out.len() <= rows.len(), "weighted_sum: rows too short");
    assert!(w.is_empty() || (w.len() - 1) * sstride < scales.len(), "weighted_sum: scales too short");
    #[cfg(target_arch = "x86_64")]
    if x512::fits(out.len()) {
        // SAFETY: AVX-512 checked by `fits`; bounds asserted above.
        return unsafe { x512::weighted_sum(w, rows, stride, scales, sstride, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_f16c() && out.len().is_multiple_of(8) {
        // SAFETY: AVX2+FMA+F16C checked; bounds asserted above.
        return unsafe { x86::weighted_sum_narrow(w, rows, stride, scales, sstride, out) };
    }
    weighted_sum_narrow_scalar(w, rows, stride, scales, sstride, out)
}

pub fn weighted_sum_narrow_scalar<E: KvElem>(
    w: &[f32],
    rows: &[E],
    stride: usize,
    scales: &[f32],
    sstride: usize,
    out: &mut [f32],
) {
    let d = out.len();
    for (j, &wj) in w.iter().enumerate() {
        let f = wj * scales[j * sstride];
        for (o, &r) in out.iter_mut().zip(&rows[j * stride..j * stride + d]) {
            *o += f * r.to_f32();
        }
    }
}

fn has_avx2_f16c() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            has_avx2_fma() && is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

impl KvElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl KvElem for i8 {
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const i8) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load16(p: *const i8) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
    }
}

impl KvElem for F16Bits {
    fn to_f32(self) -> f32 {
        half::f16::from_bits(self.0).to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const F16Bits) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load16(p: *const F16Bits) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

impl KvElem for Bf16Bits {
    fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Bf16Bits) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load16(p: *const Bf16Bits) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }
}

impl KvElem for E4m3 {
    fn to_f32(self) -> f32 {
        crate::kernels::e4m3_to_f32(self.0)
    }
    const SIMD_SCALE: f32 = crate::kernels::E4M3_F16_SCALE;
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const E4m3) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // See kernels::e4m3_to_f16_bits_scaled: sign to bit 15, exponent and mantissa up by 7.
        let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(p as *const __m128i));
        let sign = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8);
        let em = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 7);
        _mm256_cvtph_ps(_mm_or_si128(sign, em))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load16(p: *const E4m3) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let b = _mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const __m128i));
        let sign = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8);
        let em = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7);
        _mm512_cvtph_ps(_mm256_or_si256(sign, em))
    }
}

/// The attention loops on 512-bit registers: a head of up to 128 values stays in 8 registers,
/// and 16 positions' dot products are reduced together (a transpose-and-add tree of 45
/// shuffles and adds instead of 16 separate horizontal sums).
mod x512 {
    /// Whether the AVX-512 loops run for heads of `d` values on this CPU.
    pub fn fits(d: usize) -> bool {
        cfg!(target_arch = "x86_64")
            && d.is_multiple_of(16)
            && d <= 16 * MAX_CHUNKS
            && crate::kernels::cpu_level() >= crate::kernels::CpuLevel::Avx512
    }

    pub const MAX_CHUNKS: usize = 8;

    #[cfg(target_arch = "x86_64")]
    pub use imp::*;

    #[cfg(target_arch = "x86_64")]
    mod imp {
        use super::MAX_CHUNKS;
        use crate::model::ops::KvElem;
        use std::arch::x86_64::*;

        /// Lane i of the result = the sum of v[i]'s 16 lanes.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn reduce16(v: &[__m512; 16]) -> __m512 {
            // Pairs: per 128-bit block, [x0+x2, y0+y2, x1+x3, y1+y3].
            let a: [__m512; 8] = std::array::from_fn(|i| {
                let (x, y) = (v[2 * i], v[2 * i + 1]);
                _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y))
            });
            // Quads: per 128-bit block, the block sums of v[4i..4i+4].
            let b: [__m512; 4] = std::array::from_fn(|i| {
                let (x, y) = (a[2 * i], a[2 * i + 1]);
                _mm512_add_ps(_mm512_shuffle_ps::<0x44>(x, y), _mm512_shuffle_ps::<0xEE>(x, y))
            });
            // Then the four blocks of each.
            let c: [__m512; 2] = std::array::from_fn(|i| {
                let (x, y) = (b[2 * i], b[2 * i + 1]);
                _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(x, y), _mm512_shuffle_f32x4::<0xDD>(x, y))
            });
            _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(c[0], c[1]), _mm512_shuffle_f32x4::<0xDD>(c[0], c[1]))
        }

        /// e^x for 16 lanes: x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r by its Taylor polynomial
        /// to r⁶ (relative error < 2e-7), times 2^n by `vscalefps` (which also gives 0 for
        /// very negative x and +inf past the range).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn exp16(x: __m512) -> __m512 {
            let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
                x,
                _mm512_set1_ps(std::f32::consts::LOG2_E),
            ));
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
            let mut p = _mm512_set1_ps(1.0 / 720.0);
            for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            _mm512_scalef_ps(p, n)
        }

        /// Lanes of `x[i..]` that exist, as a mask (all 16 but at the end).
        #[inline]
        fn tail(len: usize, i: usize) -> __mmask16 {
            let left = (len - i).min(16);
            ((1u32 << left) - 1) as __mmask16
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        pub unsafe fn softmax(x: &mut [f32]) {
            let p = x.as_mut_ptr();
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            for i in (0..x.len()).step_by(16) {
                let v = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), tail(x.len(), i), p.add(i));
                m = _mm512_max_ps(m, v);
            }
            let max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
            let mut sum = _mm512_setzero_ps();
            for i in (0..x.len()).step_by(16) {
                let k = tail(x.len(), i);
                let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), max));
                let e = _mm512_maskz_mov_ps(k, e);
                sum = _mm512_add_ps(sum, e);
                _mm512_mask_storeu_ps(p.add(i), k, e);
            }
            let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
            for i in (0..x.len()).step_by(16) {
                let k = tail(x.len(), i);
                _mm512_mask_storeu_ps(p.add(i), k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p.add(i)), inv));
            }
        }

        /// Requires gate.len() == up.len().
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
            let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
            let one = _mm512_set1_ps(1.0);
            for i in (0..gate.len()).step_by(16) {
                let k = tail(gate.len(), i);
                let x = _mm512_maskz_loadu_ps(k, g.add(i));
                let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
                let y = _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_maskz_loadu_ps(k, u.add(i)));
                _mm512_mask_storeu_ps(g.add(i), k, y);
            }
        }

        /// Calls `$f::<E, NQ>` for the run-time chunk count (1..=8), so that the head's
        /// registers are a fixed-size array the compiler keeps in registers.
        macro_rules! by_chunks {
            ($f:ident, $nq:expr, $($args:expr),*) => {
                match $nq {
                    1 => $f::<E, 1>($($args),*),
                    2 => $f::<E, 2>($($args),*),
                    3 => $f::<E, 3>($($args),*),
                    4 => $f::<E, 4>($($args),*),
                    5 => $f::<E, 5>($($args),*),
                    6 => $f::<E, 6>($($args),*),
                    7 => $f::<E, 7>($($args),*),
                    _ => $f::<E, MAX_CHUNKS>($($args),*),
                }
            };
        }

        /// out[j] = scale · scales[j·sstride] · dot(q, row j). Requires `fits(q.len())` and
        /// every row and scale in bounds.
        pub unsafe fn scaled_dots<E: KvElem>(
            q: &[f32],
            rows: &[E],
            stride: usize,
            scales: &[f32],
            sstride: usize,
            scale: f32,
            out: &mut [f32],
        ) {
            by_chunks!(scaled_dots_n, q.len() / 16, q, rows, stride, scales, sstride, scale, out)
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn scaled_dots_n<E: KvElem, const NQ: usize>(
            q: &[f32],
            rows: &[E],
            stride: usize,
            scales: &[f32],
            sstride: usize,
            scale: f32,
            out: &mut [f32],
        ) {
            let qv: [__m512; NQ] = std::array::from_fn(|c| _mm512_loadu_ps(q.as_ptr().add(16 * c)));
            let scale = scale * E::SIMD_SCALE;
            for (j0, o) in (0..out.len()).step_by(16).zip(out.chunks_mut(16)) {
                let mut acc = [_mm512_setzero_ps(); 16];
                for (jj, a) in acc.iter_mut().enumerate().take(o.len()) {
                    let r = rows.as_ptr().add((j0 + jj) * stride);
                    for (c, q) in qv.iter().enumerate() {
                        *a = _mm512_fmadd_ps(*q, E::load16(r.add(16 * c)), *a);
                    }
                }
                let mut sums = [0f32; 16];
                _mm512_storeu_ps(sums.as_mut_ptr(), reduce16(&acc));
                for (jj, o) in o.iter_mut().enumerate() {
                    *o = scale * scales[(j0 + jj) * sstride] * sums[jj];
                }
            }
        }

        /// out += Σ_j w[j] · scales[j·sstride] · row j. Requires `fits(out.len())` and every
        /// row and scale in bounds.
        pub unsafe fn weighted_sum<E: KvElem>(
            w: &[f32],
            rows: &[E],
            stride: usize,
            scales: &[f32],
            sstride: usize,
            out: &mut [f32],
        ) {
            by_chunks!(weighted_sum_n, out.len() / 16, w, rows, stride, scales, sstride, out)
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn weighted_sum_n<E: KvElem, const NQ: usize>(
            w: &[f32],
            rows: &[E],
            stride: usize,
            scales: &[f32],
            sstride: usize,
            out: &mut [f32],
        ) {
            let o = out.as_mut_ptr();
            let mut acc: [__m512; NQ] = std::array::from_fn(|c| _mm512_loadu_ps(o.add(16 * c)));
            for (j, &wj) in w.iter().enumerate() {
                let r = rows.as_ptr().add(j * stride);
                let wv = _mm512_set1_ps(wj * scales[j * sstride] * E::SIMD_SCALE);
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(wv, E::load16(r.add(16 * c)), *a);
                }
            }
            for (c, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(o.add(16 * c), *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        _mm_cvtss_f32(_mm_add_ss(v, _mm_shuffle_ps(v, v, 1)))
    }

    /// Lane i of the result = the sum of v[i]'s 8 lanes (the same tree for every lane).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn reduce8(v: &[__m256; 8]) -> __m256 {
        let a: [__m256; 4] = std::array::from_fn(|i| _mm256_hadd_ps(v[2 * i], v[2 * i + 1]));
        // Per 128-bit half: the half-sums of v[0..4] (b0) and v[4..8] (b1).
        let (b0, b1) = (_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(b0, b1), _mm256_permute2f128_ps::<0x31>(b0, b1))
    }

    /// The dots of q with n ≤ 8 consecutive rows from `r`: one accumulator per row, so the
    /// rows' FMA chains run side by side, then one transpose-and-add tree.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dots8<E: super::KvElem>(q: &[f32], r: *const E, stride: usize, n: usize) -> [f32; 8] {
        let mut acc = [_mm256_setzero_ps(); 8];
        for i in (0..q.len()).step_by(8) {
            let qv = _mm256_loadu_ps(q.as_ptr().add(i));
            for (jj, a) in acc.iter_mut().enumerate().take(n) {
                *a = _mm256_fmadd_ps(qv, E::load8(r.add(jj * stride + i)), *a);
            }
        }
        let mut sums = [0f32; 8];
        _mm256_storeu_ps(sums.as_mut_ptr(), reduce8(&acc));
        sums
    }

    /// Requires q.len() % 8 == 0 and every row and scale in bounds.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scaled_dots_narrow<E: super::KvElem>(
        q: &[f32],
        rows: &[E],
        stride: usize,
        scales: &[f32],
        sstride: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let scale = scale * E::SIMD_SCALE;
        for (j0, o) in (0..out.len()).step_by(8).zip(out.chunks_mut(8)) {
            let r = rows.as_ptr().add(j0 * stride);
            // Full chunks get the loop with its row count fixed (unrolled).
            let sums = if o.len() == 8 { dots8(q, r, stride, 8) } else { dots8(q, r, stride, o.len()) };
            for (jj, o) in o.iter_mut().enumerate() {
                *o = scale * scales[(j0 + jj) * sstride] * sums[jj];
            }
        }
    }

    /// Requires out.len() % 8 == 0 and every row and scale in bounds.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sum_narrow<E: super::KvElem>(
        w: &[f32],
        rows: &[E],
        stride: usize,
        scales: &[f32],
        sstride: usize,
        out: &mut [f32],
    ) {
        // Up to 64 values of the head at a time stay in registers across all rows.
        let d = out.len();
        for i in (0..d).step_by(64) {
            let o = &mut out[i..(i + 64).min(d)];
            let r = rows.as_ptr().add(i);
            match o.len() / 8 {
                1 => weighted_sum_n::<E, 1>(w, r, stride, scales, sstride, o),
                2 => weighted_sum_n::<E, 2>(w, r, stride, scales, sstride, o),
                3 => weighted_sum_n::<E, 3>(w, r, stride, scales, sstride, o),
                4 => weighted_sum_n::<E, 4>(w, r, stride, scales, sstride, o),
                5 => weighted_sum_n::<E, 5>(w, r, stride, scales, sstride, o),
                6 => weighted_sum_n::<E, 6>(w, r, stride, scales, sstride, o),
                7 => weighted_sum_n::<E, 7>(w, r, stride, scales, sstride, o),
                _ => weighted_sum_n::<E, 8>(w, r, stride, scales, sstride, o),
            }
        }
    }

    /// out (8·NQ values) += Σ_j w[j] · scales[j·sstride] · row j, rows from `r`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weighted_sum_n<E: super::KvElem, const NQ: usize>(
        w: &[f32],
        r: *const E,
        stride: usize,
        scales: &[f32],
        sstride: usize,
        out: &mut [f32],
    ) {
        let o = out.as_mut_ptr();
        let mut acc: [__m256; NQ] = std::array::from_fn(|c| _mm256_loadu_ps(o.add(8 * c)));
        for (j, &wj) in w.iter().enumerate() {
            let row = r.add(j * stride);
            let wv = _mm256_set1_ps(wj * scales[j * sstride] * E::SIMD_SCALE);
            for (c, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(wv, E::load8(row.add(8 * c)), *a);
            }
        }
        for (c, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.add(8 * c), *a);
        }
    }

    /// e^x for 8 lanes: x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r by its Taylor polynomial to
    /// r⁶ (relative error < 2e-7), times 2^n built in the exponent bits. x is clamped to
    /// [-87, 88], where 2^n stays a normal float (e^-87 ≈ 1.6e-38 stands in for 0).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(p, _mm256_castsi256_ps(pow2))
    }

    /// In-place softmax, 8 lanes at a time (the tail in scalar code with the same exp).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn softmax(x: &mut [f32]) {
        let n8 = x.len() / 8 * 8;
        let p = x.as_mut_ptr();
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for i in (0..n8).step_by(8) {
            m = _mm256_max_ps(m, _mm256_loadu_ps(p.add(i)));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let max = x[n8..].iter().chain(&lanes).copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = _mm256_setzero_ps();
        for i in (0..n8).step_by(8) {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), _mm256_set1_ps(max)));
            sum = _mm256_add_ps(sum, e);
            _mm256_storeu_ps(p.add(i), e);
        }
        let mut total = hsum(sum);
        for v in x[n8..].iter_mut() {
            *v = _mm256_cvtss_f32(exp8(_mm256_set1_ps(*v - max)));
            total += *v;
        }
        let inv = 1.0 / total;
        x.iter_mut().for_each(|v| *v *= inv);
    }

    /// gate <- silu(gate) · up, 8 lanes at a time. Requires gate.len() == up.len().
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        let n8 = gate.len() / 8 * 8;
        let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
        let one = _mm256_set1_ps(1.0);
        for i in (0..n8).step_by(8) {
            let x = _mm256_loadu_ps(g.add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
            _mm256_storeu_ps(
                g.add(i),
                _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u.add(i))),
            );
        }
        super::silu_mul_scalar(&mut gate[n8..], &up[n8..]);
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8 * j)), _mm256_loadu_ps(pb.add(i + 8 * j)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
            i += 8;
        }
        let mut total = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        while i < n {
            total += a[i] * b[i];
            i += 1;
        }
        total
    }
}

/// out = x / rms(x) * weight, row by row.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss = dot(xr, xr) / d as f32;
        let scale = 1.0 / (ss + eps).sqrt();
        for ((o, &xv), &w) in or.iter_mut().zip(xr).zip(weight) {
            *o = xv * scale * w;
        }
    }
}

/// gate <- silu(gate) * up
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if x512::fits(16) {
        // SAFETY: AVX-512 checked by `fits`; equal lengths asserted.
        return unsafe { x512::silu_mul(gate, up) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_f16c() {
        // SAFETY: AVX2+FMA+F16C checked; equal lengths asserted.
        return unsafe { x86::silu_mul(gate, up) };
    }
    silu_mul_scalar(gate, up)
}

pub fn silu_mul_scalar(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if x512::fits(16) {
        // SAFETY: AVX-512 checked by `fits`.
        return unsafe { x512::softmax(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_f16c() {
        // SAFETY: AVX2+FMA+F16C checked.
        return unsafe { x86::softmax(x) };
    }
    softmax_scalar(x)
}

pub fn softmax_scalar(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn softmax_and_silu_match_scalar() {
        let mut rng = Rng::new(5);
        for n in [1, 5, 16, 37, 300] {
            // Wide ranges: large negative scores (exp underflows) and large activations.
            let x: Vec<f32> = (0..n).map(|_| 30.0 * rng.normal()).collect();
            let (mut got, mut want) = (x.clone(), x.clone());
            softmax(&mut got);
            softmax_scalar(&mut want);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-6 + 1e-5 * b, "softmax n {n}: {a} vs {b}");
            }
            let up: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let (mut got, mut want) = (x.clone(), x.clone());
            silu_mul(&mut got, &up);
            silu_mul_scalar(&mut want, &up);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "silu n {n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn attention_loops_match_scalar() {
        let mut rng = Rng::new(2);
        for (d, stride, n) in [(64, 192, 37), (128, 256, 5), (8, 8, 1), (40, 48, 9), (12, 12, 3)] {
            let rows: Vec<f32> = (0..n * stride).map(|_| rng.normal()).collect();
            let q: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
            let mut got = vec![0.0; n];
            scaled_dots(&q, &rows, stride, 0.5, &mut got);
            for (j, g) in got.iter().enumerate() {
                let want = 0.5 * dot_scalar(&q, &rows[j * stride..j * stride + d]);
                assert!((g - want).abs() < 1e-4 * (d as f32), "d {d} row {j}: {g} vs {want}");
            }
            let w: Vec<f32> = (0..n).map(|_| rng.next_f32()).collect();
            let mut got = vec![1.0; d];
            let mut want = vec![1.0; d];
            weighted_sum(&w, &rows, stride, &mut got);
            for (j, &wj) in w.iter().enumerate() {
                axpy_scalar(wj, &rows[j * stride..j * stride + d], &mut want);
            }
            assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-4 * n as f32), "d {d}");
        }
    }

    fn narrow_loops_match_scalar<E: KvElem>(mut elem: impl FnMut(&mut Rng) -> E, scaled: bool) {
        let mut rng = Rng::new(3);
        // (head dim, row stride, scale stride, rows)
        for (d, stride, sstride, n) in
            [(64, 192, 3, 37), (128, 256, 2, 5), (8, 8, 1, 1), (40, 48, 1, 9), (12, 12, 1, 3)]
        {
            let rows: Vec<E> = (0..n * stride).map(|_| elem(&mut rng)).collect();
            let owned: Vec<f32> = (0..n * sstride).map(|_| rng.next_f32() * 0.01).collect();
            let (scales, sstride) = if scaled { (&owned[..], sstride) } else { (NO_SCALES, 0) };
            let q: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
            let (mut got, mut want) = (vec![0.0; n], vec![0.0; n]);
            scaled_dots_narrow(&q, &rows, stride, scales, sstride, 0.5, &mut got);
            scaled_dots_narrow_scalar(&q, &rows, stride, scales, sstride, 0.5, &mut want);
            let close = |a: &f32, b: &f32| (a - b).abs() <= 1e-4 * (1.0 + b.abs());
            assert!(got.iter().zip(&want).all(|(a, b)| close(a, b)), "d {d}: {got:?} vs {want:?}");
            let w: Vec<f32> = (0..n).map(|_| rng.next_f32()).collect();
            let (mut got, mut want) = (vec![1.0; d], vec![1.0; d]);
            weighted_sum_narrow(&w, &rows, stride, scales, sstride, &mut got);
            weighted_sum_narrow_scalar(&w, &rows, stride, scales, sstride, &mut want);
            assert!(got.iter().zip(&want).all(|(a, b)| close(a, b)), "d {d}");
        }
    }

    #[test]
    fn narrow_attention_loops_match_scalar() {
        narrow_loops_match_scalar(|r| (r.next_u64() % 255) as i8, true);
        narrow_loops_match_scalar(|r| F16Bits(half::f16::from_f32(r.normal()).to_bits()), false);
        narrow_loops_match_scalar(|r| Bf16Bits((r.normal().to_bits() >> 16) as u16), false);
        // Every finite E4M3 code, both signs (0x7F/0xFF are NaN).
        narrow_loops_match_scalar(
            |r| {
                let b = r.next_u64() as u8;
                E4m3(if b & 0x7F == 0x7F { b - 1 } else { b })
            },
            true,
        );
    }

    #[test]
    fn simd_dot_matches_scalar() {
        let mut rng = Rng::new(1);
        for n in [0, 1, 7, 8, 31, 33, 64, 127] {
            let a: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            assert!((dot(&a, &b) - dot_scalar(&a, &b)).abs() < 1e-4 * (n as f32 + 1.0));
        }
    }
}
