//! AVX2 kernels over the row-interleaved packed weights (`kernels::packed`), for CPUs without
//! AVX-512 VNNI.
//!
//! The layout's 64-byte vectors hold 16 rows; their low 32 bytes are rows 0-7 and the high 32
//! bytes rows 8-15 (likewise the first and second half of every scale vector and of the 5-bit
//! masks), so a 256-bit kernel takes a group as two halves of 8 rows. Per block and activation
//! row, `vpmaddubsw(weights, four activation bytes broadcast)` gives each of the 8 rows two
//! 16-bit pair sums; those are added in 16 bits for as many runs as cannot overflow (8 runs of
//! 4-bit quants, 4 of 5-bit), then one `vpmaddwd` against ones or the rows' sub-block scales
//! widens them to the rows' int32 dots. Unpacked weights are reused by every
//! activation row of the tile, and no horizontal sum is ever needed: lane l is row l. The
//! integers are exact (the bounds above keep every 16-bit sum inside ±32,767 for activations
//! in ±127), and every row is accumulated in the same order whatever the batch. Q6_K has no kernel here (see `packed::packed_kernel_at`).

// Tile loops index several const-size register arrays with one counter.
#![allow(clippy::needless_range_loop)]

use crate::kernels::acts::QuantizedActs;
use crate::kernels::dtype::{DType, QK, QK_K};
use crate::kernels::packed::{walk_tiles, Format, PackedMatrix, GROUP};
use std::arch::x86_64::*;
use std::ops::Range;

/// Rows per half group: the 8 int32 / f32 lanes of a 256-bit register.
const HALF: usize = GROUP / 2;

/// Activation rows per tile: an int16 sum, an int32 and an f32 accumulator per row stay in
/// the 16 registers beside the unpacked weights.
const C_Q32: usize = 3;
const C_KQ: usize = 3;

struct Tile<'a> {
    pm: &'a PackedMatrix,
    acts: &'a QuantizedActs,
    y: *mut f32,
    ldy: usize,
}

impl Tile<'_> {
    /// Rows of half h of group g that the matrix has (0 for a padding half).
    fn valid(&self, g: usize, h: usize) -> usize {
        self.pm.rows.saturating_sub(g * GROUP + h * HALF).min(HALF)
    }

    /// Stores activation row c's 8 outputs of half h of group g (only the rows that exist).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn store(&self, g: usize, h: usize, c: usize, v: __m256) {
        let valid = self.valid(g, h) as i32;
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        _mm256_maskstore_ps(self.y.add(c * self.ldy + g * GROUP + h * HALF), mask, v);
    }
}

/// A tile: halves h0..h0 + nh of group g against activation rows c0..c0 + nc.
type TileFn = unsafe fn(t: &Tile, g: usize, h0: usize, nh: usize, c0: usize, nc: usize);

/// y[i * ldy + r] = dot(W[r, :], act[i, :]) for the rows of `groups` and every activation row.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `acts` are quantized for the matrix's dtype with its
/// column count; y is valid for writes at those indices; threads pass disjoint `groups`.
pub(crate) unsafe fn matmul_groups(
    pm: &PackedMatrix,
    groups: Range<usize>,
    acts: &QuantizedActs,
    y: *mut f32,
    ldy: usize,
) {
    let (tile, c_max): (TileFn, usize) = match pm.dtype() {
        DType::Q4_0 => (q32_tile::<Q4_0>, C_Q32),
        DType::Q4_1 => (q32_tile::<Q4_1>, C_Q32),
        DType::Q5_0 => (q32_tile::<Q5_0>, C_Q32),
        DType::Q5_1 => (q32_tile::<Q5_1>, C_Q32),
        DType::Q8_0 => (q32_tile::<Q8_0>, C_Q32),
        DType::Q4_K => (k4_tile::<false>, C_KQ),
        DType::Q5_K => (k4_tile::<true>, C_KQ),
        other => unreachable!("no packed kernel for {other}"),
    };
    let t = Tile { pm, acts, y, ldy };
    walk_tiles(groups, acts.n_rows(), pm.cols, c_max, |g, c0, nc| {
        if nc == 1 && t.valid(g, 1) > 0 {
            // One activation row: both halves in one pass, so each line of weights is read
            // once and each activation broadcast serves 16 rows.
            tile(&t, g, 0, 2, c0, 1);
        } else {
            for h in 0..2 {
                if t.valid(g, h) > 0 {
                    tile(&t, g, h, 1, c0, nc);
                }
            }
        }
    });
}

