//! Model hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.
//!
//! The supported architectures share one decoder; what differs between them is data here
//! (biases, rotary layout, sliding window), never a copy of the forward pass.

use crate::gguf::GgufFile;
use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Mistral,
}

impl Arch {
    pub fn parse(name: &str) -> Result<Arch> {
        Ok(match name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "mistral" => Arch::Mistral,
            other => bail!("unknown architecture {other:?} (supported: llama, qwen2, mistral)"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Mistral => "mistral",
        }
    }
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimension i pairs with i + head_dim/2 (Hugging Face `rotate_half`).
    Halves,
    /// Dimension 2i pairs with 2i+1: GGUF's llama converter permutes the Q/K rows into this.
    Adjacent,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_hidden: usize,
    pub vocab_size: usize,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rms_eps: f32,
    /// The context length the model was trained for.
    pub max_context: usize,
    /// Each token attends to at most this many positions (itself included).
    pub sliding_window: Option<usize>,
    pub qkv_bias: bool,
    pub tied_embeddings: bool,
}

impl ModelConfig {
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("layers", self.n_layers),
            ("hidden size", self.hidden),
            ("attention heads", self.n_heads),
            ("KV heads", self.n_kv_heads),
            ("head dim", self.head_dim),
            ("FFN size", self.ffn_hidden),
            ("vocab size", self.vocab_size),
            ("context length", self.max_context),
        ];
        for (what, v) in positive {
            if v == 0 {
                bail!("model config: {what} must be positive");
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            bail!("model config: {} heads are not a multiple of {} KV heads", self.n_heads, self.n_kv_heads);
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("model config: head dim {} must be even for rotary embeddings", self.head_dim);
        }
        if self.sliding_window == Some(0) {
            bail!("model config: sliding window must be positive");
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 || self.rms_eps.is_nan() || self.rms_eps < 0.0 {
            bail!("model config: bad rope theta {} or RMS epsilon {}", self.rope_theta, self.rms_eps);
        }
        Ok(())
    }

    /// Reads `{arch}.*` keys of a GGUF file. `vocab_size` comes from the embedding tensor.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let arch_name = f.get_str("general.architecture").context("missing general.architecture")?;
        let arch = Arch::parse(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let n_heads = f.require_u64(&key("attention.head_count"))? as usize;
        let hidden = f.require_u64(&key("embedding_length"))? as usize;
        let embd = f.tensor("token_embd.weight").context("missing tensor token_embd.weight")?;
        let head_dim = match f.get_u64(&key("attention.key_length")) {
            Some(d) => d as usize,
            None if n_heads > 0 => hidden / n_heads,
            None => 0,
        };
        let cfg = ModelConfig {
            arch,
            n_layers: f.require_u64(&key("block_count"))? as usize,
            hidden,
            n_heads,
            n_kv_heads: f.get_u64(&key("attention.head_count_kv")).map_or(n_heads, |v| v as usize),
            head_dim,
            ffn_hidden: f.require_u64(&key("feed_forward_length"))? as usize,
            vocab_size: *embd.dims.get(1).context("token_embd.weight must be 2-D")? as usize,
            rope_theta: f.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0) as f32,
            rope_style: match arch {
                Arch::Llama | Arch::Mistral => RopeStyle::Adjacent,
                Arch::Qwen2 => RopeStyle::Halves,
            },
            rms_eps: f.get_f64(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5) as f32,
            max_context: f.get_u64(&key("context_length")).unwrap_or(2048) as usize,
            sliding_window: f.get_u64(&key("attention.sliding_window")).map(|w| w as usize),
            qkv_bias: f.tensor("blk.0.attn_q.bias").is_some(),
            tied_embeddings: f.tensor("output.weight").is_none(),
        };
        if let Some(t) = f.get_str(&key("rope.scaling.type")) {
            if t != "none" {
                bail!("rope scaling {t:?} is not supported");
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let c: HfConfig = serde_json::from_str(text).context("config.json is not a valid model config")?;
        let arch = match (&c.model_type, c.architectures.first()) {
            (Some(t), _) => Arch::parse(t)?,
            (None, Some(a)) => Arch::parse(&a.trim_end_matches("ForCausalLM").to_lowercase())?,
            (None, None) => bail!("config.json has neither model_type nor architectures"),
        };
        if let Some(scaling) = c.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            bail!("rope_scaling {scaling} is not supported");
        }
        // transformers >= 5 writes rope settings as `rope_parameters`.
        let rope_theta = match &c.rope_parameters {
            Some(p) => {
                let kind = p["rope_type"].as_str().unwrap_or("default");
                if kind != "default" {
                    bail!("rope_type {kind:?} is not supported");
                }
                p["rope_theta"].as_f64()
            }
            None => None,
        };
        let rope_theta = rope_theta.or(c.rope_theta).unwrap_or(10_000.0);
        let n_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        let sliding_window = match arch {
            Arch::Mistral => c.sliding_window,
            Arch::Qwen2 if c.use_sliding_window == Some(true) => c.sliding_window,
            _ => None,
        };
        let cfg = ModelConfig {
            arch,
            n_layers: c.num_hidden_layers,
            hidden: c.hidden_size,
            n_heads: c.num_attention_heads,
            n_kv_heads,
            head_dim: c.head_dim.or(c.hidden_size.checked_div(c.num_attention_heads)).unwrap_or(0),
            ffn_hidden: c.intermediate_size,
            vocab_size: c.vocab_size,
            rope_theta: rope_theta as f32,
            rope_style: RopeStyle::Halves,
            rms_eps: c.rms_norm_eps.unwrap_or(1e-6) as f32,
            max_context: c.max_position_embeddings.unwrap_or(2048),
            sliding_window,
            qkv_bias: arch == Arch::Qwen2 || c.attention_bias == Some(true),
            tied_embeddings: c.tie_word_embeddings.unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parameters in the weights (for reporting and bandwidth estimates).
    pub fn n_params(&self) -> usize {
        let q = self.n_heads * self.head_dim;
        let kv = self.n_kv_heads * self.head_dim;
        let attn = self.hidden * (q + 2 * kv) + q * self.hidden;
        let ffn = 3 * self.hidden * self.ffn_hidden;
        let embed = self.vocab_size * self.hidden * if self.tied_embeddings { 1 } else { 2 };
        self.n_layers * (attn + ffn + 2 * self.hidden) + embed + self.hidden
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    max_position_embeddings: Option<usize>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    attention_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_real_hf_configs() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs");
        for (name, arch, window, bias) in [
            ("qwen2.5-7b.json", Arch::Qwen2, None, true),
            ("llama-3-8b.json", Arch::Llama, None, false),
            ("mistral-7b.json", Arch::Mistral, Some(4096), false),
        ] {
            let text = std::fs::read_to_string(format!("{dir}/{name}")).unwrap();
            let c = ModelConfig::from_hf_json(&text).unwrap();
            assert_eq!((c.arch, c.sliding_window, c.qkv_bias), (arch, window, bias), "{name}");
            assert_eq!(c.head_dim, 128);
        }
    }

    #[test]
    fn rejects_unknown_architecture() {
        let err = ModelConfig::from_hf_json(r#"{"model_type":"gpt_neox","hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":1,"vocab_size":8}"#).unwrap_err();
        assert!(format!("{err:#}").contains("unknown architecture \"gpt_neox\""), "{err:#}");
    }

    #[test]
    fn rejects_inconsistent_heads() {
        let err = ModelConfig::from_hf_json(r#"{"model_type":"llama","hidden_size":12,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2,"vocab_size":8}"#).unwrap_err();
        assert!(format!("{err:#}").contains("not a multiple"), "{err:#}");
    }
}
