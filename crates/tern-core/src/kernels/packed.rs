//! Weights repacked for the AVX-512 VNNI kernels: 16 rows interleaved.
//!
//! GGUF stores a matrix row by row, so a kernel that multiplies one weight block by one
//! activation block must unpack the block, dot 32 values and reduce them horizontally before
//! it can apply the block's scale: a handful of instructions per 32 products, paid again for
//! every activation row. Here the rows are regrouped in groups of 16, and within a group each
//! block stores its 16 rows' quants interleaved four bytes at a time: one `vpdpbusd` against
//! four activation bytes broadcast to every lane computes four products for each of the 16 rows
//! at once, the 16 sums land in the 16 lanes of one register, and the block's 16 scales are one
//! vector. Unpacked weights are reused by every activation row of a tile. This is the layout
//! idea of llama.cpp's repacked CPU buffers (`q4_0_8x8` and kin), on 512-bit registers.
//!
//! Every format is decoded to unsigned quants u with value = d·u + m (the signed formats get an
//! offset: u = q + 8 for Q4_0, + 16 for Q5_0, + 128 for Q8_0, and m = -offset·d is computed in
//! the kernel instead of stored), so one kernel shape serves them all. Layouts, per group of 16
//! rows and per block (all vectors 32-byte aligned; byte `4·lane + e` of a 64-byte vector is
//! element e of a 4-element run of row `lane`):
//!
//! - 32-element types: `d` 16 × f16; `m` 16 × f16 (Q4_1/Q5_1); for 5-bit types 8 × u64 whose
//!   bit `4·lane + e` of word g is bit 4 of element `4g + e`; then the quants: 4-bit types in 4
//!   vectors, vector t holding elements `4t..4t+4` in its low nibbles and `16+4t..` in its high
//!   nibbles; Q8_0 in 8 vectors of bytes, vector g holding elements `4g..4g+4`.
//! - Q4_K/Q5_K (super-blocks of 256, 8 sub-blocks of 32): `d`, `dmin` 16 × f16 each; the 6-bit
//!   scales and mins as bytes, `[sub-block][lane]`; for Q5_K the high bits per sub-block as
//!   above (8 × 8 u64); then each sub-block's quants as the 4-bit 32-element layout.
//! - Q6_K (16 sub-blocks of 16): `d` 16 × f16; the signed scales as bytes `[sub-block][lane]`;
//!   32 vectors of nibbles, vector t holding run t (elements `4t..4t+4`) low and run `t + 32`
//!   high; 16 vectors of 2-bit high parts, crumb p of vector v holding run `v + 16p`.

use super::blocks::le_u16;
use super::dot_scalar::{k_block, q32_block};
use super::dtype::{DType, QK, QK_K};
use anyhow::{bail, Result};

/// Rows per group: the 16 f32 lanes of a 512-bit register.
pub const GROUP: usize = 16;

/// How one packed format is laid out (bytes per block and group, and where each part is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Format {
    pub dtype: DType,
    /// Bytes of one block (32 or 256 elements) of one group of 16 rows.
    pub block_bytes: usize,
}

impl Format {
    /// The packed format for `dtype`, if the kernels have one.
    pub fn of(dtype: DType) -> Option<Format> {
        let block_bytes = match dtype {
            DType::Q4_0 => 32 + 256,
            DType::Q4_1 => 64 + 256,
            DType::Q5_0 => 32 + 64 + 256,
            DType::Q5_1 => 64 + 64 + 256,
            DType::Q8_0 => 32 + 512,
            DType::Q4_K => 64 + 256 + 2048,
            DType::Q5_K => 64 + 256 + 512 + 2048,
            DType::Q6_K => 32 + 256 + 2048 + 1024,
            _ => return None,
        };
        Some(Format { dtype, block_bytes })
    }
}

/// A cache-line aligned chunk, so that every vector of a packed matrix is 32-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A matrix in the interleaved layout: `groups` groups of 16 rows (the last padded with zero
/// rows), each group's blocks contiguous.
pub struct PackedMatrix {
    pub(crate) format: Format,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    lines: Vec<Line>,
}

