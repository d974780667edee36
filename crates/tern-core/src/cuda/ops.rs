//! Typed launches of the kernels in kernels.cu: each function checks what it can and enqueues
//! one kernel (or one cuBLAS call) on the GPU's stream. Pointers are device addresses.

use super::device::{DevBuf, Gpu, MAX_DYNAMIC_SMEM};
use crate::kernels::DType;
use crate::launch;
use anyhow::{bail, ensure, Result};
use cudarc::driver::sys::CUfunction;

/// Largest number of activation rows the matrix-vector kernels take.
pub const GEMV_MAX_ROWS: usize = 8;
const ATT_THREADS: u32 = 128;
const ATT_WARPS: usize = 4;
pub const MAX_GROUP: usize = 16;
/// Head sizes the decode attention kernel is built for, and its limits on query heads per block.
const ATT_HEAD_DIMS: [usize; 5] = [16, 32, 64, 128, 256];
const ATT_GROUPS: [usize; 3] = [1, 8, 16];
/// Fewest keys per split of the decode attention: one 32-key tile per warp.
pub const ATT_MIN_SPLIT: usize = 32 * ATT_WARPS;

/// The kernels' function handles, looked up once.
pub struct Kernels {
    embed_bf16: CUfunction,
    rms_norm: CUfunction,
    silu_mul: CUfunction,
    quantize_q8: CUfunction,
    /// [warps per row group: 1 or 4][activation rows - 1]
    gemv_bf16: [[CUfunction; GEMV_MAX_ROWS]; 2],
    gemv_q8_0: [[CUfunction; GEMV_MAX_ROWS]; 2],
    gemv_q4_k: [[CUfunction; GEMV_MAX_ROWS]; 2],
    sm_count: usize,
    dequant_q8_0_bf16: CUfunction,
    dequant_q4_k_bf16: CUfunction,
    rope_kv_write: CUfunction,
    /// [head dim index in ATT_HEAD_DIMS][group limit index in ATT_GROUPS]
    attn_decode: [[CUfunction; 3]; 5],
    /// Tensor-core decode attention of whole groups, head dims 64 and 128.
    attn_decode_mma: [CUfunction; 2],
    attn_combine: CUfunction,
    attn_prefill_64: CUfunction,
    attn_prefill_128: CUfunction,
    argmax_rows: CUfunction,
    fill_random_bf16: CUfunction,
    fill_random_bytes: CUfunction,
    set_block_f16: CUfunction,
    fill_f16: CUfunction,
}

impl Kernels {
    pub fn load(gpu: &Gpu) -> Result<Kernels> {
        let f = |name: &str| gpu.function(name);
        let per_n = |base: &str| -> Result<[[CUfunction; GEMV_MAX_ROWS]; 2]> {
            let ws = |w: usize| -> Result<[CUfunction; GEMV_MAX_ROWS]> {
                let v: Vec<CUfunction> =
                    (1..=GEMV_MAX_ROWS).map(|n| f(&format!("{base}_{n}_{w}"))).collect::<Result<_>>()?;
                Ok(v.try_into().expect("GEMV_MAX_ROWS entries"))
            };
            Ok([ws(1)?, ws(4)?])
        };
        let k = Kernels {
            embed_bf16: f("embed_bf16")?,
            rms_norm: f("rms_norm")?,
            silu_mul: f("silu_mul")?,
            quantize_q8: f("quantize_q8")?,
            gemv_bf16: per_n("gemv_bf16")?,
            gemv_q8_0: per_n("gemv_q8_0")?,
            gemv_q4_k: per_n("gemv_q4_k")?,
            dequant_q8_0_bf16: f("dequant_q8_0_bf16")?,
            dequant_q4_k_bf16: f("dequant_q4_k_bf16")?,
            rope_kv_write: f("rope_kv_write")?,
            attn_decode: {
                let mut t = [[std::ptr::null_mut(); 3]; 5];
                for (a, hd) in ATT_HEAD_DIMS.iter().enumerate() {
                    for (b, gm) in ATT_GROUPS.iter().enumerate() {
                        t[a][b] = f(&format!("attn_decode_{hd}_{gm}"))?;
                    }
                }
                t
            },
            attn_decode_mma: [f("attn_decode_mma_64")?, f("attn_decode_mma_128")?],
            attn_combine: f("attn_combine")?,
            attn_prefill_64: f("attn_prefill_64")?,
            attn_prefill_128: f("attn_prefill_128")?,
            argmax_rows: f("argmax_rows")?,
            fill_random_bf16: f("fill_random_bf16")?,
            fill_random_bytes: f("fill_random_bytes")?,
            set_block_f16: f("set_block_f16")?,
            fill_f16: f("fill_f16")?,
            sm_count: gpu.sm_count,
        };
        for f in k.attn_decode.iter().flatten() {
            // SAFETY: the attention kernels are functions of this GPU's module.
            unsafe { gpu.allow_large_smem(*f)? };
        }
        Ok(k)
    }
}

