//! Arguments shared by several commands: which model, how many threads, how to sample.

use crate::{pull, registry};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use tern_core::engine::{Device, EngineConfig, DEFAULT_BLOCK_SIZE};
use tern_core::kernels::DType;
use tern_core::model::kv_cache::KvDtype;
use tern_core::model::{self, LoadedModel, ModelSource, Weights};
use tern_core::sampling::SamplingParams;
use tern_core::speculative::{Proposer, SpeculativeConfig};
use tern_core::tokenizer::Tokenizer;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A known model key (pulled on first use), a .gguf file, a Hugging Face model directory,
    /// or `dummy:<config.json>` for random weights of that configuration.
    #[arg(long, short = 'm', default_value = registry::DEFAULT_MODEL)]
    pub model: String,
    /// Weight type of dummy weights (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q4_k, q6_k).
    #[arg(long, default_value = "q8_0")]
    pub dummy_dtype: String,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Where the model runs: cpu, cuda (GPU 0) or cuda:N (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Tokenizer to use instead of the model's (needed by dummy weights to serve text): a
    /// known model key, a .gguf file, or a directory with tokenizer.json.
    #[arg(long)]
    pub tokenizer: Option<String>,
}

impl ModelArgs {
    pub fn source(&self) -> Result<ModelSource> {
        if let Some(config) = self.model.strip_prefix("dummy:") {
            let dtype = parse_dtype(&self.dummy_dtype)?;
            return Ok(ModelSource::Dummy { config: PathBuf::from(config), dtype, seed: 0 });
        }
        if let Some(known) = registry::find(&self.model) {
            return Ok(ModelSource::Gguf(pull::ensure(known, false)?));
        }
        let path = PathBuf::from(&self.model);
        if !path.exists() {
            let keys: Vec<_> = registry::KNOWN_MODELS.iter().map(|m| m.key).collect();
            bail!(
                "unknown model {:?}: not a known key ({}) and no such file or directory",
                self.model,
                keys.join(", ")
            );
        }
        ModelSource::from_path(path)
    }

    pub fn load(&self) -> Result<LoadedModel> {
        model::load(&self.source()?)
    }

    pub fn device(&self) -> Result<Device> {
        Device::parse(&self.device)
    }

    /// The tokenizer alone: `--tokenizer`, else the model's own.
    pub fn tokenizer(&self) -> Result<Option<Tokenizer>> {
        match &self.tokenizer {
            Some(spec) => Ok(Some(load_tokenizer(spec)?)),
            None => Ok(self.load()?.tokenizer),
        }
    }

    /// The weights for an engine on `--device` (dummy weights are left for the GPU to make)
    /// and the tokenizer (`--tokenizer`, else the model's own).
    pub fn weights(&self) -> Result<(Weights, Option<Tokenizer>)> {
        let (weights, tokenizer) = match (self.source()?, self.device()?) {
            (ModelSource::Dummy { config, dtype, seed }, Device::Cuda(_)) => {
                (Weights::Dummy { config: model::read_config(&config)?, dtype, seed }, None)
            }
            (source, _) => {
                let m = model::load(&source)?;
                (m.weights.into(), m.tokenizer)
            }
        };
        match &self.tokenizer {
            Some(spec) => Ok((weights, Some(load_tokenizer(spec)?))),
            None => Ok((weights, tokenizer)),
        }
    }

    pub fn threads(&self) -> Result<usize> {
        match self.threads {
            Some(0) => bail!("--threads must be at least 1"),
            Some(n) => Ok(n),
            None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
        }
    }
}

/// A tokenizer from a known model key, a .gguf file or a directory with tokenizer.json.
fn load_tokenizer(spec: &str) -> Result<Tokenizer> {
    let path = match registry::find(spec) {
        Some(known) => pull::ensure(known, false)?,
        None => PathBuf::from(spec),
    };
    if path.is_dir() {
        return Tokenizer::from_hf_dir(&path);
    }
    if !path.is_file() {
        bail!("--tokenizer {spec:?}: not a known model key, a .gguf file or a directory with tokenizer.json");
    }
    let f = tern_core::gguf::GgufFile::open(&path)?;
    Tokenizer::from_gguf(&f).with_context(|| format!("tokenizer of {}", path.display()))
}