impl PackedMatrix {
    /// Repacks `rows` × `cols` of `dtype` stored row-major in `w`.
    pub fn pack(dtype: DType, w: &[u8], rows: usize, cols: usize) -> Result<PackedMatrix> {
        let Some(format) = Format::of(dtype) else { bail!("no packed layout for {dtype} weights") };
        let row_bytes = dtype.row_bytes(cols)?;
        if rows.checked_mul(row_bytes) != Some(w.len()) {
            bail!("{rows}×{cols} {dtype} matrix needs {} bytes, got {}", rows * row_bytes, w.len());
        }
        let nb = cols / dtype.block_len();
        let groups = rows.div_ceil(GROUP);
        let bytes = groups * nb * format.block_bytes;
        let mut lines = vec![Line([0; 64]); bytes.div_ceil(64)];
        // SAFETY: Line is 64 plain bytes; the view covers exactly the vector's storage.
        let out = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, lines.len() * 64) };
        let bb = dtype.block_bytes();
        for g in 0..groups {
            for b in 0..nb {
                let dst = &mut out[(g * nb + b) * format.block_bytes..][..format.block_bytes];
                for lane in 0..GROUP.min(rows - g * GROUP) {
                    let src = &w[(g * GROUP + lane) * row_bytes + b * bb..][..bb];
                    match dtype {
                        DType::Q4_K | DType::Q5_K => pack_k4(dtype, src, lane, dst),
                        DType::Q6_K => pack_q6k(src, lane, dst),
                        _ => pack_q32(dtype, src, lane, dst),
                    }
                }
            }
        }
        Ok(PackedMatrix { format, rows, cols, lines })
    }

    pub fn dtype(&self) -> DType {
        self.format.dtype
    }

    pub fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }

    /// Bytes of the packed data.
    pub fn n_bytes(&self) -> usize {
        self.lines.len() * 64
    }

    /// The first byte of group `g`.
    pub(crate) fn group_ptr(&self, g: usize) -> *const u8 {
        let nb = self.cols / self.format.dtype.block_len();
        // SAFETY (of callers' reads): g < groups, and a group spans nb blocks inside `lines`.
        unsafe { (self.lines.as_ptr() as *const u8).add(g * nb * self.format.block_bytes) }
    }
}

/// Byte offset of element e (0..4) of run `run` of row `lane` in a vector of runs.
fn at(lane: usize, e: usize) -> usize {
    4 * lane + e
}

/// Writes the quants `u` of one row's block (32 elements) at `q` (4-bit: 4 vectors of nibbles;
/// 8-bit: 8 vectors of bytes) and its fifth bits at `qh` if given.
fn put_runs32(u: &[u32], lane: usize, q: &mut [u8], wide: bool, qh: Option<&mut [u8]>) {
    for (i, &v) in u.iter().enumerate() {
        let (run, e) = (i / 4, i % 4);
        if wide {
            q[64 * run + at(lane, e)] = v as u8;
        } else {
            let (vec, shift) = if run < 4 { (run, 0) } else { (run - 4, 4) };
            q[64 * vec + at(lane, e)] |= ((v & 0xF) as u8) << shift;
        }
    }
    if let Some(qh) = qh {
        for (i, &v) in u.iter().enumerate() {
            let bit = at(lane, i % 4);
            qh[8 * (i / 4) + bit / 8] |= (((v >> 4) & 1) as u8) << (bit % 8);
        }
    }
}

fn put_f16(dst: &mut [u8], lane: usize, bits: u16) {
    dst[2 * lane..2 * lane + 2].copy_from_slice(&bits.to_le_bytes());
}

