//! The engine loop: take commands, schedule a step, run one batched forward pass over every
//! scheduled token, sample, stream, free what finished.

use super::block_manager::BlockManager;
use super::handle::{Command, SubmitError};
use super::metrics::Metrics;
use super::paged_kv::{PagedKv, PagedView};
use super::scheduler::Scheduler;
use super::sequence::Sequence;
use super::{EngineConfig, DEFAULT_KV_MEMORY_FRACTION};
use crate::generation::{FinishReason, GenerateRequest};
use crate::model::config::ModelConfig;
use crate::model::decoder::{Decoder, LogitsFor, SeqChunk};
use crate::model::weights::ModelWeights;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

/// As OpenAI's `top_logprobs`.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// What a request may ask for, checked when it is submitted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub kv_tokens: usize,
}

impl Limits {
    pub(crate) fn validate(&self, req: &GenerateRequest, c: &ModelConfig) -> Result<(), SubmitError> {
        let n = req.prompt_ids.len();
        if n == 0 {
            return Err(SubmitError::invalid(Some("prompt"), "the prompt is empty"));
        }
        if let Some(&bad) = req.prompt_ids.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(SubmitError::invalid(
                Some("prompt"),
                format!("token id {bad} is out of range (vocabulary of {})", c.vocab_size),
            ));
        }
        if req.max_tokens == 0 {
            return Err(SubmitError::invalid(Some("max_tokens"), "max_tokens must be at least 1"));
        }
        if n + req.max_tokens > c.max_context {
            return Err(SubmitError::invalid(
                Some(if n >= c.max_context { "prompt" } else { "max_tokens" }),
                format!(
                    "this model's maximum context length is {} tokens, but {} were requested ({n} in the prompt, {} to generate)",
                    c.max_context,
                    n + req.max_tokens,
                    req.max_tokens
                ),
            ));
        }
        if n + req.max_tokens > self.kv_tokens {
            return Err(SubmitError::invalid(
                Some("max_tokens"),
                format!(
                    "the request needs {} KV positions but the KV cache holds {} (raise --kv-cache-memory)",
                    n + req.max_tokens,
                    self.kv_tokens
                ),
            ));
        }
        if let Err(e) = req.sampling.validate() {
            return Err(SubmitError::invalid(None, e.to_string()));
        }
        if req.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err(SubmitError::invalid(
                Some("top_logprobs"),
                format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}"),
            ));
        }
        Ok(())
    }
}

pub(crate) struct Engine {
    decoder: Decoder,
    kv: PagedKv,
    blocks: BlockManager,
    sched: Scheduler,
    tokenizer: Option<Arc<Tokenizer>>,
    metrics: Arc<Metrics>,
    block_size: usize,
    logits: Vec<f32>,
}

impl Engine {
    pub(crate) fn new(
        weights: ModelWeights,
        tokenizer: Option<Arc<Tokenizer>>,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let c = weights.config.clone();
        let bs = cfg.block_size;
        if bs == 0 || cfg.max_num_seqs == 0 || cfg.max_num_batched_tokens == 0 {
            bail!("block size, max_num_seqs and max_num_batched_tokens must be at least 1");
        }
        let per_block = PagedKv::bytes_per_block(&c, bs) as u64;
        let budget = match cfg.kv_cache_memory {
            Some(b) => b,
            None => {
                let avail = mem_available().context("cannot read available memory: give the KV cache size")?;
                // No more than every sequence at full context would use.
                let most = (cfg.max_num_seqs * c.max_context).div_ceil(bs) as u64 * per_block;
                ((avail as f64 * DEFAULT_KV_MEMORY_FRACTION) as u64).min(most)
            }
        };
        let n_blocks = (budget / per_block) as usize;
        if n_blocks == 0 {
            bail!("a KV cache of {budget} bytes holds no block ({per_block} bytes per block of {bs} tokens)");
        }
        let kv = PagedKv::new(&c, bs, n_blocks)?;
        metrics.kv_blocks_total.store(n_blocks as u64, Relaxed);
        Ok(Engine {
            decoder: Decoder::new(weights, cfg.n_threads),
            kv,
            blocks: BlockManager::new(n_blocks, cfg.enable_prefix_caching),
            sched: Scheduler::new(cfg.max_num_seqs, cfg.max_num_batched_tokens, bs),
            tokenizer,
            metrics,
            block_size: bs,
            logits: Vec::new(),
        })
    }

    pub(crate) fn limits(&self) -> Limits {
        Limits { kv_tokens: self.kv.n_blocks() * self.block_size }
    }