/// Calls `$f::<$($g,)* H, NC>($args)` for run-time halves `nh` and rows `nc`: both halves with
/// one row, or one half with 1..=4 rows.
macro_rules! dispatch {
    ($f:ident, [$($g:ty),*], $nh:expr, $nc:expr, $($args:expr),*) => {
        match ($nh, $nc) {
            (2, 1) => $f::<$($g,)* 2, 1>($($args),*),
            (1, 1) => $f::<$($g,)* 1, 1>($($args),*),
            (1, 2) => $f::<$($g,)* 1, 2>($($args),*),
            (1, 3) => $f::<$($g,)* 1, 3>($($args),*),
            (1, 4) => $f::<$($g,)* 1, 4>($($args),*),
            _ => unreachable!("tile of {} halves × {} activation rows", $nh, $nc),
        }
    };
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// 8 f16 at p → 8 f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16x8(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// Four activation bytes at p, broadcast to every lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bcast4(p: *const i8) -> __m256i {
    _mm256_set1_epi32((p as *const i32).read_unaligned())
}

/// 8 unsigned (or signed) bytes at p as the int16 pair (v, v) of each int32 lane: the
/// multiplier `vpmaddwd` applies to both pair sums of a row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pair16<const SIGNED: bool>(p: *const u8) -> __m256i {
    let b = _mm_loadl_epi64(p as *const __m128i);
    let v = if SIGNED { _mm256_cvtepi8_epi32(b) } else { _mm256_cvtepu8_epi32(b) };
    _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(v, 16))
}

/// The bsums pair (2i, 2i+1) at p, broadcast as two int16 per lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bsum_pair(p: *const i16, i: usize) -> __m256i {
    _mm256_set1_epi32((p.add(2 * i) as *const i32).read_unaligned())
}

/// Run r (0..8) of a 32-element block in the 4-bit layout, half already applied to `q`:
/// nibbles of vector r % 4, low for r < 4, high after; with the fifth bit from `qh` (the half's
/// 32 bits of each of 8 u64 masks) when given.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run4(q: *const u8, qh: Option<*const u8>, r: usize) -> __m256i {
    let v = load(q.add(64 * (r % 4)));
    let v = if r < 4 { v } else { _mm256_srli_epi16(v, 4) };
    let v = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
    match qh {
        None => v,
        Some(qh) => _mm256_or_si256(v, fifth_bits(qh.add(8 * r))),
    }
}

/// 0x10 in byte i where bit i of the 32-bit mask at p is set. Byte i = 4·lane + e takes byte
/// i / 8 of the mask and tests bit i % 8 of it.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fifth_bits(p: *const u8) -> __m256i {
    static SPREAD: [u8; 32] = {
        let mut t = [0u8; 32];
        let mut i = 0;
        while i < 32 {
            t[i] = (i % 16 / 8) as u8 + if i >= 16 { 2 } else { 0 };
            i += 1;
        }
        t
    };
    static BIT: [u8; 32] = {
        let mut t = [0u8; 32];
        let mut i = 0;
        while i < 32 {
            t[i] = 1 << (i % 8);
            i += 1;
        }
        t
    };
    let bit = _mm256_loadu_si256(BIT.as_ptr() as *const __m256i);
    let v = _mm256_shuffle_epi8(bcast4(p as *const i8), _mm256_loadu_si256(SPREAD.as_ptr() as *const __m256i));
    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit), _mm256_set1_epi8(0x10))
}

