//! Random weights of a real configuration, for benchmarks where the real files cannot go
//! (speed does not depend on weight values). Quantized blocks get random codes and small,
//! finite scales so activations stay in a realistic range.

use crate::kernels::DType;
use crate::model::config::ModelConfig;
use crate::model::weights::{Bytes, LayerWeights, Matrix, ModelWeights};
use crate::rng::Rng;
use anyhow::{bail, Result};
use half::{bf16, f16};
use std::sync::Arc;

/// Byte offsets of f16 scale fields within one block, and the value to put there.
fn scale_fields(dtype: DType) -> Result<&'static [(usize, f32)]> {
    Ok(match dtype {
        DType::Q4_0 | DType::Q5_0 => &[(0, 0.005)],
        DType::Q4_1 | DType::Q5_1 => &[(0, 0.005), (2, -0.04)],
        DType::Q8_0 => &[(0, 3e-4)],
        DType::Q4_K | DType::Q5_K => &[(0, 1.4e-4), (2, 1.4e-4)],
        DType::Q6_K => &[(208, 1.7e-5)],
        DType::F32 | DType::F16 | DType::BF16 => &[],
        other => bail!(
            "dummy weights in {} are not supported (use f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q4_k or q6_k)",
            other.name()
        ),
    })
}

fn random_matrix(rng: &mut Rng, dtype: DType, rows: usize, cols: usize) -> Result<Matrix> {
    let n_bytes = dtype.row_bytes(cols)? * rows;
    let mut bytes = vec![0u8; n_bytes];
    const STD: f32 = 0.02;
    match dtype {
        DType::F32 => bytes.chunks_exact_mut(4).for_each(|c| c.copy_from_slice(&(rng.normal() * STD).to_le_bytes())),
        DType::F16 => {
            bytes.chunks_exact_mut(2).for_each(|c| c.copy_from_slice(&f16::from_f32(rng.normal() * STD).to_le_bytes()))
        }
        DType::BF16 => {
            bytes.chunks_exact_mut(2).for_each(|c| c.copy_from_slice(&bf16::from_f32(rng.normal() * STD).to_le_bytes()))
        }
        _ => {
            rng.fill_bytes(&mut bytes);
            let fields = scale_fields(dtype)?;
            for block in bytes.chunks_exact_mut(dtype.block_bytes()) {
                for &(at, value) in fields {
                    block[at..at + 2].copy_from_slice(&f16::from_f32(value).to_le_bytes());
                }
            }
        }
    }
    Matrix::new(dtype, rows, cols, Bytes::Owned(Arc::new(bytes)))
}

pub fn load(config: ModelConfig, dtype: DType, seed: u64) -> Result<ModelWeights> {
    scale_fields(dtype)?;
    let mut rng = Rng::new(seed);
    let c = &config;
    let q = c.n_heads * c.head_dim;
    let kv = c.n_kv_heads * c.head_dim;
    let mut layers = Vec::with_capacity(c.n_layers);
    for _ in 0..c.n_layers {
        layers.push(LayerWeights {
            attn_norm: vec![1.0; c.hidden],
            wq: random_matrix(&mut rng, dtype, q, c.hidden)?,
            wk: random_matrix(&mut rng, dtype, kv, c.hidden)?,
            wv: random_matrix(&mut rng, dtype, kv, c.hidden)?,
            qkv_bias: c.qkv_bias.then(|| [vec![0.0; q], vec![0.0; kv], vec![0.0; kv]]),
            wo: random_matrix(&mut rng, dtype, c.hidden, q)?,
            ffn_norm: vec![1.0; c.hidden],
            w_gate: random_matrix(&mut rng, dtype, c.ffn_hidden, c.hidden)?,
            w_up: random_matrix(&mut rng, dtype, c.ffn_hidden, c.hidden)?,
            w_down: random_matrix(&mut rng, dtype, c.hidden, c.ffn_hidden)?,
        });
    }
    let embed = random_matrix(&mut rng, dtype, c.vocab_size, c.hidden)?;
    let lm_head = if c.tied_embeddings { None } else { Some(random_matrix(&mut rng, dtype, c.vocab_size, c.hidden)?) };
    let weights = ModelWeights { out_norm: vec![1.0; c.hidden], embed, lm_head, layers, config };
    weights.validate()?;
    Ok(weights)
}