pub fn parse_dtype(name: &str) -> Result<DType> {
    let all = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q4_K,
        DType::Q6_K,
    ];
    all.into_iter()
        .find(|d| d.name().eq_ignore_ascii_case(name))
        .with_context(|| format!("unknown weight type {name:?}"))
}

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    pub fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
        };
        p.validate()?;
        if self.max_tokens == 0 {
            bail!("--max-tokens must be at least 1");
        }
        Ok(p)
    }
}

/// How the serving engine is sized (shared by every command that runs the engine).
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Memory for the KV cache, e.g. 2GiB, 512MiB or bytes (default: 30% of available memory;
    /// on a GPU, 90% of the device memory free after weights and buffers).
    #[arg(long)]
    pub kv_cache_memory: Option<String>,
    /// Most sequences in one engine step.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Most tokens (prefill chunks + decode tokens) in one engine step.
    #[arg(long, default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Tokens per KV cache block.
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,
    /// Do not share KV blocks between requests with a common prefix.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Storage of the CPU KV cache: f32, f16 (default, as llama.cpp), bf16, or int8 / fp8
    /// (e4m3) with a scale per position and KV head. The GPU cache is bf16.
    #[arg(long)]
    pub kv_cache_dtype: Option<String>,
    /// Speculative decoding: ngram (prompt lookup), draft (a smaller model, --draft-model) or
    /// early-exit (the model's first --early-exit-layers layers propose). On a GPU: ngram only.
    #[arg(long, value_enum)]
    pub speculative: Option<SpeculativeArg>,
    /// The draft model of --speculative draft (a model key or .gguf; same tokenizer).
    #[arg(long)]
    pub draft_model: Option<String>,
    /// Most tokens proposed per sequence and step.
    #[arg(long, default_value_t = 4)]
    pub num_speculative_tokens: usize,
    /// Keep the number of proposed tokens fixed instead of adapting it to each sequence's
    /// acceptance.
    #[arg(long)]
    pub no_adaptive_speculation: bool,
    /// Layers of the early-exit proposer (--speculative early-exit).
    #[arg(long)]
    pub early_exit_layers: Option<usize>,
    /// The drafter's LM head keeps only the first N tokens of the vocabulary (the most frequent
    /// ones in byte-level BPE): a cheaper draft, output unchanged (draft and early-exit;
    /// default 32768, 0 keeps them all).
    #[arg(long)]
    pub draft_vocab: Option<usize>,
    /// Longest n-gram the ngram proposer matches (the longest match is tried first: a longer
    /// shared context predicts the continuation better).
    #[arg(long, default_value_t = 8)]
    pub prompt_lookup_max: usize,
    /// Shortest n-gram the ngram proposer matches.
    #[arg(long, default_value_t = 1)]
    pub prompt_lookup_min: usize,
    /// The ngram proposer proposes at most this many tokens per token of the match (a 1-token
    /// match: 3, a 3-token match: 9; still at most --num-speculative-tokens); 0: no cap.
    #[arg(long, default_value_t = 3)]
    pub prompt_lookup_per_match: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SpeculativeArg {
    Ngram,
    Draft,
    EarlyExit,
}

impl EngineArgs {
    /// The speculative decoding settings (loading the draft model), checked against the target.
    pub fn speculative(&self, target_tokenizer: Option<&Tokenizer>) -> Result<Option<SpeculativeConfig>> {
        let Some(kind) = self.speculative else {
            if self.draft_model.is_some() || self.early_exit_layers.is_some() || self.draft_vocab.is_some() {
                bail!("--draft-model, --early-exit-layers and --draft-vocab need --speculative draft / early-exit");
            }
            return Ok(None);
        };
        if kind != SpeculativeArg::Draft && self.draft_model.is_some() {
            bail!("--draft-model applies to --speculative draft only");
        }
        if kind != SpeculativeArg::EarlyExit && self.early_exit_layers.is_some() {
            bail!("--early-exit-layers applies to --speculative early-exit only");
        }
        let proposer = match kind {
            SpeculativeArg::Ngram => Proposer::Ngram {
                min_n: self.prompt_lookup_min,
                max_n: self.prompt_lookup_max,
                per_match: self.prompt_lookup_per_match,
            },
            SpeculativeArg::EarlyExit => Proposer::EarlyExit {
                layers: self.early_exit_layers.context("--speculative early-exit needs --early-exit-layers N")?,
            },
            SpeculativeArg::Draft => {
                let key = self.draft_model.as_deref().context("--speculative draft needs --draft-model")?;
                let draft = ModelArgs {
                    model: key.to_string(),
                    dummy_dtype: "q8_0".into(),
                    threads: None,
                    device: "cpu".into(),
                    tokenizer: None,
                };
                let loaded = draft.load().with_context(|| format!("loading the draft model {key}"))?;
                if let (Some(t), Some(d)) = (target_tokenizer, &loaded.tokenizer) {
                    if !t.same_vocabulary(d) {
                        bail!("the draft model {key} has a different tokenizer than the target model");
                    }
                }
                Proposer::Draft(Box::new(loaded.weights))
            }
        };
        let draft_vocab = match kind {
            // (SpeculativeConfig::check refuses it with lookup.)
            SpeculativeArg::Ngram => self.draft_vocab,
            // Measured on qwen2.5-1.5b with the 0.5B draft: a quarter less proposing time.
            _ => Some(self.draft_vocab.unwrap_or(32768)).filter(|&n| n > 0),
        };
        Ok(Some(SpeculativeConfig {
            proposer,
            num_tokens: self.num_speculative_tokens,
            adaptive: !self.no_adaptive_speculation,
            draft_vocab,
        }))
    }

    /// The engine settings; `tokenizer` is the target model's (a draft model must match it).
    pub fn config(&self, n_threads: usize, device: Device, tokenizer: Option<&Tokenizer>) -> Result<EngineConfig> {
        for (name, v) in [
            ("--max-num-seqs", self.max_num_seqs),
            ("--max-num-batched-tokens", self.max_num_batched_tokens),
            ("--block-size", self.block_size),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        Ok(EngineConfig {
            block_size: self.block_size,
            kv_cache_memory: self.kv_cache_memory.as_deref().map(parse_bytes).transpose()?,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            enable_prefix_caching: !self.no_prefix_caching,
            kv_cache_dtype: kv_cache_dtype(self.kv_cache_dtype.as_deref(), device)?,
            n_threads,
            device,
            speculative: self.speculative(tokenizer)?,
        })
    }
}

/// The KV cache storage `--kv-cache-dtype` asks for; without one, f16 on the CPU (half the
/// memory traffic of f32 for attention, which dominates batched decoding at a few hundred
/// tokens of context; perplexity moves by < 0.01%) and the GPU runner's own bf16 (`F32` tells
/// it nothing was asked for).
pub fn kv_cache_dtype(arg: Option<&str>, device: Device) -> Result<KvDtype> {
    match (arg, device) {
        (Some(s), _) => KvDtype::parse(s),
        (None, Device::Cpu) => Ok(KvDtype::F16),
        (None, Device::Cuda(_)) => Ok(KvDtype::F32),
    }
}

/// "2GiB", "512MiB", "1.5GB", "4096" (bytes).
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => bail!("cannot read {s:?} as a size (examples: 2GiB, 512MiB, 1e9 bytes as 1000000000)"),
    };
    let v: f64 = num.parse().with_context(|| format!("cannot read {s:?} as a size (examples: 2GiB, 512MiB)"))?;
    if !(v * mult).is_finite() || v * mult < 1.0 {
        bail!("size {s:?} must be at least one byte");
    }
    Ok((v * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1.5 MB").unwrap(), 1_500_000);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }
}
