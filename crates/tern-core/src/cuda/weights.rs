//! A model's weights on the GPU: uploaded from host weights, or generated on the device (dummy
//! weights of real shapes, so a 15 GB model needs no host memory or transfer).
//!
//! Matrices that read the same input are stacked at upload (q/k/v into one, gate/up into one),
//! so each becomes one kernel. Q8_0 and Q4_K stay quantized (Q8_0 split into an int8 plane and
//! a scale plane, so its quants load 16 bytes at a time); other encodings become bf16.

use super::device::{DevBuf, Gpu};
use super::ops::{GpuMatrix, GpuWeights, Kernels};
use crate::kernels::DType;
use crate::model::config::ModelConfig;
use crate::model::weights::{Matrix, ModelWeights};
use anyhow::{bail, ensure, Result};
use half::bf16;

pub struct GpuLayer {
    pub attn_norm: DevBuf,
    /// [wq; wk; wv]
    pub qkv: GpuMatrix,
    /// [bq; bk; bv] (Qwen2)
    pub qkv_bias: Option<DevBuf>,
    pub wo: GpuMatrix,
    pub ffn_norm: DevBuf,
    /// [w_gate; w_up]
    pub gate_up: GpuMatrix,
    pub down: GpuMatrix,
}

pub struct GpuModel {
    pub config: ModelConfig,
    /// bf16 table (vocab × hidden).
    pub embed: GpuMatrix,
    pub layers: Vec<GpuLayer>,
    pub out_norm: DevBuf,
    /// None: tied to the embedding.
    pub lm_head: Option<GpuMatrix>,
}

impl GpuModel {
    pub fn lm_head(&self) -> &GpuMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Weight bytes read per decode step (every layer matrix and the LM head).
    pub fn bytes_per_token(&self) -> usize {
        let layers: usize =
            self.layers.iter().map(|l| l.qkv.n_bytes() + l.wo.n_bytes() + l.gate_up.n_bytes() + l.down.n_bytes()).sum();
        layers + self.lm_head().n_bytes()
    }

    /// The largest matrix in bf16 elements (the dequantization scratch of the GEMM path).
    pub fn largest_matrix(&self) -> usize {
        let layers = self.layers.iter().flat_map(|l| [&l.qkv, &l.wo, &l.gate_up, &l.down]);
        layers.chain([self.lm_head()]).filter(|m| !m.is_bf16()).map(|m| m.rows * m.cols).max().unwrap_or(0)
    }

    /// The bf16 embedding table.
    pub fn embed_table(&self) -> u64 {
        match &self.embed.w {
            GpuWeights::Bf16(b) => b.ptr,
            _ => unreachable!("the embedding is always uploaded as bf16"),
        }
    }

    pub fn upload(gpu: &Gpu, w: &ModelWeights) -> Result<GpuModel> {
        let c = &w.config;
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in &w.layers {
            let qkv_bias = match &l.qkv_bias {
                Some([bq, bk, bv]) => Some(gpu.buffer_from(&[bq.as_slice(), bk.as_slice(), bv.as_slice()].concat())?),
                None => None,
            };
            layers.push(GpuLayer {
                attn_norm: gpu.buffer_from(&l.attn_norm)?,
                qkv: upload_stacked(gpu, &[&l.wq, &l.wk, &l.wv])?,
                qkv_bias,
                wo: upload_stacked(gpu, &[&l.wo])?,
                ffn_norm: gpu.buffer_from(&l.ffn_norm)?,
                gate_up: upload_stacked(gpu, &[&l.w_gate, &l.w_up])?,
                down: upload_stacked(gpu, &[&l.w_down])?,
            });
        }
        let embed = GpuMatrix {
            rows: w.embed.rows,
            cols: w.embed.cols,
            w: GpuWeights::Bf16(gpu.buffer_from(&to_bf16(&w.embed)?)?),
        };
        // A tied head shares the bf16 table unless its own encoding is one the kernels read
        // quantized (fewer bytes per token).
        let lm_head = match (&w.lm_head, w.embed.dtype) {
            (Some(m), _) => Some(upload_stacked(gpu, &[m])?),
            (None, DType::Q8_0 | DType::Q4_K) => Some(upload_stacked(gpu, &[&w.embed])?),
            (None, _) => None,
        };
        Ok(GpuModel { config: c.clone(), embed, layers, out_norm: gpu.buffer_from(&w.out_norm)?, lm_head })
    }

