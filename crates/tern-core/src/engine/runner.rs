//! The model side of an engine step: where K/V live and how one batched forward pass runs.
//! The engine (scheduling, sampling, streaming) is the same whatever the device; a `Runner`
//! per device owns the weights, the KV block pool and the forward pass.

use super::paged_kv::{PagedKv, PagedView};
use super::{EngineConfig, DEFAULT_KV_MEMORY_FRACTION};
use crate::model::config::ModelConfig;
use crate::model::decoder::{Decoder, SeqChunk};
use crate::model::weights::ModelWeights;
use anyhow::{bail, Context, Result};

/// What a forward pass produced for one chunk that asked for logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Row {
    /// Row `i` of `StepOutput::logits`.
    Logits(usize),
    /// The argmax token, picked on the device (only where the step said greedy suffices).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Token(u32),
}

#[derive(Default)]
pub(crate) struct StepOutput {
    pub logits: Vec<f32>,
    pub rows: Vec<Row>,
}

pub(crate) trait Runner {
    fn config(&self) -> &ModelConfig;
    /// KV blocks in the pool.
    fn n_blocks(&self) -> usize;
    /// A line for logs: the device and what it holds.
    fn describe(&self) -> String;
    /// Weight bytes one decode step reads (every layer matrix and the LM head).
    fn weight_bytes_per_token(&self) -> usize;
    /// The K/V pool where it is in host memory (an early-exit drafter reads it).
    fn host_kv(&self) -> Option<&PagedKv>;
    /// Starts one forward pass over a packed batch: `tables[i]` is chunk i's block table (the
    /// blocks of positions `0..pos0 + len`); `greedy[j]` says whether the j-th chunk that asks
    /// for logits only needs its argmax. A device may still be running it on return, so the
    /// engine streams the previous step's text meanwhile; `collect` ends the pass.
    fn launch(&mut self, chunks: &[SeqChunk], tables: &[&[u32]], greedy: &[bool], out: &mut StepOutput) -> Result<()>;
    /// Waits for the launched pass: for every chunk that asked for logits, in order, `out.rows`
    /// gets its row.
    fn collect(&mut self, out: &mut StepOutput) -> Result<()>;
    /// `launch`, then `collect`.
    #[cfg(all(test, feature = "cuda"))]
    fn forward(&mut self, chunks: &[SeqChunk], tables: &[&[u32]], greedy: &[bool], out: &mut StepOutput) -> Result<()> {
        self.launch(chunks, tables, greedy, out)?;
        self.collect(out)
    }
}

/// The CPU: the decoder and a host-memory block pool (f32 or int8 K/V).
pub(crate) struct CpuRunner {
    decoder: Decoder,
    kv: PagedKv,
}

impl CpuRunner {
    pub(crate) fn new(weights: ModelWeights, cfg: &EngineConfig) -> Result<Self> {
        let c = &weights.config;
        let per_block = PagedKv::bytes_per_block(c, cfg.block_size, cfg.kv_cache_dtype) as u64;
        let budget = match cfg.kv_cache_memory {
            Some(b) => b,
            None => {
                let avail = mem_available().context("cannot read available memory: give the KV cache size")?;
                ((avail as f64 * DEFAULT_KV_MEMORY_FRACTION) as u64).min(most_needed(c, cfg) * per_block)
            }
        };
        let n_blocks = blocks_in(budget, per_block, cfg.block_size)?;
        let kv = PagedKv::new(c, cfg.block_size, n_blocks, cfg.kv_cache_dtype)?;
        Ok(CpuRunner { decoder: Decoder::new(weights, cfg.n_threads)?, kv })
    }
}

impl Runner for CpuRunner {
    fn config(&self) -> &ModelConfig {
        self.decoder.config()
    }

    fn n_blocks(&self) -> usize {
        self.kv.n_blocks()
    }

    fn describe(&self) -> String {
        format!("cpu, {} KV blocks", self.kv.n_blocks())
    }

    fn weight_bytes_per_token(&self) -> usize {
        self.decoder.weights.bytes_per_token()
    }

    fn host_kv(&self) -> Option<&PagedKv> {
        Some(&self.kv)
    }

    /// The whole pass (the cores that would overlap it are the ones computing it).
    fn launch(&mut self, chunks: &[SeqChunk], tables: &[&[u32]], _greedy: &[bool], out: &mut StepOutput) -> Result<()> {
        let mut view = PagedView { kv: &mut self.kv, tables: tables.to_vec() };
        self.decoder.forward_batch(chunks, &mut view, &mut out.logits)?;
        let n_rows = out.logits.len() / self.decoder.config().vocab_size;
        out.rows.clear();
        out.rows.extend((0..n_rows).map(Row::Logits));
        Ok(())
    }

    fn collect(&mut self, _out: &mut StepOutput) -> Result<()> {
        Ok(())
    }
}

/// Blocks that every sequence at full context would use: no pool needs more.
pub(crate) fn most_needed(c: &ModelConfig, cfg: &EngineConfig) -> u64 {
    (cfg.max_num_seqs * c.max_context).div_ceil(cfg.block_size) as u64
}

pub(crate) fn blocks_in(budget: u64, per_block: u64, block_size: usize) -> Result<usize> {
    let n = (budget / per_block) as usize;
    if n == 0 {
        bail!("a KV cache of {budget} bytes holds no block ({per_block} bytes per block of {block_size} tokens)");
    }
    Ok(n)
}

/// MemAvailable from /proc/meminfo, in bytes.
fn mem_available() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:")).context("no MemAvailable in /proc/meminfo")?;
    let kib: u64 = line.split_whitespace().nth(1).context("malformed MemAvailable")?.parse()?;
    Ok(kib * 1024)
}