    /// The engine thread: runs until shut down (after draining) or every handle is gone.
    pub(crate) fn run(mut self, commands: Receiver<Command>) {
        let mut draining = false;
        loop {
            if self.sched.is_idle() {
                if draining {
                    return;
                }
                match commands.recv() {
                    Ok(cmd) => draining |= self.handle(cmd),
                    Err(_) => return,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(cmd) => draining |= self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.abort_all();
                        return;
                    }
                }
            }
            self.drop_abandoned();
            self.step();
        }
    }

    /// Applies a command; true when it asks the engine to drain and exit.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit { id, req, events } => {
                let vocab = self.decoder.config().vocab_size;
                let reply = events.clone();
                match Sequence::new(id, *req, vocab, events) {
                    Ok(seq) => self.sched.waiting.push_back(seq),
                    Err(e) => {
                        let _ = reply.send(super::Event::Error(format!("{e:#}")));
                    }
                }
            }
            Command::Cancel(id) => self.end(id, FinishReason::Abort),
            Command::AbortAll => self.abort_all(),
            Command::Shutdown => return true,
        }
        false
    }

    fn abort_all(&mut self) {
        let ids: Vec<u64> = self.sched.running.iter().chain(&self.sched.waiting).map(|s| s.id).collect();
        for id in ids {
            self.end(id, FinishReason::Abort);
        }
    }

    /// Cancels requests whose client has gone away.
    fn drop_abandoned(&mut self) {
        let gone: Vec<u64> =
            self.sched.running.iter().chain(&self.sched.waiting).filter(|s| !s.is_listening()).map(|s| s.id).collect();
        for id in gone {
            self.end(id, FinishReason::Abort);
        }
    }

    /// Finishes a sequence: final events, blocks freed, counted.
    fn end(&mut self, id: u64, reason: FinishReason) {
        let Some(mut seq) = self.sched.take(id) else { return };
        seq.finish(reason, self.tokenizer.as_deref());
        seq.free_blocks(&mut self.blocks);
        let counter = match reason {
            FinishReason::Stop => &self.metrics.requests_stop,
            FinishReason::Length => &self.metrics.requests_length,
            FinishReason::Abort => &self.metrics.requests_abort,
        };
        counter.fetch_add(1, Relaxed);
    }

    fn fail(&mut self, id: u64, message: String) {
        let Some(mut seq) = self.sched.take(id) else { return };
        seq.fail(message);
        seq.free_blocks(&mut self.blocks);
        self.metrics.requests_error.fetch_add(1, Relaxed);
    }

    fn step(&mut self) {
        let scheduled = self.sched.schedule(&mut self.blocks, &self.metrics);
        self.update_gauges();
        if scheduled.is_empty() {
            return;
        }
        self.metrics.steps.fetch_add(1, Relaxed);
        let running = &self.sched.running;
        let index: Vec<usize> = scheduled
            .iter()
            .map(|s| running.iter().position(|r| r.id == s.id).expect("scheduled is running"))
            .collect();
        let chunks: Vec<SeqChunk> = scheduled
            .iter()
            .zip(&index)
            .enumerate()
            .map(|(k, (s, &i))| {
                let seq = &running[i];
                let (from, to) = (seq.num_computed, seq.num_computed + s.n_new);
                SeqChunk {
                    seq: k,
                    tokens: &seq.tokens[from..to],
                    pos0: from,
                    logits: (to == seq.tokens.len()).then_some(LogitsFor::Last),
                }
            })
            .collect();
        let wants_logits: Vec<bool> = chunks.iter().map(|c| c.logits.is_some()).collect();
        let tables = index.iter().map(|&i| running[i].table.as_slice()).collect();
        let mut view = PagedView { kv: &mut self.kv, tables };
        let result = self.decoder.forward_batch(&chunks, &mut view, &mut self.logits);
        if let Err(e) = result {
            for s in &scheduled {
                self.fail(s.id, format!("forward pass failed: {e:#}"));
            }
            return;
        }
        let vocab = self.decoder.config().vocab_size;
        let mut row = 0;
        let mut ended = Vec::new();
        for ((s, &i), wants) in scheduled.iter().zip(&index).zip(wants_logits) {
            let seq = &mut self.sched.running[i];
            let prompt_part = (seq.num_computed + s.n_new).min(seq.n_prompt).saturating_sub(seq.num_computed);
            self.metrics.prefill_tokens_computed.fetch_add(prompt_part as u64, Relaxed);
            seq.advance(s.n_new, &mut self.blocks, self.block_size);
            if !wants {
                continue;
            }
            let logits = &mut self.logits[row * vocab..(row + 1) * vocab];
            row += 1;
            match seq.on_logits(logits, self.tokenizer.as_deref(), &self.metrics) {
                Ok(Some(reason)) => ended.push((s.id, Ok(reason))),
                Ok(None) => {}
                Err(e) => ended.push((s.id, Err(format!("{e:#}")))),
            }
        }
        for (id, outcome) in ended {
            match outcome {
                Ok(reason) => self.end(id, reason),
                Err(message) => self.fail(id, message),
            }
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.running.store(self.sched.running.len() as u64, Relaxed);
        m.waiting.store(self.sched.waiting.len() as u64, Relaxed);
        m.kv_blocks_used.store(self.blocks.n_used() as u64, Relaxed);
    }
}

/// MemAvailable from /proc/meminfo, in bytes.
fn mem_available() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:")).context("no MemAvailable in /proc/meminfo")?;
    let kib: u64 = line.split_whitespace().nth(1).context("malformed MemAvailable")?.parse()?;
    Ok(kib * 1024)
}