    /// Random weights of `config`'s shapes made on the device (bf16, q8_0 or q4_k), with norms
    /// of one and zero biases, like the CPU's dummy weights.
    pub fn dummy(gpu: &Gpu, k: &Kernels, config: &ModelConfig, dtype: DType, seed: u64) -> Result<GpuModel> {
        let c = config;
        if !matches!(dtype, DType::BF16 | DType::Q8_0 | DType::Q4_K) {
            bail!("dummy weights on the GPU are made in bf16, q8_0 or q4_k, not {}", dtype.name());
        }
        let mut next_seed = seed.wrapping_mul(1_000_003);
        let mut random = |rows: usize, cols: usize, dtype: DType| -> Result<GpuMatrix> {
            next_seed = next_seed.wrapping_add(1);
            GpuMatrix::random(gpu, k, rows, cols, dtype, next_seed)
        };
        let (qd, kvd) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let ones = vec![1.0f32; c.hidden];
        let mut layers = Vec::with_capacity(c.n_layers);
        for _ in 0..c.n_layers {
            layers.push(GpuLayer {
                attn_norm: gpu.buffer_from(&ones)?,
                qkv: random(qd + 2 * kvd, c.hidden, dtype)?,
                qkv_bias: if c.qkv_bias { Some(gpu.buffer_from(&vec![0.0f32; qd + 2 * kvd])?) } else { None },
                wo: random(c.hidden, qd, dtype)?,
                ffn_norm: gpu.buffer_from(&ones)?,
                gate_up: random(2 * c.ffn_hidden, c.hidden, dtype)?,
                down: random(c.hidden, c.ffn_hidden, dtype)?,
            });
        }
        let embed = random(c.vocab_size, c.hidden, DType::BF16)?;
        let lm_head =
            if c.tied_embeddings && dtype == DType::BF16 { None } else { Some(random(c.vocab_size, c.hidden, dtype)?) };
        gpu.synchronize()?;
        Ok(GpuModel { config: c.clone(), embed, layers, out_norm: gpu.buffer_from(&ones)?, lm_head })
    }
}

/// Rows of every matrix (all with the same columns), one after another.
pub(crate) fn upload_stacked(gpu: &Gpu, ms: &[&Matrix]) -> Result<GpuMatrix> {
    let cols = ms[0].cols;
    ensure!(ms.iter().all(|m| m.cols == cols), "stacked matrices differ in columns");
    ensure!(ms.iter().all(|m| m.outliers.is_none()), "LLM.int8() outlier columns run on the CPU only");
    let rows: usize = ms.iter().map(|m| m.rows).sum();
    let same = |d: DType| ms.iter().all(|m| m.dtype == d);
    let w = if same(DType::Q8_0) {
        // 34-byte blocks: f16 scale then 32 int8 quants.
        let mut qs = Vec::with_capacity(rows * cols);
        let mut d = Vec::with_capacity(rows * cols / 32);
        for m in ms {
            for b in m.data().chunks_exact(34) {
                d.push(u16::from_le_bytes([b[0], b[1]]));
                qs.extend_from_slice(&b[2..]);
            }
        }
        GpuWeights::Q8_0 { qs: gpu.buffer_from(&qs)?, d: gpu.buffer_from(&d)? }
    } else if same(DType::Q4_K) && cols.is_multiple_of(256) {
        let bytes: Vec<u8> = ms.iter().flat_map(|m| m.data().iter().copied()).collect();
        GpuWeights::Q4K(gpu.buffer_from(&bytes)?)
    } else {
        ensure!(cols.is_multiple_of(8), "the GPU kernels need a multiple of 8 columns, not {cols}");
        let mut all = Vec::with_capacity(rows * cols);
        for m in ms {
            all.extend(to_bf16(m)?);
        }
        GpuWeights::Bf16(gpu.buffer_from(&all)?)
    };
    Ok(GpuMatrix { rows, cols, w })
}

/// The matrix as bf16 values (bit patterns), row-major.
fn to_bf16(m: &Matrix) -> Result<Vec<u16>> {
    if m.dtype == DType::BF16 {
        return Ok(m.data().chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect());
    }
    let mut row = vec![0f32; m.cols];
    let mut out = Vec::with_capacity(m.rows * m.cols);
    for r in 0..m.rows {
        // Row scales (w8a8, fp8) included.
        m.row_f32(r, &mut row)?;
        out.extend(row.iter().map(|&v| bf16::from_f32(v).to_bits()));
    }
    Ok(out)
}