fn pack_q32(dtype: DType, src: &[u8], lane: usize, dst: &mut [u8]) {
    let (q, _, _) = q32_block(dtype, src);
    let (offset, has_min, five, wide) = match dtype {
        DType::Q4_0 => (8, false, false, false),
        DType::Q4_1 => (0, true, false, false),
        DType::Q5_0 => (16, false, true, false),
        DType::Q5_1 => (0, true, true, false),
        DType::Q8_0 => (128, false, false, true),
        _ => unreachable!("not a 32-element type"),
    };
    let u: Vec<u32> = q.iter().map(|&v| (v + offset) as u32).collect();
    put_f16(dst, lane, le_u16(src, 0));
    let mut at_q = 32;
    if has_min {
        put_f16(&mut dst[32..], lane, le_u16(src, 2));
        at_q += 32;
    }
    let (qh, q) = dst[at_q..].split_at_mut(if five { 64 } else { 0 });
    put_runs32(&u, lane, q, wide, five.then_some(qh));
    debug_assert_eq!(QK, 32);
}

fn pack_k4(dtype: DType, src: &[u8], lane: usize, dst: &mut [u8]) {
    let (q, sc, mn, _, _) = k_block(dtype, src);
    put_f16(dst, lane, le_u16(src, 0));
    put_f16(&mut dst[32..], lane, le_u16(src, 2));
    for j in 0..8 {
        dst[64 + 16 * j + lane] = sc[2 * j] as u8;
        dst[192 + 16 * j + lane] = mn[2 * j] as u8;
    }
    let five = dtype == DType::Q5_K;
    let (qh, qs) = dst[320..].split_at_mut(if five { 512 } else { 0 });
    for j in 0..8 {
        let u: Vec<u32> = q[32 * j..32 * j + 32].iter().map(|&v| v as u32).collect();
        let qh = five.then(|| &mut qh[64 * j..64 * j + 64]);
        put_runs32(&u, lane, &mut qs[256 * j..256 * j + 256], false, qh);
    }
    debug_assert_eq!(QK_K, 256);
}

fn pack_q6k(src: &[u8], lane: usize, dst: &mut [u8]) {
    let (q, sc, _, _, _) = k_block(DType::Q6_K, src);
    put_f16(dst, lane, le_u16(src, 208));
    for (j, &s) in sc.iter().enumerate() {
        dst[32 + 16 * j + lane] = s as i8 as u8;
    }
    let (ql, qh) = dst[288..].split_at_mut(2048);
    for (i, &v) in q.iter().enumerate() {
        let u = (v + 32) as u8;
        let (run, e) = (i / 4, i % 4);
        let (vec, shift) = if run < 32 { (run, 0) } else { (run - 32, 4) };
        ql[64 * vec + at(lane, e)] |= (u & 0xF) << shift;
        qh[64 * (run % 16) + at(lane, e)] |= (u >> 4) << (2 * (run / 16));
    }
}

/// Whether matrices of `dtype` get packed on this CPU (AVX-512 F/BW/VL/VNNI in use, and a
/// packed kernel for the type).
pub fn packing_supported(dtype: DType) -> bool {
    cfg!(target_arch = "x86_64")
        && super::cpu::cpu_level() >= super::cpu::CpuLevel::Avx512
        && Format::of(dtype).is_some()
}

/// y[i * ldy + r] = dot(W[r, :], act[i, :]) for the rows of groups `groups` (rows
/// `16·groups.start..`) and every activation row.
///
/// # Safety
/// `y` must be valid for writes at those indices (rows past `pm.rows` are not written), and
/// callers on different threads pass disjoint `groups`. The CPU must support packing
/// (`packing_supported`); that and the activations' format are checked (panics).
pub unsafe fn matmul_packed_groups(
    pm: &PackedMatrix,
    groups: std::ops::Range<usize>,
    acts: &super::QuantizedActs,
    y: *mut f32,
    ldy: usize,
) {
    assert!(packing_supported(pm.dtype()), "packed {} weights need AVX-512 VNNI", pm.dtype());
    assert!(
        acts.matches(pm.dtype()) && acts.k() == pm.cols && groups.end <= pm.groups(),
        "matmul_packed_groups: weights/activations do not match"
    );
    #[cfg(target_arch = "x86_64")]
    super::avx512::matmul_groups(pm, groups, acts, y, ldy);
}
