//! The serving engine: many requests share one model through a paged KV cache with prefix
//! caching, an iteration-level scheduler (continuous batching, chunked prefill, preemption by
//! recompute) and one batched forward pass per step. It runs on its own thread; front ends
//! (CLI, server, benchmarks) submit requests through an `EngineHandle` and read each request's
//! token events from its `RequestStream`.

mod block_manager;
mod core;
mod handle;
pub mod metrics;
pub(crate) mod paged_kv;
pub(crate) mod runner;
mod scheduler;
mod sequence;

pub use self::core::MAX_TOP_LOGPROBS;
pub use handle::{EngineHandle, RequestStream, SubmitError};
pub use metrics::Metrics;

use crate::generation::FinishReason;
use crate::sampling::TokenLogprob;
use anyhow::{bail, Result};
use std::time::Duration;

/// Tokens per KV block unless configured otherwise (as vLLM).
pub const DEFAULT_BLOCK_SIZE: usize = 16;
/// Share of the memory available at start-up that the KV pool takes when no size is given.
pub const DEFAULT_KV_MEMORY_FRACTION: f64 = 0.3;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Bytes for the KV block pool; None: `DEFAULT_KV_MEMORY_FRACTION` of available memory.
    pub kv_cache_memory: Option<u64>,
    /// Storage of cached K/V rows (the CPU pool; the GPU pool is bf16).
    pub kv_cache_dtype: crate::model::kv_cache::KvDtype,
    /// Most sequences scheduled in one step.
    pub max_num_seqs: usize,
    /// Most tokens (prefill chunks + decode tokens) in one step.
    pub max_num_batched_tokens: usize,
    pub enable_prefix_caching: bool,
    /// Worker threads of the forward pass.
    pub n_threads: usize,
    /// Where the model runs.
    pub device: Device,
    /// Speculative decoding (None: off).
    pub speculative: Option<crate::speculative::SpeculativeConfig>,
}

/// Where the model runs: the CPU, or a CUDA GPU (by ordinal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// "cpu", "cuda" (GPU 0) or "cuda:N".
    pub fn parse(s: &str) -> Result<Device> {
        let t = s.trim().to_ascii_lowercase();
        if t == "cpu" {
            return Ok(Device::Cpu);
        }
        if t == "cuda" {
            return Ok(Device::Cuda(0));
        }
        match t.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Device::Cuda(n)),
            _ => bail!("unknown device {s:?}: expected cpu, cuda or cuda:N"),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: DEFAULT_BLOCK_SIZE,
            kv_cache_memory: None,
            kv_cache_dtype: Default::default(),
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            enable_prefix_caching: true,
            n_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            device: Device::Cpu,
            speculative: None,
        }
    }
}

/// What a request's stream carries, in order: tokens, then exactly one `Finished` or `Error`.
#[derive(Debug, Clone)]
pub enum Event {
    /// A generated token and the text it completes (may be empty while a character or a stop
    /// string is pending). `id` is None for the final flush of held-back text.
    Token {
        id: Option<u32>,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Finished(Finished),
    /// The engine failed while running this request.
    Error(String),
}

#[derive(Debug, Clone)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache (not computed for this request).
    pub cached_tokens: usize,
    /// From submission to the first generated token.
    pub time_to_first_token: Duration,
    /// From submission to the end.
    pub total_time: Duration,
}
