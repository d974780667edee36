//! Arguments shared by several commands: which model, how many threads, how to sample.

use crate::{pull, registry};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use tern_core::kernels::DType;
use tern_core::model::{self, LoadedModel, ModelSource};
use tern_core::sampling::SamplingParams;

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

    pub fn threads(&self) -> Result<usize> {
        match self.threads {
            Some(0) => bail!("--threads must be at least 1"),
            Some(n) => Ok(n),
            None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
        }
    }
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