/// The int32 dots of 8 runs of unsigned 4/5-bit quants (halves h0..h0 + H of the layout at `q`,
/// fifth bits at `qh`) against NC activation rows, scaled per lane by `mul[hh]` (int16 pairs:
/// ones, or the rows' sub-block scales) and added into `out`. 5-bit sums are widened every 4
/// runs, 4-bit ones after all 8.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots8<const H: usize, const NC: usize>(
    q: *const u8,
    qh: Option<*const u8>,
    h0: usize,
    a: &[*const i8; NC],
    mul: &[__m256i; H],
    out: &mut [[__m256i; NC]; H],
) {
    let per = if qh.is_some() { 4 } else { 8 };
    for r0 in (0..8).step_by(per) {
        let mut s = [[_mm256_setzero_si256(); NC]; H];
        for r in r0..r0 + per {
            let x: [__m256i; NC] = std::array::from_fn(|c| bcast4(a[c].add(4 * r)));
            for hh in 0..H {
                let w = run4(q.add(32 * (h0 + hh)), qh.map(|p| p.add(4 * (h0 + hh))), r);
                for c in 0..NC {
                    let p = _mm256_maddubs_epi16(w, x[c]);
                    s[hh][c] = if r == r0 { p } else { _mm256_add_epi16(s[hh][c], p) };
                }
            }
        }
        for hh in 0..H {
            for c in 0..NC {
                out[hh][c] = _mm256_add_epi32(out[hh][c], _mm256_madd_epi16(s[hh][c], mul[hh]));
            }
        }
    }
}

trait Q32 {
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

struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q5_1;
struct Q8_0;

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

unsafe fn q32_tile<T: Q32>(t: &Tile, g: usize, h0: usize, nh: usize, c0: usize, nc: usize) {
    dispatch!(q32_c, [T], nh, nc, t, g, h0, c0)
}

/// Per block: acc += dots·(d·d_a) + m·s_a, with s_a = d_a·Σa carrying the rows' offsets
/// (value = d·u + m). Q8_0's unsigned codes (u = q + 128) would overflow the 16-bit pair
/// sums, so its weights are made signed again and multiplied with the sign trick instead
/// (|q| × a·sign(q)), one `vpmaddwd` per run.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q32_c<T: Q32, const H: usize, const NC: usize>(t: &Tile, g: usize, h0: usize, c0: usize) {
    debug_assert_eq!(Format::of(t.pm.dtype()).map(|f| f.block_bytes), Some(T::BYTES));
    let k = t.pm.cols;
    let nb = k / QK;
    let a = t.acts;
    let ap: [*const i8; NC] = std::array::from_fn(|c| a.qs.as_ptr().add((c0 + c) * k));
    let dp: [*const f32; NC] = std::array::from_fn(|c| a.d.as_ptr().add((c0 + c) * nb));
    let sp: [*const f32; NC] = std::array::from_fn(|c| a.s.as_ptr().add((c0 + c) * nb));
    let base = t.pm.group_ptr(g);
    let at_qh = if T::HAS_MIN { 64 } else { 32 };
    let at_q = at_qh + if T::FIVE { 64 } else { 0 };
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); NC]; H];
    for b in 0..nb {
        let blk = base.add(b * T::BYTES);
        let q = blk.add(at_q);
        let ab: [*const i8; NC] = std::array::from_fn(|c| ap[c].add(b * QK));
        let mut dots = [[_mm256_setzero_si256(); NC]; H];
        if T::WIDE {
            for r in 0..8 {
                let x: [__m256i; NC] = std::array::from_fn(|c| bcast4(ab[c].add(4 * r)));
                for hh in 0..H {
                    let w = _mm256_xor_si256(load(q.add(64 * r + 32 * (h0 + hh))), _mm256_set1_epi8(-128));
                    let wa = _mm256_sign_epi8(w, w);
                    for c in 0..NC {
                        let p = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(x[c], w));
                        dots[hh][c] = _mm256_add_epi32(dots[hh][c], _mm256_madd_epi16(p, ones));
                    }
                }
            }
        } else {
            let qh = T::FIVE.then(|| blk.add(at_qh));
            dots8(q, qh, h0, &ab, &[ones; H], &mut dots);
        }
        for hh in 0..H {
            let h = h0 + hh;
            let d = f16x8(blk.add(16 * h));
            for c in 0..NC {
                let dd = _mm256_mul_ps(d, _mm256_set1_ps(*dp[c].add(b)));
                acc[hh][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[hh][c]), dd, acc[hh][c]);
            }
            if !T::WIDE {
                let m =
                    if T::HAS_MIN { f16x8(blk.add(32 + 16 * h)) } else { _mm256_mul_ps(d, _mm256_set1_ps(-T::OFFSET)) };
                for c in 0..NC {
                    acc[hh][c] = _mm256_fmadd_ps(m, _mm256_set1_ps(*sp[c].add(b)), acc[hh][c]);
                }
            }
        }
    }
    for hh in 0..H {
        for c in 0..NC {
            t.store(g, h0 + hh, c0 + c, acc[hh][c]);
        }
    }
}