/// A grid-stride kernel's grid for n elements.
fn grid_for(n: usize) -> (u32, u32, u32) {
    (n.div_ceil(256).clamp(1, 65535) as u32, 1, 1)
}

/// A weight matrix on the GPU, in one of the encodings the kernels read.
pub enum GpuWeights {
    Bf16(DevBuf),
    /// int8 quants [rows][cols] and f16 scales [rows][cols / 32].
    Q8_0 {
        qs: DevBuf,
        d: DevBuf,
    },
    /// GGUF Q4_K blocks, row-major.
    Q4K(DevBuf),
}

pub struct GpuMatrix {
    pub rows: usize,
    pub cols: usize,
    pub w: GpuWeights,
}

impl GpuMatrix {
    pub fn encoding(&self) -> &'static str {
        match self.w {
            GpuWeights::Bf16(_) => "bf16",
            GpuWeights::Q8_0 { .. } => "q8_0",
            GpuWeights::Q4K(_) => "q4_k",
        }
    }

    /// Bytes the kernels read for one pass over the matrix.
    pub fn n_bytes(&self) -> usize {
        match &self.w {
            GpuWeights::Bf16(b) | GpuWeights::Q4K(b) => b.bytes,
            GpuWeights::Q8_0 { qs, d } => qs.bytes + d.bytes,
        }
    }

    pub fn is_bf16(&self) -> bool {
        matches!(self.w, GpuWeights::Bf16(_))
    }
}

