//! Builds `ModelWeights` from a GGUF file; matrices stay in the memory map.

use crate::gguf::{GgufFile, TensorInfo};
use crate::model::config::ModelConfig;
use crate::model::weights::{Bytes, LayerWeights, Matrix, ModelWeights};
use anyhow::{bail, Context, Result};

pub fn load(f: &GgufFile) -> Result<ModelWeights> {
    let config = ModelConfig::from_gguf(f)?;
    let tensor =
        |name: &str| -> Result<&TensorInfo> { f.tensor(name).with_context(|| format!("missing tensor {name:?}")) };
    let matrix = |name: &str| -> Result<Matrix> {
        let t = tensor(name)?;
        if t.dims.len() != 2 {
            bail!("tensor {name:?} should be 2-D, has dims {:?}", t.dims);
        }
        let bytes = Bytes::Mapped { map: f.map().clone(), offset: t.offset, len: t.n_bytes };
        Matrix::new(t.dtype, t.dims[1] as usize, t.dims[0] as usize, bytes).with_context(|| format!("tensor {name:?}"))
    };
    let vector = |name: &str| -> Result<Vec<f32>> {
        let t = tensor(name)?;
        if t.dims.len() != 1 {
            bail!("tensor {name:?} should be 1-D, has dims {:?}", t.dims);
        }
        let mut out = vec![0.0; t.dims[0] as usize];
        crate::kernels::dequantize_row(t.dtype, &f.map()[t.offset..t.offset + t.n_bytes], &mut out)
            .with_context(|| format!("tensor {name:?}"))?;
        Ok(out)
    };
    let mut layers = Vec::with_capacity(config.n_layers);
    for i in 0..config.n_layers {
        let p = |s: &str| format!("blk.{i}.{s}");
        let qkv_bias = if config.qkv_bias {
            Some([vector(&p("attn_q.bias"))?, vector(&p("attn_k.bias"))?, vector(&p("attn_v.bias"))?])
        } else {
            None
        };
        layers.push(LayerWeights {
            attn_norm: vector(&p("attn_norm.weight"))?,
            wq: matrix(&p("attn_q.weight"))?,
            wk: matrix(&p("attn_k.weight"))?,
            wv: matrix(&p("attn_v.weight"))?,
            qkv_bias,
            wo: matrix(&p("attn_output.weight"))?,
            ffn_norm: vector(&p("ffn_norm.weight"))?,
            w_gate: matrix(&p("ffn_gate.weight"))?,
            w_up: matrix(&p("ffn_up.weight"))?,
            w_down: matrix(&p("ffn_down.weight"))?,
        });
    }
    let weights = ModelWeights {
        embed: matrix("token_embd.weight")?,
        out_norm: vector("output_norm.weight")?,
        lm_head: if config.tied_embeddings { None } else { Some(matrix("output.weight")?) },
        layers,
        config,
    };
    weights.validate()?;
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::tests::{parse, str_meta, write_gguf};
    use crate::gguf::MetaValue;

    /// Metadata and tensors of a 1-layer llama with hidden 32, written as f32 GGUF.
    fn tiny_llama(arch: &str, skip: &str) -> Vec<u8> {
        let meta = vec![
            ("general.architecture", str_meta(arch)),
            ("llama.block_count", MetaValue::U32(1)),
            ("llama.embedding_length", MetaValue::U32(32)),
            ("llama.feed_forward_length", MetaValue::U32(64)),
            ("llama.attention.head_count", MetaValue::U32(2)),
            ("llama.context_length", MetaValue::U32(64)),
        ];
        let m = |rows: u64, cols: u64| (vec![cols, rows], vec![0.01; (rows * cols) as usize]);
        let v = |n: u64| (vec![n], vec![1.0; n as usize]);
        let all = [
            ("token_embd.weight", m(16, 32)),
            ("output_norm.weight", v(32)),
            ("blk.0.attn_norm.weight", v(32)),
            ("blk.0.attn_q.weight", m(32, 32)),
            ("blk.0.attn_k.weight", m(32, 32)),
            ("blk.0.attn_v.weight", m(32, 32)),
            ("blk.0.attn_output.weight", m(32, 32)),
            ("blk.0.ffn_norm.weight", v(32)),
            ("blk.0.ffn_gate.weight", m(64, 32)),
            ("blk.0.ffn_up.weight", m(64, 32)),
            ("blk.0.ffn_down.weight", m(32, 64)),
        ];
        let tensors: Vec<_> =
            all.into_iter().filter(|(n, _)| *n != skip).map(|(n, (dims, data))| (n, dims, data)).collect();
        write_gguf(&meta, &tensors)
    }

    #[test]
    fn loads_a_complete_model() {
        let w = load(&parse(tiny_llama("llama", "")).unwrap()).unwrap();
        assert_eq!((w.config.n_layers, w.config.vocab_size, w.config.tied_embeddings), (1, 16, true));
    }

    #[test]
    fn unknown_architecture_is_named() {
        let err = load(&parse(tiny_llama("gptx", "")).unwrap()).err().unwrap();
        assert!(format!("{err:#}").contains("unknown architecture \"gptx\""), "{err:#}");
    }

    #[test]
    fn missing_tensor_is_named() {
        let err = load(&parse(tiny_llama("llama", "blk.0.ffn_up.weight")).unwrap()).err().unwrap();
        assert!(format!("{err:#}").contains("missing tensor \"blk.0.ffn_up.weight\""), "{err:#}");
    }
}
