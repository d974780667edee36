//! Models: configuration, weights from GGUF / Hugging Face / dummy sources, and the decoder.

pub mod config;
pub mod decoder;
pub mod dummy;
pub mod kv_cache;
pub mod load_gguf;
pub mod load_hf;
pub mod ops;
pub mod weights;

use crate::gguf::GgufFile;
use crate::kernels::DType;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use weights::ModelWeights;

/// Where a model's weights come from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    Gguf(PathBuf),
    /// A directory with config.json, *.safetensors and optionally tokenizer.json.
    HfDir(PathBuf),
    /// Random weights of the shapes in a Hugging Face config.json.
    Dummy {
        config: PathBuf,
        dtype: DType,
        seed: u64,
    },
}

impl ModelSource {
    /// A path: a .gguf file, or a directory in Hugging Face layout.
    pub fn from_path(path: PathBuf) -> Result<Self> {
        if path.is_dir() {
            if !path.join("config.json").is_file() {
                bail!(
                    "{} is a directory without config.json (expected a Hugging Face model directory)",
                    path.display()
                );
            }
            Ok(ModelSource::HfDir(path))
        } else if path.is_file() {
            Ok(ModelSource::Gguf(path))
        } else {
            bail!("model path {} does not exist", path.display())
        }
    }
}

/// The weights an engine runs: loaded, or to be made on the device they run on (random
/// weights of a real configuration need no host memory when the device makes them).
pub enum Weights {
    Host(ModelWeights),
    Dummy { config: config::ModelConfig, dtype: DType, seed: u64 },
}

impl Weights {
    pub fn config(&self) -> &config::ModelConfig {
        match self {
            Weights::Host(w) => &w.config,
            Weights::Dummy { config, .. } => config,
        }
    }

    /// The weights in host memory (dummy ones generated here).
    pub fn into_host(self) -> Result<ModelWeights> {
        match self {
            Weights::Host(w) => Ok(w),
            Weights::Dummy { config, dtype, seed } => dummy::load(config, dtype, seed),
        }
    }
}

impl From<ModelWeights> for Weights {
    fn from(w: ModelWeights) -> Self {
        Weights::Host(w)
    }
}

pub struct LoadedModel {
    pub weights: ModelWeights,
    /// None for dummy weights and HF directories without tokenizer.json.
    pub tokenizer: Option<Tokenizer>,
}

pub fn load(source: &ModelSource) -> Result<LoadedModel> {
    match source {
        ModelSource::Gguf(path) => {
            let f = GgufFile::open(path)?;
            let weights = load_gguf::load(&f).with_context(|| format!("loading {}", path.display()))?;
            let tokenizer = Tokenizer::from_gguf(&f).with_context(|| format!("tokenizer of {}", path.display()))?;
            Ok(LoadedModel { weights, tokenizer: Some(tokenizer) })
        }
        ModelSource::HfDir(dir) => {
            let weights = load_hf::load(dir).with_context(|| format!("loading {}", dir.display()))?;
            let tokenizer =
                if dir.join("tokenizer.json").is_file() { Some(Tokenizer::from_hf_dir(dir)?) } else { None };
            Ok(LoadedModel { weights, tokenizer })
        }
        ModelSource::Dummy { config, dtype, seed } => {
            Ok(LoadedModel { weights: dummy::load(read_config(config)?, *dtype, *seed)?, tokenizer: None })
        }
    }
}

/// A Hugging Face config.json.
pub fn read_config(path: &std::path::Path) -> Result<config::ModelConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    config::ModelConfig::from_hf_json(&text).with_context(|| format!("in {}", path.display()))
}
