//! Builds `ModelWeights` from a GGUF file; matrices stay in the memory map.

use crate::gguf::{GgufFile, TensorInfo};
use crate::kernels::DType;
use crate::model::config::ModelConfig;
use crate::model::weights::{Bytes, Matrix, ModelWeights, Outliers, TensorNames};
use anyhow::{bail, Context, Result};

const GGUF_NAMES: TensorNames = TensorNames {
    layer_prefix: |i| format!("blk.{i}."),
    attn_norm: "attn_norm.weight",
    q: "attn_q.weight",
    k: "attn_k.weight",
    v: "attn_v.weight",
    q_bias: "attn_q.bias",
    k_bias: "attn_k.bias",
    v_bias: "attn_v.bias",
    o: "attn_output.weight",
    ffn_norm: "ffn_norm.weight",
    gate: "ffn_gate.weight",
    up: "ffn_up.weight",
    down: "ffn_down.weight",
    embed: "token_embd.weight",
    out_norm: "output_norm.weight",
    lm_head: "output.weight",
};

pub fn load(f: &GgufFile) -> Result<ModelWeights> {
    let config = ModelConfig::from_gguf(f)?;
    let fp8 = f.get_str("tern.quantize.method") == Some("fp8");
    let tensor =
        |name: &str| -> Result<&TensorInfo> { f.tensor(name).with_context(|| format!("missing tensor {name:?}")) };
    let matrix = |name: &str| -> Result<Matrix> {
        let t = tensor(name)?;
        if t.dims.len() != 2 {
            bail!("tensor {name:?} should be 2-D, has dims {:?}", t.dims);
        }
        let bytes = Bytes::Mapped { map: f.map().clone(), offset: t.offset, len: t.n_bytes };
        // GGUF has no FP8 type: `tern quantize --method fp8` stores the E4M3 codes as I8.
        let dtype = if t.dtype == DType::I8 && fp8 { DType::F8E4M3 } else { t.dtype };
        let mut m = Matrix::new(dtype, t.dims[1] as usize, t.dims[0] as usize, bytes)
            .with_context(|| format!("tensor {name:?}"))?;
        let read = |t: &TensorInfo| -> Result<Vec<f32>> {
            if t.dtype != DType::F32 {
                bail!("tensor {:?} should be f32", t.name);
            }
            Ok(f.map()[t.offset..t.offset + t.n_bytes]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let stem = name.strip_suffix(".weight").unwrap_or(name);
        // Row scales of I8/F8E4M3 matrices (w8a8, fp8).
        match f.tensor(&format!("{stem}.scale")) {
            Some(s) => m = m.with_row_scale(read(s)?).with_context(|| format!("tensor {name:?}"))?,
            None if dtype.needs_row_scale() => bail!("{} tensor {name:?} has no {stem}.scale beside it", dtype.name()),
            None => {}
        }
        // LLM.int8() outlier columns written by `tern quantize --method llm-int8`.
        match (f.tensor(&format!("{stem}.outlier_cols")), f.tensor(&format!("{stem}.outlier_weight"))) {
            (None, None) => Ok(m),
            (Some(c), Some(w)) => {
                let cols = read(c)?.iter().map(|&v| v as usize).collect();
                m.with_outliers(Outliers { cols, w: read(w)? }).with_context(|| format!("tensor {name:?}"))
            }
            _ => bail!("tensor {name:?}: outlier columns and weights must come together"),
        }
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
    ModelWeights::assemble(config, &GGUF_NAMES, matrix, vector)
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