unsafe fn k4_tile<const FIVE: bool>(t: &Tile, g: usize, h0: usize, nh: usize, c0: usize, nc: usize) {
    match FIVE {
        false => dispatch!(k4_c, [False], nh, nc, t, g, h0, c0),
        true => dispatch!(k4_c, [True], nh, nc, t, g, h0, c0),
    }
}

/// A type-level bool, so the dispatch macro can pass the variant as a type.
trait Bool {
    const V: bool;
}
struct False;
struct True;
impl Bool for False {
    const V: bool = false;
}
impl Bool for True {
    const V: bool = true;
}

/// Q4_K/Q5_K per super-block and activation row: each sub-block's dots are widened by one
/// `vpmaddwd` against the rows' (scale, scale) pairs and summed in int32; the mins need
/// Σ_j m_j·(Σa of sub-block j): `vpmaddwd` of (m_j, m_j) with the bsums pair (2j, 2j+1).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_c<F: Bool, const H: usize, const NC: usize>(t: &Tile, g: usize, h0: usize, c0: usize) {
    let five = F::V;
    let bytes = if five { 64 + 256 + 512 + 2048 } else { 64 + 256 + 2048 };
    let k = t.pm.cols;
    let nb = k / QK_K;
    let a = t.acts;
    let ap: [*const i8; NC] = std::array::from_fn(|c| a.qs.as_ptr().add((c0 + c) * k));
    let dp: [*const f32; NC] = std::array::from_fn(|c| a.d.as_ptr().add((c0 + c) * nb));
    let bp: [*const i16; NC] = std::array::from_fn(|c| a.bsums.as_ptr().add((c0 + c) * nb * 16));
    let base = t.pm.group_ptr(g);
    let mut acc = [[_mm256_setzero_ps(); NC]; H];
    for b in 0..nb {
        let blk = base.add(b * bytes);
        let qs = blk.add(if five { 320 + 512 } else { 320 });
        let mut isum = [[_mm256_setzero_si256(); NC]; H];
        for j in 0..8 {
            let sc: [__m256i; H] = std::array::from_fn(|hh| pair16::<false>(blk.add(64 + 16 * j + 8 * (h0 + hh))));
            let qh = five.then(|| blk.add(320 + 64 * j));
            let ab: [*const i8; NC] = std::array::from_fn(|c| ap[c].add(b * QK_K + 32 * j));
            dots8(qs.add(256 * j), qh, h0, &ab, &sc, &mut isum);
        }
        let mut imin = [[_mm256_setzero_si256(); NC]; H];
        for j in 0..8 {
            let bs: [__m256i; NC] = std::array::from_fn(|c| bsum_pair(bp[c].add(16 * b), j));
            for hh in 0..H {
                let mn = pair16::<false>(blk.add(192 + 16 * j + 8 * (h0 + hh)));
                for c in 0..NC {
                    imin[hh][c] = _mm256_add_epi32(imin[hh][c], _mm256_madd_epi16(mn, bs[c]));
                }
            }
        }
        for hh in 0..H {
            let h = h0 + hh;
            let (d, dmin) = (f16x8(blk.add(16 * h)), f16x8(blk.add(32 + 16 * h)));
            for c in 0..NC {
                let da = _mm256_set1_ps(*dp[c].add(b));
                acc[hh][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[hh][c]), _mm256_mul_ps(d, da), acc[hh][c]);
                acc[hh][c] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(imin[hh][c]), _mm256_mul_ps(dmin, da), acc[hh][c]);
            }
        }
    }
    for hh in 0..H {
        for c in 0..NC {
            t.store(g, h0 + hh, c0 + c, acc[hh][c]);
        }
    }
}
