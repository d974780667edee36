//! Packed 32-element block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) against Q8_0/Q8_1 activations.
//!
//! Per block and activation row: eight `vpdpbusd` give the 16 rows' integer dots; then
//! acc += dots·(d·d_a) and acc += m·s_a, where s_a = d_a·Σa carries the rows' offsets (value =
//! d·u + m), as the row-major kernels do.

use super::{bcast4, dispatch_c, f16x16, load, run4, Tile};
use crate::kernels::dtype::QK;
use std::arch::x86_64::*;

/// Activation rows per tile: 8 dot and 8 float accumulators stay in registers.
pub(super) const C: usize = 8;

pub(crate) trait Q32 {
    /// Bytes per block of a group.
    const BYTES: usize;
    /// Stored mins (Q4_1/Q5_1); otherwise m = -OFFSET·d.
    const HAS_MIN: bool;
    const OFFSET: f32;
    /// A fifth bit per element (Q5_0/Q5_1).
    const FIVE: bool;
    /// A byte per element (Q8_0).
    const WIDE: bool;
}

pub(crate) struct Q4_0;
pub(crate) struct Q4_1;
pub(crate) struct Q5_0;
pub(crate) struct Q5_1;
pub(crate) struct Q8_0;

macro_rules! q32_format {
    ($t:ident, $bytes:expr, $min:expr, $offset:expr, $five:expr, $wide:expr) => {
        impl Q32 for $t {
            const BYTES: usize = $bytes;
            const HAS_MIN: bool = $min;
            const OFFSET: f32 = $offset;
            const FIVE: bool = $five;
            const WIDE: bool = $wide;
        }
    };
}
q32_format!(Q4_0, 32 + 256, false, 8.0, false, false);
q32_format!(Q4_1, 64 + 256, true, 0.0, false, false);
q32_format!(Q5_0, 32 + 64 + 256, false, 16.0, true, false);
q32_format!(Q5_1, 64 + 64 + 256, true, 0.0, true, false);
q32_format!(Q8_0, 32 + 512, false, 128.0, false, true);

/// Tile entry (see `TileFn`).
pub(crate) unsafe fn tile<T: Q32>(t: &Tile, g: usize, c0: usize, nc: usize) {
    dispatch_c!(tile_c, [T], nc, t, g, c0)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_c<T: Q32, const NC: usize>(t: &Tile, g: usize, c0: usize) {
    debug_assert_eq!(crate::kernels::packed::Format::of(t.pm.dtype()).map(|f| f.block_bytes), Some(T::BYTES));
    let k = t.pm.cols;
    let nb = k / QK;
    let a = t.acts;
    let ap: [*const i8; NC] = std::array::from_fn(|c| a.qs.as_ptr().add((c0 + c) * k));
    let dp: [*const f32; NC] = std::array::from_fn(|c| a.d.as_ptr().add((c0 + c) * nb));
    let sp: [*const f32; NC] = std::array::from_fn(|c| a.s.as_ptr().add((c0 + c) * nb));
    let base = t.pm.group_ptr(g);
    let (at_qh, at_q) = {
        let at_qh = if T::HAS_MIN { 64 } else { 32 };
        (at_qh, at_qh + if T::FIVE { 64 } else { 0 })
    };
    let mut acc = [_mm512_setzero_ps(); NC];
    for b in 0..nb {
        let blk = base.add(b * T::BYTES);
        let d = f16x16(blk);
        let m = if T::HAS_MIN { f16x16(blk.add(32)) } else { _mm512_mul_ps(d, _mm512_set1_ps(-T::OFFSET)) };
        let (q, qh) = (blk.add(at_q), T::FIVE.then(|| blk.add(at_qh)));
        let mut dots = [_mm512_setzero_si512(); NC];
        for r in 0..8 {
            let w = if T::WIDE { load(q.add(64 * r)) } else { run4(q, qh, r) };
            for c in 0..NC {
                dots[c] = _mm512_dpbusd_epi32(dots[c], w, bcast4(ap[c].add(b * QK + 4 * r)));
            }
        }
        for c in 0..NC {
            let dd = _mm512_mul_ps(d, _mm512_set1_ps(*dp[c].add(b)));
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[c]), dd, acc[c]);
            acc[c] = _mm512_fmadd_ps(m, _mm512_set1_ps(*sp[c].add(b)), acc[c]);
        }
    }
    for c in 0..NC {
        t.store(g, c0 + c, acc[c]);
    }
}