impl GpuMatrix {
    /// Random weights made on the device: bf16 of standard deviation 0.02, or quantized blocks
    /// of random codes with fixed small scales (as the CPU's dummy weights).
    pub fn random(gpu: &Gpu, k: &Kernels, rows: usize, cols: usize, dtype: DType, seed: u64) -> Result<GpuMatrix> {
        let n = rows * cols;
        let w = match dtype {
            DType::BF16 => {
                let b = DevBuf::alloc(2 * n)?;
                fill_random_bf16(gpu, k, b.ptr, n, seed, 0.02)?;
                GpuWeights::Bf16(b)
            }
            DType::Q8_0 => {
                ensure!(cols.is_multiple_of(32), "q8_0 needs a multiple of 32 columns, not {cols}");
                let (qs, d) = (DevBuf::alloc(n)?, DevBuf::alloc(2 * (n / 32))?);
                fill_random_bytes(gpu, k, qs.ptr, n, seed)?;
                fill_f16(gpu, k, d.ptr, n / 32, 3e-4)?;
                GpuWeights::Q8_0 { qs, d }
            }
            DType::Q4_K => {
                ensure!(cols.is_multiple_of(256), "q4_k needs a multiple of 256 columns, not {cols}");
                let n_blocks = n / 256;
                let b = DevBuf::alloc(144 * n_blocks)?;
                fill_random_bytes(gpu, k, b.ptr, b.bytes, seed)?;
                set_block_f16(gpu, k, b.ptr, n_blocks, 144, 0, 1.4e-4)?;
                set_block_f16(gpu, k, b.ptr, n_blocks, 144, 2, 1.4e-4)?;
                GpuWeights::Q4K(b)
            }
            other => bail!("no random {} matrices on the GPU", other.name()),
        };
        Ok(GpuMatrix { rows, cols, w })
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct GemvArgs {
    x: u64,
    ldx: i32,
    xq: u64,
    xds: u64,
    y: u64,
    ldy: i32,
    rows: i32,
    k: i32,
    accumulate: i32,
}

/// Rows per row group and warps per block of the matrix-vector kernels (kernels.cu).
/// Activation rows as a row kernel writes them and a matrix product reads them.
#[derive(Clone, Copy, Debug)]
pub enum Act {
    /// f32 rows (the matrix-vector input of bf16 weights); row stride in elements.
    F32 { x: u64, ld: usize },
    /// bf16 rows (the cuBLAS GEMM input), dense.
    Bf16(u64),
    /// int8 in groups of 32 with (scale, scale · sum) per group, dense: the matrix-vector input
    /// of quantized weights.
    Q8 { q: u64, ds: u64 },
}

impl Act {
    fn kind(&self) -> i32 {
        match self {
            Act::F32 { .. } => 0,
            Act::Bf16(_) => 1,
            Act::Q8 { .. } => 2,
        }
    }

    /// (output pointer, group scales pointer) of a row kernel writing this.
    fn out_ptrs(&self, width: usize) -> Result<(u64, u64)> {
        match *self {
            Act::F32 { x, ld } => {
                ensure!(ld == width, "row kernels write dense rows (stride {ld}, width {width})");
                Ok((x, 0))
            }
            Act::Bf16(x) => Ok((x, 0)),
            Act::Q8 { q, ds } => {
                ensure!(width.is_multiple_of(32), "q8 activations need a multiple of 32 values, not {width}");
                Ok((q, ds))
            }
        }
    }
}

const GEMV_ROWS: usize = 2;
const GEMV_WARPS: usize = 4;
/// Pieces a row needs before four warps share it: two per lane (measured on an H100 with
/// Qwen2.5-7B shapes: 32 cost Q4_K 1.3% and 128 cost Q8_0 1.4% of decode speed against 256).
const GEMV_SPLIT_PIECES: usize = 2 * GEMV_WARPS * 32;
/// y[i, r] (+)= dot(W[r, :], x[i, :]) for n ≤ 8 activation rows x (f32 for bf16 weights, q8 for
/// quantized ones) into y (row stride ldy).
#[allow(clippy::too_many_arguments)]
pub fn gemv(
    gpu: &Gpu,
    k: &Kernels,
    m: &GpuMatrix,
    x: Act,
    n: usize,
    y: u64,
    ldy: usize,
    accumulate: bool,
) -> Result<()> {
    ensure!((1..=GEMV_MAX_ROWS).contains(&n), "gemv takes 1..={GEMV_MAX_ROWS} rows, got {n}");
    ensure!(m.cols.is_multiple_of(32) || (m.is_bf16() && m.cols.is_multiple_of(8)), "gemv: {} columns", m.cols);
    let (xf, ldx, xq, xds) = match (x, m.is_bf16()) {
        (Act::F32 { x, ld }, true) => (x, ld, 0, 0),
        (Act::Q8 { q, ds }, false) => (0, m.cols, q, ds),
        (x, _) => bail!("gemv of {} weights cannot read {x:?} activations", m.encoding()),
    };
    let args = GemvArgs {
        x: xf,
        ldx: ldx as i32,
        xq,
        xds,
        y,
        ldy: ldy as i32,
        rows: m.rows as i32,
        k: m.cols as i32,
        accumulate: accumulate as i32,
    };
    // Too few row groups to give every SM many warps: four warps share each row, where a row
    // has enough pieces (a lane's load of 8 bf16, 16 q8 or 64 q4_k values) to give each of the
    // 128 lanes two; fewer leave lanes idle and cost more than the missing warps.
    let piece = match &m.w {
        GpuWeights::Bf16(_) => 8,
        GpuWeights::Q8_0 { .. } => 16,
        GpuWeights::Q4K(_) => 64,
    };
    let groups = m.rows.div_ceil(GEMV_ROWS);
    let split = groups < 32 * k.sm_count && m.cols / piece >= GEMV_SPLIT_PIECES;
    let ws = if split { 4 } else { 1 };
    let blocks = groups.div_ceil(GEMV_WARPS / ws);
    let grid = (blocks as u32, 1, 1);
    let i = split as usize;
    unsafe {
        match &m.w {
            GpuWeights::Bf16(w) => launch!(gpu, k.gemv_bf16[i][n - 1], grid, 128, 0; w.ptr, args),
            GpuWeights::Q8_0 { qs, d } => launch!(gpu, k.gemv_q8_0[i][n - 1], grid, 128, 0; qs.ptr, d.ptr, args),
            GpuWeights::Q4K(w) => {
                ensure!(m.cols.is_multiple_of(256), "q4_k gemv: {} columns", m.cols);
                launch!(gpu, k.gemv_q4_k[i][n - 1], grid, 128, 0; w.ptr, args)
            }
        }
    }
}

/// The input a matrix-vector product of `m` reads: f32 rows `f32` (stride = width) for bf16
/// weights, else q8 rows in `q8`.
pub fn gemv_input(m: &GpuMatrix, f32: u64, q8: (u64, u64)) -> Act {
    if m.is_bf16() {
        Act::F32 { x: f32, ld: m.cols }
    } else {
        Act::Q8 { q: q8.0, ds: q8.1 }
    }
}

/// q8 activations of n f32 rows of `cols` values (row stride ldx) into `out` (dense).
pub fn quantize_q8(gpu: &Gpu, k: &Kernels, x: u64, ldx: usize, n: usize, cols: usize, out: Act) -> Result<()> {
    let Act::Q8 { q, ds } = out else { bail!("quantize_q8 writes q8 activations") };
    ensure!(cols.is_multiple_of(32), "q8 activations need a multiple of 32 values, not {cols}");
    unsafe { launch!(gpu, k.quantize_q8, grid_for(n * cols), 256, 0; x, ldx as i32, q, ds, n as i32, cols as i32) }
}

/// The matrix as bf16: itself, or dequantized into `scratch` (at least rows × cols bf16).
pub fn as_bf16(gpu: &Gpu, k: &Kernels, m: &GpuMatrix, scratch: &DevBuf) -> Result<u64> {
    let n = m.rows * m.cols;
    if !matches!(m.w, GpuWeights::Bf16(_)) {
        ensure!(scratch.bytes >= 2 * n, "dequantization scratch too small");
    }
    unsafe {
        match &m.w {
            GpuWeights::Bf16(w) => Ok(w.ptr),
            GpuWeights::Q8_0 { qs, d } => {
                launch!(gpu, k.dequant_q8_0_bf16, grid_for(n), 256, 0; qs.ptr, d.ptr, scratch.ptr, n)?;
                Ok(scratch.ptr)
            }
            GpuWeights::Q4K(w) => {
                launch!(gpu, k.dequant_q4_k_bf16, grid_for(n), 256, 0; w.ptr, scratch.ptr, n)?;
                Ok(scratch.ptr)
            }
        }
    }
}

/// Where a GEMM writes C (n × rows, dense).
#[derive(Clone, Copy, Debug)]
pub enum GemmOut {
    /// f32, C = beta·C + A·Wᵀ (beta 1 adds into the residual stream).
    F32 { c: u64, beta: f32 },
    /// bf16, C = A·Wᵀ: half the bytes for an output that only feeds a row kernel.
    Bf16(u64),
}

/// C = A (n × cols, bf16) · Wᵀ (+ beta·C), through cuBLAS.
pub fn gemm(gpu: &Gpu, k: &Kernels, m: &GpuMatrix, a: u64, n: usize, out: GemmOut, scratch: &DevBuf) -> Result<()> {
    let w = as_bf16(gpu, k, m, scratch)?;
    unsafe { gpu.gemm_bf16(w, a, out, m.rows, n, m.cols) }
}

pub fn embed(gpu: &Gpu, k: &Kernels, table: u64, tokens: u64, x: u64, n: usize, d: usize) -> Result<()> {
    unsafe { launch!(gpu, k.embed_bf16, (n as u32, 1, 1), 256, 0; table, tokens, x, n as i32, d as i32) }
}

/// out[i] = rms_norm(x[rows[i] or i]) · w, for n rows of width d.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm(
    gpu: &Gpu,
    k: &Kernels,
    x: u64,
    w: u64,
    rows: Option<u64>,
    out: Act,
    n: usize,
    d: usize,
    eps: f32,
) -> Result<()> {
    let rows = rows.unwrap_or(0);
    let (o, ds) = out.out_ptrs(d)?;
    // Enough threads that a row of up to 8 K values sits in registers (8 per thread).
    let threads = d.div_ceil(8).next_multiple_of(32).clamp(128, 1024) as u32;
    unsafe { launch!(gpu, k.rms_norm, (n as u32, 1, 1), threads, 0; x, w, rows, o, ds, out.kind(), d as i32, eps) }
}

/// act[i, j] = silu(gate_up[i, j]) · gate_up[i, f + j]; gate_up is dense f32 or bf16 rows of 2f.
pub fn silu_mul(gpu: &Gpu, k: &Kernels, gate_up: Act, act: Act, n: usize, f: usize) -> Result<()> {
    let (gu, gu_bf16) = match gate_up {
        Act::F32 { x, ld } if ld == 2 * f => (x, 0i32),
        Act::Bf16(x) => (x, 1),
        other => bail!("silu_mul reads dense f32 or bf16 rows of [gate | up], not {other:?}"),
    };
    let (o, ds) = act.out_ptrs(f)?;
    // Eight values per thread where input and output are bf16 (16-byte loads and stores).
    let per: i32 = if gu_bf16 == 1 && matches!(act, Act::Bf16(_)) && f.is_multiple_of(8) { 8 } else { 1 };
    let grid = (f.div_ceil(256 * per as usize) as u32, n as u32, 1);
    unsafe { launch!(gpu, k.silu_mul, grid, 256, 0; gu, gu_bf16, o, ds, act.kind(), f as i32, per) }
}

/// Where the attention and KV-write kernels find the paged cache and the batch's metadata.
#[derive(Clone, Copy, Debug)]
pub struct KvLayout {
    pub n_heads: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// bf16 elements from one block to the next (all layers of a block are together).
    pub block_stride: usize,
}

/// Rotary cos and sin tables [position][frequency] for positions 0..n_pos, computed as the CPU
/// decoder computes them (f32 angle = position · inverse frequency), on the device.
pub fn rope_tables(gpu: &Gpu, inv_freq: &[f32], n_pos: usize) -> Result<(DevBuf, DevBuf)> {
    let mut cos = Vec::with_capacity(n_pos * inv_freq.len());
    let mut sin = Vec::with_capacity(n_pos * inv_freq.len());
    for p in 0..n_pos {
        for &f in inv_freq {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    Ok((gpu.buffer_from(&cos)?, gpu.buffer_from(&sin)?))
}

/// Adds the q/k/v bias, rotates q and k, and writes K/V of each token to its cache slot.
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_write(
    gpu: &Gpu,
    k: &Kernels,
    qkv: u64,
    bias: Option<u64>,
    cos_sin: (u64, u64),
    pos: u64,
    slot: u64,
    kv_layer: u64,
    l: &KvLayout,
    style: i32,
    n: usize,
) -> Result<()> {
    const ROPE_HEADS: usize = 4;
    unsafe {
        let grid = (n as u32, (l.n_heads + 2 * l.n_kv).div_ceil(ROPE_HEADS) as u32, 1);
        let block = ((l.head_dim / 2).next_multiple_of(32) as u32, ROPE_HEADS as u32, 1);
        launch!(gpu, k.rope_kv_write, grid, block, 0;
            qkv, bias.unwrap_or(0), cos_sin.0, cos_sin.1, pos, slot, kv_layer,
            l.n_heads as i32, l.n_kv as i32, l.head_dim as i32, style, l.block_size as i32, l.block_stride)
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct AttnArgs {
    q: u64,
    q_ld: i32,
    kv_layer: u64,
    block_stride: usize,
    tables: u64,
    max_blocks: i32,
    tok_seq: u64,
    tok_pos: u64,
    tok_list: u64,
    n_heads: i32,
    n_kv: i32,
    hd: i32,
    block_size: i32,
    heads: i32,
    window: i32,
    scale: f32,
    split: i32,
    out: u64,
    part_o: u64,
    part_ml: u64,
    n_splits: i32,
    out_kind: i32,
    out_ds: u64,
}

/// How the decode attention divides its work: `heads` query heads per block (1, or all that
/// share a KV head), `n_splits` blocks per (token, head group), each taking at least `split`
/// keys (more when a sequence is longer than `split · n_splits`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttnSplit {
    pub split: usize,
    pub n_splits: usize,
    pub heads: usize,
}

/// Dynamic shared memory of the decode attention kernel: queries, a tile's probabilities,
/// and each warp's output, max and sum.
fn attn_smem(l: &KvLayout, heads: usize) -> usize {
    4 * (heads * l.head_dim + ATT_WARPS * heads * (32 + l.head_dim + 2))
}

/// Index of the tensor-core decode attention kernel for this head size, if there is one and
/// it is not turned off (`TERN_CUDA_ATTN_MMA=0` keeps every group on the CUDA cores, for
/// comparisons).
fn mma_head_dim(head_dim: usize) -> Option<usize> {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("TERN_CUDA_ATTN_MMA").map_or(true, |v| v != "0"));
    [64, 128].iter().position(|&d| d == head_dim).filter(|_| on)
}

/// Plans the decode attention of `n` query tokens whose longest context is `max_len` keys:
/// one head per block while there are few (token, KV head) pairs, else a KV head's whole group
/// (on the tensor cores where the head size has that kernel);
/// then as many splits as keep the blocks near `target_blocks`, each at least `ATT_MIN_SPLIT`
/// keys, with at most `max_pairs` (token, split) pairs of partial results.
pub fn attn_split(l: &KvLayout, n: usize, max_len: usize, target_blocks: usize, max_pairs: usize) -> AttnSplit {
    let n = n.max(1);
    let heads = if n * l.n_kv * 2 <= target_blocks { 1 } else { l.n_heads / l.n_kv };
    // The tensor-core kernel's blocks are one warp, not four: four times as many fit.
    let target_blocks = if heads > 1 && mma_head_dim(l.head_dim).is_some() { 4 * target_blocks } else { target_blocks };
    let by_blocks = (target_blocks / (n * l.n_heads / heads)).max(1);
    let by_len = max_len.max(1).div_ceil(ATT_MIN_SPLIT);
    let n_splits = by_blocks.min(by_len).min((max_pairs / n).max(1));
    AttnSplit { split: ATT_MIN_SPLIT, n_splits, heads }
}

/// Whether the decode attention with split `s` can write q8 output (the o projection's input)
/// itself: its f32 results pass through a kernel that holds whole 32-value groups in a warp
/// (the four-warp kernel or the split merge), not only the tensor-core kernel's fragments.
pub fn attention_writes_q8(l: &KvLayout, s: &AttnSplit) -> bool {
    let mma_alone = s.heads > 1 && s.n_splits == 1 && mma_head_dim(l.head_dim).is_some();
    l.head_dim.is_multiple_of(32) && !mma_alone
}

/// Attention of every token's query heads over its sequence's cached keys `0..=pos` (the
/// sliding window when `window > 0`), through the block tables; `out` is (tokens) × (n_heads·hd),
/// dense f32, bf16 or (where `attention_writes_q8`) q8.
/// It runs for `n` tokens: those listed in `tok_list`, or tokens 0..n.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    gpu: &Gpu,
    k: &Kernels,
    l: &KvLayout,
    q: u64,
    q_ld: usize,
    kv_layer: u64,
    tables: u64,
    max_blocks: usize,
    tok_seq: u64,
    tok_pos: u64,
    tok_list: Option<u64>,
    window: usize,
    n: usize,
    s: AttnSplit,
    out: Act,
    partials: (u64, u64),
) -> Result<()> {
    let g = l.n_heads / l.n_kv;
    ensure!(
        !matches!(out, Act::Q8 { .. }) || attention_writes_q8(l, &s),
        "attention with split {s:?} and head dim {} cannot write q8",
        l.head_dim
    );
    let (out_ptr, out_ds) = out.out_ptrs(l.n_heads * l.head_dim)?;
    ensure!(g <= MAX_GROUP && l.n_heads.is_multiple_of(l.n_kv), "attention: {} query heads per KV head", g);
    let Some(hi) = ATT_HEAD_DIMS.iter().position(|&d| d == l.head_dim) else {
        bail!("attention on the GPU: head dim {} (supported: {ATT_HEAD_DIMS:?})", l.head_dim)
    };
    ensure!(s.heads == 1 || s.heads == g, "attention: {} heads per block with {g} per KV head", s.heads);
    let gi = ATT_GROUPS.iter().position(|&m| s.heads <= m).expect("heads <= MAX_GROUP");
    ensure!(s.split > 0 && s.n_splits > 0, "attention: empty split {s:?}");
    ensure!(
        attn_smem(l, s.heads) <= MAX_DYNAMIC_SMEM,
        "attention: {} heads of {} per block need too much shared memory",
        s.heads,
        l.head_dim
    );
    let args = AttnArgs {
        q,
        q_ld: q_ld as i32,
        kv_layer,
        block_stride: l.block_stride,
        tables,
        max_blocks: max_blocks as i32,
        tok_seq,
        tok_pos,
        tok_list: tok_list.unwrap_or(0),
        n_heads: l.n_heads as i32,
        n_kv: l.n_kv as i32,
        hd: l.head_dim as i32,
        block_size: l.block_size as i32,
        heads: s.heads as i32,
        window: window as i32,
        scale: 1.0 / (l.head_dim as f32).sqrt(),
        split: s.split as i32,
        out: out_ptr,
        part_o: partials.0,
        part_ml: partials.1,
        n_splits: s.n_splits as i32,
        out_kind: out.kind(),
        out_ds,
    };
    unsafe {
        let grid = (n as u32, (l.n_heads / s.heads) as u32, s.n_splits as u32);
        match mma_head_dim(l.head_dim) {
            // Whole groups take the tensor cores where the head size has the kernel.
            Some(m) if s.heads > 1 => launch!(gpu, k.attn_decode_mma[m], grid, 32, 0; args)?,
            _ => launch!(gpu, k.attn_decode[hi][gi], grid, ATT_THREADS, attn_smem(l, s.heads); args)?,
        }
        if s.n_splits > 1 {
            launch!(gpu, k.attn_combine, (n as u32, l.n_heads as u32, 1), l.head_dim as u32, 0; args)?;
        }
    }
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy)]
struct FlashArgs {
    q: u64,
    q_ld: i32,
    kv_layer: u64,
    block_stride: usize,
    tables: u64,
    max_blocks: i32,
    tiles: u64,
    n_heads: i32,
    n_kv: i32,
    block_size: i32,
    window: i32,
    scale: f32,
    out: u64,
    out_kind: i32,
}

/// Query tokens per tile of the prefill attention kernel.
pub const PREFILL_TILE: usize = 64;

/// Whether the tensor-core prefill attention exists for this head size.
pub fn has_prefill_attention(head_dim: usize) -> bool {
    matches!(head_dim, 64 | 128)
}

/// Prefill attention over `n_tiles` tiles (device array of [first token, tokens ≤ 64,
/// sequence, position of the first] each): every tile's tokens attend causally (and within
/// the sliding window) to their sequence's cached keys; `out` as for `attention`, f32 or bf16.
#[allow(clippy::too_many_arguments)]
pub fn attention_prefill(
    gpu: &Gpu,
    k: &Kernels,
    l: &KvLayout,
    q: u64,
    q_ld: usize,
    kv_layer: u64,
    tables: u64,
    max_blocks: usize,
    tiles: u64,
    n_tiles: usize,
    window: usize,
    out: Act,
) -> Result<()> {
    ensure!(!matches!(out, Act::Q8 { .. }), "the prefill attention writes f32 or bf16, not q8");
    let (out_ptr, _) = out.out_ptrs(l.n_heads * l.head_dim)?;
    let f = match l.head_dim {
        64 => k.attn_prefill_64,
        128 => k.attn_prefill_128,
        hd => bail!("no prefill attention kernel for head dim {hd}"),
    };
    let args = FlashArgs {
        q,
        q_ld: q_ld as i32,
        kv_layer,
        block_stride: l.block_stride,
        tables,
        max_blocks: max_blocks as i32,
        tiles,
        n_heads: l.n_heads as i32,
        n_kv: l.n_kv as i32,
        block_size: l.block_size as i32,
        window: window as i32,
        scale: 1.0 / (l.head_dim as f32).sqrt(),
        out: out_ptr,
        out_kind: out.kind(),
    };
    unsafe { launch!(gpu, f, (n_tiles as u32, l.n_heads as u32, 1), 128, 0; args) }
}

pub fn argmax_rows(gpu: &Gpu, k: &Kernels, logits: u64, n: usize, vocab: usize, out: u64) -> Result<()> {
    unsafe { launch!(gpu, k.argmax_rows, (n as u32, 1, 1), 1024, 0; logits, vocab as i32, out) }
}

pub fn fill_random_bf16(gpu: &Gpu, k: &Kernels, p: u64, n: usize, seed: u64, std: f32) -> Result<()> {
    unsafe { launch!(gpu, k.fill_random_bf16, grid_for(n), 256, 0; p, n, seed, std) }
}

pub fn fill_random_bytes(gpu: &Gpu, k: &Kernels, p: u64, n: usize, seed: u64) -> Result<()> {
    unsafe { launch!(gpu, k.fill_random_bytes, grid_for(n), 256, 0; p, n, seed) }
}

pub fn set_block_f16(
    gpu: &Gpu,
    k: &Kernels,
    p: u64,
    n_blocks: usize,
    block_bytes: usize,
    at: usize,
    v: f32,
) -> Result<()> {
    unsafe { launch!(gpu, k.set_block_f16, grid_for(n_blocks), 256, 0; p, n_blocks, block_bytes as i32, at as i32, v) }
}

pub fn fill_f16(gpu: &Gpu, k: &Kernels, p: u64, n: usize, v: f32) -> Result<()> {
    unsafe { launch!(gpu, k.fill_f16, grid_for(n), 256, 0; p, n, v) }
}
