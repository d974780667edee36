//! AVX-512 VNNI kernels over row-interleaved packed weights (`kernels::packed`).
//!
//! A tile is one group of 16 weight rows × C activation rows. Per block, the group's quants are
//! unpacked once into eight 64-byte operands (four elements of each of the 16 rows), and each
//! activation row adds `vpdpbusd(operand, its four bytes broadcast)` into one int32 register:
//! after eight, lane l holds row l's exact integer dot product for the block. Scales are then
//! applied to all 16 rows with one vector FMA. Every output lane is accumulated in the same
//! order whatever C is, so a row's result never depends on the rest of the batch.

// Tile loops index several const-size register arrays with one counter.
#![allow(clippy::needless_range_loop)]

mod kquants;
mod q32;

use super::acts::QuantizedActs;
use super::dtype::DType;
use super::packed::{walk_tiles, PackedMatrix, GROUP};
use std::arch::x86_64::*;
use std::ops::Range;

/// What a tile kernel sees.
pub(crate) struct Tile<'a> {
    pub pm: &'a PackedMatrix,
    pub acts: &'a QuantizedActs,
    pub y: *mut f32,
    pub ldy: usize,
}

impl Tile<'_> {
    /// Stores row c's 16 outputs of group g (only the rows the matrix has).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(&self, g: usize, c: usize, v: __m512) {
        let valid = (self.pm.rows - g * GROUP).min(GROUP);
        let mask = (((1u32 << valid) - 1) & 0xFFFF) as __mmask16;
        _mm512_mask_storeu_ps(self.y.add(c * self.ldy + g * GROUP), mask, v);
    }
}

type TileFn = unsafe fn(t: &Tile, g: usize, c0: usize, nc: usize);

/// y[i * ldy + r] = dot(W[r, :], act[i, :]) for the rows of `groups` and every activation row.
///
/// # Safety
/// The CPU supports AVX-512 F/BW/VL/VNNI; `acts` are quantized for the matrix's dtype with its
/// column count; y is valid for writes at those indices; threads pass disjoint `groups`.
pub(crate) unsafe fn matmul_groups(
    pm: &PackedMatrix,
    groups: Range<usize>,
    acts: &QuantizedActs,
    y: *mut f32,
    ldy: usize,
) {
    let (tile, c_max): (TileFn, usize) = match pm.dtype() {
        DType::Q4_0 => (q32::tile::<q32::Q4_0>, q32::C),
        DType::Q4_1 => (q32::tile::<q32::Q4_1>, q32::C),
        DType::Q5_0 => (q32::tile::<q32::Q5_0>, q32::C),
        DType::Q5_1 => (q32::tile::<q32::Q5_1>, q32::C),
        DType::Q8_0 => (q32::tile::<q32::Q8_0>, q32::C),
        DType::Q4_K => (kquants::tile_k4::<false>, kquants::C),
        DType::Q5_K => (kquants::tile_k4::<true>, kquants::C),
        DType::Q6_K => (kquants::tile_q6k, kquants::C),
        other => unreachable!("no packed kernel for {other}"),
    };
    let t = Tile { pm, acts, y, ldy };
    walk_tiles(groups, acts.n_rows(), pm.cols, c_max, |g, c0, nc| tile(&t, g, c0, nc));
}

/// Calls `$f::<$($g,)* NC>($args)` for a run-time `nc` in 1..=8.
macro_rules! dispatch_c {
    ($f:ident, [$($g:ty),*], $nc:expr, $($args:expr),*) => {
        match $nc {
            1 => $f::<$($g,)* 1>($($args),*),
            2 => $f::<$($g,)* 2>($($args),*),
            3 => $f::<$($g,)* 3>($($args),*),
            4 => $f::<$($g,)* 4>($($args),*),
            5 => $f::<$($g,)* 5>($($args),*),
            6 => $f::<$($g,)* 6>($($args),*),
            7 => $f::<$($g,)* 7>($($args),*),
            8 => $f::<$($g,)* 8>($($args),*),
            _ => unreachable!("tile of {} activation rows", $nc),
        }
    };
}
pub(crate) use dispatch_c;

/// 16 f16 at p → 16 f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn f16x16(p: *const u8) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn load(p: *const u8) -> __m512i {
    _mm512_loadu_si512(p as *const _)
}

/// Four activation bytes at p, broadcast to every lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn bcast4(p: *const i8) -> __m512i {
    _mm512_set1_epi32((p as *const i32).read_unaligned())
}

/// Run r (0..8) of a 32-element block in the 4-bit layout: nibbles of vector r % 4, low for
/// r < 4, high after; with a fifth bit from `qh` (8 u64 masks) when given.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn run4(q: *const u8, qh: Option<*const u8>, r: usize) -> __m512i {
    let v = load(q.add(64 * (r % 4)));
    let v = if r < 4 { v } else { _mm512_srli_epi16(v, 4) };
    let v = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
    match qh {
        None => v,
        Some(qh) => {
            let k = _cvtu64_mask64((qh.add(8 * r) as *const u64).read_unaligned());
            _mm512_mask_add_epi8(v, k, v, _mm512_set1_epi8(0x10))
        }
    }
}
