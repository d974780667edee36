//! Builds `ModelWeights` from a Hugging Face directory: `config.json` + `*.safetensors`.
//! bf16/f16/f32 matrices stay in the memory map; the kernels read them as stored.

use crate::kernels::DType;
use crate::model::config::ModelConfig;
use crate::model::weights::{Bytes, Matrix, ModelWeights, TensorNames};
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

struct Entry {
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
    dtype: DType,
    shape: Vec<usize>,
}

const HF_NAMES: TensorNames = TensorNames {
    layer_prefix: |i| format!("model.layers.{i}."),
    attn_norm: "input_layernorm.weight",
    q: "self_attn.q_proj.weight",
    k: "self_attn.k_proj.weight",
    v: "self_attn.v_proj.weight",
    q_bias: "self_attn.q_proj.bias",
    k_bias: "self_attn.k_proj.bias",
    v_bias: "self_attn.v_proj.bias",
    o: "self_attn.o_proj.weight",
    ffn_norm: "post_attention_layernorm.weight",
    gate: "mlp.gate_proj.weight",
    up: "mlp.up_proj.weight",
    down: "mlp.down_proj.weight",
    embed: "model.embed_tokens.weight",
    out_norm: "model.norm.weight",
    lm_head: "lm_head.weight",
};

pub fn load(dir: &Path) -> Result<ModelWeights> {
    let config_path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
    let config = ModelConfig::from_hf_json(&text).with_context(|| format!("in {}", config_path.display()))?;

    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no *.safetensors files in {}", dir.display());
    }
    let mut entries = HashMap::new();
    for path in &files {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only map of a file we do not modify.
        let map = Arc::new(unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?);
        let st = SafeTensors::deserialize(&map)
            .map_err(|e| anyhow::anyhow!("{}: invalid safetensors: {e}", path.display()))?;
        let base = map.as_ptr() as usize;
        for (name, view) in st.tensors() {
            let dtype = match view.dtype() {
                StDtype::F32 => DType::F32,
                StDtype::F16 => DType::F16,
                StDtype::BF16 => DType::BF16,
                other => bail!(
                    "{}: tensor {name:?} has unsupported dtype {other:?} (supported: f32, f16, bf16)",
                    path.display()
                ),
            };
            let data = view.data();
            let offset = data.as_ptr() as usize - base;
            entries
                .insert(name, Entry { map: map.clone(), offset, len: data.len(), dtype, shape: view.shape().to_vec() });
        }
    }

    let take = |name: &str| -> Result<&Entry> { entries.get(name).with_context(|| format!("missing tensor {name:?}")) };
    let matrix = |name: &str| -> Result<Matrix> {
        let e = take(name)?;
        if e.shape.len() != 2 {
            bail!("tensor {name:?} should be 2-D, has shape {:?}", e.shape);
        }
        let bytes = Bytes::Mapped { map: e.map.clone(), offset: e.offset, len: e.len };
        Matrix::new(e.dtype, e.shape[0], e.shape[1], bytes).with_context(|| format!("tensor {name:?}"))
    };
    let vector = |name: &str| -> Result<Vec<f32>> {
        let e = take(name)?;
        if e.shape.len() != 1 {
            bail!("tensor {name:?} should be 1-D, has shape {:?}", e.shape);
        }
        let mut out = vec![0.0; e.shape[0]];
        crate::kernels::dequantize_row(e.dtype, &e.map[e.offset..e.offset + e.len], &mut out)?;
        Ok(out)
    };

    ModelWeights::assemble(config, &HF_NAMES, matrix, vector)
}
