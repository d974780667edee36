//! Weights repacked for the AVX-512 VNNI and AVX2 kernels: 16 rows interleaved.
//!
//! GGUF stores a matrix row by row, so a kernel that multiplies one weight block by one
//! activation block must unpack the block, dot 32 values and reduce them horizontally before
//! it can apply the block's scale: a handful of instructions per 32 products, paid again for
//! every activation row. Here the rows are regrouped in groups of 16, and within a group each
//! block stores its 16 rows' quants interleaved four bytes at a time: one `vpdpbusd` against
//! four activation bytes broadcast to every lane computes four products for each of the 16 rows
//! at once, the 16 sums land in the 16 lanes of one register, and the block's 16 scales are one
//! vector. Unpacked weights are reused by every activation row of a tile. This is the layout
//! idea of llama.cpp's repacked CPU buffers (`q4_0_8x8` and kin), on 512-bit registers; AVX2
//! takes each 64-byte vector as two halves of 8 rows (`kernels::avx2::packed`).
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
        let mut blk = Block16::default();
        for g in 0..groups {
            for b in 0..nb {
                let dst = &mut out[(g * nb + b) * format.block_bytes..][..format.block_bytes];
                blk.clear();
                for lane in 0..GROUP.min(rows - g * GROUP) {
                    blk.decode(dtype, &w[(g * GROUP + lane) * row_bytes + b * bb..][..bb], lane);
                }
                blk.emit(dtype, dst);
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

    /// y = acts · Wᵀ (n_rows(acts) × rows), groups of rows split over the pool's threads.
    pub fn matmul_parallel(&self, pool: &super::ThreadPool, acts: &super::QuantizedActs, y: &mut [f32]) -> Result<()> {
        if !packing_supported(self.dtype()) {
            bail!("packed {} weights need AVX2", self.dtype());
        }
        if !acts.matches(self.dtype()) || acts.k() != self.cols || acts.n_rows() * self.rows != y.len() {
            bail!("packed matmul: activations or output do not match a {}×{} matrix", self.rows, self.cols);
        }
        let (groups, yp) = (self.groups(), SendPtr(y.as_mut_ptr()));
        pool.run(|t, nt| {
            let yp = &yp;
            let g = groups * t / nt..groups * (t + 1) / nt;
            // SAFETY: checked above; each thread writes the rows of its own groups.
            unsafe { matmul_packed_groups(self, g, acts, yp.0, self.rows) };
        });
        Ok(())
    }

    /// The first byte of group `g`.
    pub(crate) fn group_ptr(&self, g: usize) -> *const u8 {
        let nb = self.cols / self.format.dtype.block_len();
        // SAFETY (of callers' reads): g < groups, and a group spans nb blocks inside `lines`.
        unsafe { (self.lines.as_ptr() as *const u8).add(g * nb * self.format.block_bytes) }
    }
}

/// One block of a group's 16 rows, decoded: unsigned quants and the raw scale fields, from
/// which each byte of the packed layout is computed once, in order.
struct Block16 {
    /// Quants of each row (32 or 256 used), value = d·u + m per the format.
    u: [[u8; QK_K]; GROUP],
    /// f16 bits: d (and m / dmin where the format stores it).
    d: [u16; GROUP],
    m: [u16; GROUP],
    /// K-quant sub-block scales and mins (Q6_K: 16 signed scales).
    sc: [[u8; 16]; GROUP],
    mn: [[u8; 8]; GROUP],
}

impl Default for Block16 {
    fn default() -> Self {
        Block16 { u: [[0; QK_K]; GROUP], d: [0; GROUP], m: [0; GROUP], sc: [[0; 16]; GROUP], mn: [[0; 8]; GROUP] }
    }
}

impl Block16 {
    /// Padding rows are all zero (scale 0: they contribute nothing).
    fn clear(&mut self) {
        *self = Block16 { u: self.u, ..Default::default() };
        self.u.iter_mut().for_each(|r| r.fill(0));
    }

    fn decode(&mut self, dtype: DType, src: &[u8], lane: usize) {
        match dtype {
            DType::Q4_K | DType::Q5_K => {
                let (q, sc, mn, _, _) = k_block(dtype, src);
                (self.d[lane], self.m[lane]) = (le_u16(src, 0), le_u16(src, 2));
                for j in 0..8 {
                    self.sc[lane][j] = sc[2 * j] as u8;
                    self.mn[lane][j] = mn[2 * j] as u8;
                }
                self.u[lane].iter_mut().zip(q).for_each(|(u, q)| *u = q as u8);
            }
            DType::Q6_K => {
                let (q, sc, _, _, _) = k_block(dtype, src);
                self.d[lane] = le_u16(src, 208);
                self.sc[lane].iter_mut().zip(sc).for_each(|(o, s)| *o = s as i8 as u8);
                self.u[lane].iter_mut().zip(q).for_each(|(u, q)| *u = (q + 32) as u8);
            }
            _ => {
                let (q, _, _) = q32_block(dtype, src);
                let offset = match dtype {
                    DType::Q4_0 => 8,
                    DType::Q5_0 => 16,
                    DType::Q8_0 => 128,
                    _ => 0,
                };
                self.d[lane] = le_u16(src, 0);
                if matches!(dtype, DType::Q4_1 | DType::Q5_1) {
                    self.m[lane] = le_u16(src, 2);
                }
                self.u[lane][..QK].iter_mut().zip(q).for_each(|(u, q)| *u = (q + offset) as u8);
            }
        }
    }

    /// Element `i` of every row, in byte order of a vector of runs: byte 4·lane + e holds
    /// element 4·(i / 4) + e of row lane; `f` maps (lane, element) to the byte.
    fn runs(out: &mut [u8], f: impl Fn(usize, usize) -> u8) {
        for (o, byte) in out[..64].iter_mut().enumerate() {
            *byte = f(o / 4, o % 4);
        }
    }

    /// The 64-bit mask of bit 4 of run r's elements (bit 4·lane + e).
    fn fifth_bits(&self, base: usize, r: usize) -> [u8; 8] {
        let mut m = 0u64;
        for lane in 0..GROUP {
            for e in 0..4 {
                m |= (((self.u[lane][base + 4 * r + e] >> 4) & 1) as u64) << (4 * lane + e);
            }
        }
        m.to_le_bytes()
    }

    /// The 4-bit layout of the 32 elements from `base` (and their fifth bits) into `q` / `qh`.
    fn emit_runs32(&self, base: usize, q: &mut [u8], qh: Option<&mut [u8]>) {
        for t in 0..4 {
            Self::runs(&mut q[64 * t..], |lane, e| {
                let u = &self.u[lane][base..];
                (u[4 * t + e] & 0xF) | (u[16 + 4 * t + e] << 4)
            });
        }
        if let Some(qh) = qh {
            for r in 0..8 {
                qh[8 * r..8 * r + 8].copy_from_slice(&self.fifth_bits(base, r));
            }
        }
    }

    fn emit(&self, dtype: DType, dst: &mut [u8]) {
        let put_f16 = |dst: &mut [u8], v: &[u16; GROUP]| {
            for (o, x) in dst.chunks_exact_mut(2).zip(v) {
                o.copy_from_slice(&x.to_le_bytes());
            }
        };
        match dtype {
            DType::Q4_K | DType::Q5_K => {
                put_f16(&mut dst[..32], &self.d);
                put_f16(&mut dst[32..64], &self.m);
                for j in 0..8 {
                    for lane in 0..GROUP {
                        dst[64 + 16 * j + lane] = self.sc[lane][j];
                        dst[192 + 16 * j + lane] = self.mn[lane][j];
                    }
                }
                let five = dtype == DType::Q5_K;
                let (qh, qs) = dst[320..].split_at_mut(if five { 512 } else { 0 });
                for j in 0..8 {
                    let qh = five.then(|| &mut qh[64 * j..64 * j + 64]);
                    self.emit_runs32(32 * j, &mut qs[256 * j..256 * j + 256], qh);
                }
            }
            DType::Q6_K => {
                put_f16(&mut dst[..32], &self.d);
                for j in 0..16 {
                    for lane in 0..GROUP {
                        dst[32 + 16 * j + lane] = self.sc[lane][j];
                    }
                }
                let (ql, qh) = dst[288..].split_at_mut(2048);
                for t in 0..32 {
                    Self::runs(&mut ql[64 * t..], |lane, e| {
                        let u = &self.u[lane];
                        (u[4 * t + e] & 0xF) | ((u[4 * (t + 32) + e] & 0xF) << 4)
                    });
                }
                for v in 0..16 {
                    Self::runs(&mut qh[64 * v..], |lane, e| {
                        (0..4).fold(0u8, |h, p| h | ((self.u[lane][4 * (v + 16 * p) + e] >> 4) << (2 * p)))
                    });
                }
            }
            _ => {
                put_f16(&mut dst[..32], &self.d);
                let has_min = matches!(dtype, DType::Q4_1 | DType::Q5_1);
                let five = matches!(dtype, DType::Q5_0 | DType::Q5_1);
                let mut at_q = 32;
                if has_min {
                    put_f16(&mut dst[32..64], &self.m);
                    at_q += 32;
                }
                let (qh, q) = dst[at_q..].split_at_mut(if five { 64 } else { 0 });
                if dtype == DType::Q8_0 {
                    for r in 0..8 {
                        Self::runs(&mut q[64 * r..], |lane, e| self.u[lane][4 * r + e]);
                    }
                } else {
                    self.emit_runs32(0, q, five.then_some(qh));
                }
            }
        }
    }
}

/// Whether matrices of `dtype` get packed on this CPU (a packed kernel for the type at the
/// level the kernels use).
pub fn packing_supported(dtype: DType) -> bool {
    packed_kernel_at(super::cpu::cpu_level(), dtype)
}

/// Whether `level` has a packed kernel for `dtype`. AVX2 has none for Q6_K: with one
/// activation row (decode) its packed kernel read weights from DRAM 1.5x slower than the
/// row-major one (`kernel_bench q6_k --shape dram`, 1 thread: 12.9 against 19 GB/s), where the
/// other types gain, and the GGUF mixes put their output head in Q6_K.
pub(crate) fn packed_kernel_at(level: super::cpu::CpuLevel, dtype: DType) -> bool {
    use super::cpu::CpuLevel;
    cfg!(target_arch = "x86_64")
        && Format::of(dtype).is_some()
        && match level {
            CpuLevel::Avx512 => true,
            CpuLevel::Avx2 => dtype != DType::Q6_K,
            CpuLevel::Scalar => false,
        }
}

/// Activation bytes per chunk: kept well inside L2 so that they are reused from there while
/// every weight group of the thread's range passes over them.
const ACT_CHUNK_BYTES: usize = 32 * 1024;

/// Calls `tile(g, c0, nc)` for every group of `groups` and every tile of at most `c_max` of
/// the `n_acts` activation rows (of `cols` bytes each): activation rows outer, in chunks that
/// stay in L2, then groups, then the chunk's tiles.
pub(crate) fn walk_tiles(
    groups: std::ops::Range<usize>,
    n_acts: usize,
    cols: usize,
    c_max: usize,
    mut tile: impl FnMut(usize, usize, usize),
) {
    let chunk = (ACT_CHUNK_BYTES / cols.max(1)).max(c_max) / c_max * c_max;
    let mut a0 = 0;
    while a0 < n_acts {
        let a1 = (a0 + chunk).min(n_acts);
        for g in groups.clone() {
            let mut c0 = a0;
            while c0 < a1 {
                let nc = c_max.min(a1 - c0);
                tile(g, c0, nc);
                c0 += nc;
            }
        }
        a0 = a1;
    }
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
    assert!(packing_supported(pm.dtype()), "packed {} weights need AVX2", pm.dtype());
    matmul_packed_groups_at(super::cpu::cpu_level(), pm, groups, acts, y, ldy);
}

/// [`matmul_packed_groups`] with the kernels of `level` (AVX2 or AVX-512; tests run both).
///
/// # Safety
/// As `matmul_packed_groups`, and this CPU supports `level`.
pub(crate) unsafe fn matmul_packed_groups_at(
    level: super::cpu::CpuLevel,
    pm: &PackedMatrix,
    groups: std::ops::Range<usize>,
    acts: &super::QuantizedActs,
    y: *mut f32,
    ldy: usize,
) {
    assert!(
        acts.matches(pm.dtype()) && acts.k() == pm.cols && groups.end <= pm.groups(),
        "matmul_packed_groups: weights/activations do not match"
    );
    assert!(
        packed_kernel_at(level, pm.dtype()) && level <= super::cpu::cpu_features().detected,
        "no packed {} kernel at {level:?}",
        pm.dtype()
    );
    #[cfg(target_arch = "x86_64")]
    if level >= super::cpu::CpuLevel::Avx512 {
        super::avx512::matmul_groups(pm, groups, acts, y, ldy);
    } else {
        super::avx2::packed::matmul_groups(pm, groups, acts, y, ldy);
    }
}

struct SendPtr(*mut f32);
// SAFETY: threads write disjoint elements (the rows of disjoint groups).
unsafe impl Sync for SendPtr {}
