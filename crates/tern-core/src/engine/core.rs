//! The engine loop: take commands, schedule a step, run one batched forward pass over every
//! scheduled token, sample, stream, free what finished.

use super::block_manager::BlockManager;
use super::handle::{Command, SubmitError};
use super::metrics::Metrics;
use super::runner::{CpuRunner, Row, Runner, StepOutput};
use super::scheduler::Scheduler;
use super::sequence::Sequence;
use super::{Device, EngineConfig};
use crate::generation::{FinishReason, GenerateRequest};
use crate::model::config::ModelConfig;
use crate::model::decoder::{LogitsFor, SeqChunk};
use crate::model::Weights;
use crate::speculative::drafter::{DraftRequest, Drafter};
use crate::speculative::{ngram, Proposer, SpecState, SpeculativeConfig};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

/// As OpenAI's `top_logprobs`.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// What a request may ask for, checked when it is submitted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub kv_tokens: usize,
    pub speculative: bool,
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
        if req.num_speculative_tokens.is_some_and(|k| k > 0) && !self.speculative {
            return Err(SubmitError::invalid(
                Some("num_speculative_tokens"),
                "this engine runs without speculative decoding (start it with --speculative)",
            ));
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
    runner: Box<dyn Runner>,
    blocks: BlockManager,
    sched: Scheduler,
    tokenizer: Option<Arc<Tokenizer>>,
    metrics: Arc<Metrics>,
    block_size: usize,
    out: StepOutput,
    spec: Option<SpeculativeConfig>,
    /// The draft model (or the target's first layers) of `draft` / `early-exit` speculation.
    drafter: Option<Drafter>,
}

impl Engine {
    /// Builds the runner for `cfg.device` (on the calling thread: the engine thread, which a
    /// GPU context is bound to) and the scheduler around its KV pool.
    pub(crate) fn new(
        weights: Weights,
        tokenizer: Option<Arc<Tokenizer>>,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        if cfg.block_size == 0 || cfg.max_num_seqs == 0 || cfg.max_num_batched_tokens == 0 {
            bail!("block size, max_num_seqs and max_num_batched_tokens must be at least 1");
        }
        // Speculation reads the target's weights on the host; packed before the early-exit
        // drafter takes its layers, so that both share one packed copy.
        let weights = match (&cfg.speculative, cfg.device) {
            (Some(_), Device::Cpu) => {
                let mut host = weights.into_host()?;
                host.pack_for_cpu()?;
                Weights::Host(host)
            }
            _ => weights,
        };
        let mut drafter = None;
        if let Some(spec) = &cfg.speculative {
            spec.check(weights.config())?;
            drafter = match (&spec.proposer, &weights) {
                (Proposer::Ngram { .. }, _) => None,
                // The drafters are CPU decoders: beside a GPU target they would set the pace.
                (p, _) if cfg.device != Device::Cpu => {
                    bail!("--speculative {} runs on the CPU only; on a GPU use --speculative ngram", p.name())
                }
                (Proposer::Draft(w), _) => Some(Drafter::new((**w).clone(), spec.draft_vocab, cfg.n_threads)?),
                (Proposer::EarlyExit { layers }, Weights::Host(target)) => {
                    Some(Drafter::early_exit(target, *layers, spec.draft_vocab, cfg.n_threads)?)
                }
                (Proposer::EarlyExit { .. }, _) => {
                    bail!("early-exit speculation needs the model's weights on the host")
                }
            };
        }
        let runner: Box<dyn Runner> = match cfg.device {
            Device::Cpu => Box::new(CpuRunner::new(weights.into_host()?, &cfg)?),
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => Box::new(crate::cuda::CudaRunner::new(weights, &cfg, ordinal)?),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => {
                bail!("this tern was built without CUDA support: rebuild with `--features cuda` to use --device cuda")
            }
        };
        let n_blocks = runner.n_blocks();
        metrics.kv_blocks_total.store(n_blocks as u64, Relaxed);
        Ok(Engine {
            runner,
            blocks: BlockManager::new(n_blocks, cfg.enable_prefix_caching),
            sched: Scheduler::new(cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.block_size),
            tokenizer,
            metrics,
            block_size: cfg.block_size,
            out: StepOutput::default(),
            spec: cfg.speculative.clone(),
            drafter,
        })
    }

    pub(crate) fn describe(&self) -> String {
        self.runner.describe()
    }

    pub(crate) fn weight_bytes_per_token(&self) -> usize {
        self.runner.weight_bytes_per_token()
    }

    pub(crate) fn limits(&self) -> Limits {
        Limits { kv_tokens: self.runner.n_blocks() * self.block_size, speculative: self.spec.is_some() }
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
                let vocab = self.runner.config().vocab_size;
                let reply = events.clone();
                match Sequence::new(id, *req, vocab, events) {
                    Ok(mut seq) => {
                        if let Some(spec) = &self.spec {
                            let k =
                                seq.request().num_speculative_tokens.unwrap_or(spec.num_tokens).min(spec.num_tokens);
                            seq.spec = (k > 0).then(|| SpecState::new(k, spec.adaptive));
                        }
                        self.sched.waiting.push_back(seq)
                    }
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
        if let Some(d) = &mut self.drafter {
            d.remove(id);
        }
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
        if let Some(d) = &mut self.drafter {
            d.remove(id);
        }
        self.metrics.requests_error.fetch_add(1, Relaxed);
    }

    fn step(&mut self) {
        let started = std::time::Instant::now();
        self.step_inner();
        self.metrics.step_micros.fetch_add(started.elapsed().as_micros() as u64, Relaxed);
    }

    /// Proposes tokens for every decoding sequence that speculates. A drafter failure only
    /// turns speculation off for this step.
    fn propose(&mut self) {
        let Some(spec) = &self.spec else { return };
        let started = std::time::Instant::now();
        let max_context = self.runner.config().max_context;
        let mut asks = Vec::new();
        for seq in &mut self.sched.running {
            seq.proposal.clear();
            let Some(state) = &seq.spec else { continue };
            if seq.remaining() != 1 {
                continue;
            }
            let req = seq.request();
            // Tokens past max_tokens (or the context) would be thrown away.
            let left = req.max_tokens.saturating_sub(seq.n_output() + 1);
            let room = max_context.saturating_sub(seq.tokens.len() + 1);
            let k = state.k.min(left).min(room);
            if k == 0 {
                continue;
            }
            match &spec.proposer {
                Proposer::Ngram { min_n, max_n, per_match } => {
                    seq.proposal.tokens = ngram::propose(&seq.tokens, *min_n, *max_n, *per_match, k);
                    seq.proposal.q = vec![None; seq.proposal.tokens.len()];
                }
                _ => asks.push((seq.id, k, (seq.n_prompt + req.max_tokens + 1).min(max_context))),
            }
        }
        if let Some(drafter) = &mut self.drafter {
            let mut proposals: Vec<(u64, crate::speculative::Proposal)> =
                asks.iter().map(|&(id, _, _)| (id, Default::default())).collect();
            let mut reqs: Vec<DraftRequest> = Vec::with_capacity(asks.len());
            for ((id, k, capacity), (_, out)) in asks.iter().zip(proposals.iter_mut()) {
                let seq = self.sched.running.iter().find(|s| s.id == *id).expect("running");
                reqs.push(DraftRequest {
                    id: *id,
                    tokens: &seq.tokens,
                    table: &seq.table,
                    computed: seq.num_computed,
                    k: *k,
                    capacity: *capacity,
                    sampling: &seq.request().sampling,
                    out,
                });
            }
            let result = drafter.propose(&mut reqs, self.runner.host_kv());
            drop(reqs);
            if result.is_ok() {
                for (id, p) in proposals {
                    if let Some(seq) = self.sched.running.iter_mut().find(|s| s.id == id) {
                        seq.proposal = p;
                    }
                }
            }
        }
        self.metrics.spec_propose_micros.fetch_add(started.elapsed().as_micros() as u64, Relaxed);
    }

    fn step_inner(&mut self) {
        self.propose();
        let schedule_started = std::time::Instant::now();
        let scheduled = self.sched.schedule(&mut self.blocks, &self.metrics);
        self.metrics.schedule_micros.fetch_add(schedule_started.elapsed().as_micros() as u64, Relaxed);
        self.update_gauges();
        if scheduled.is_empty() {
            for (id, message) in self.stream_unsent() {
                self.fail(id, message);
            }
            return;
        }
        self.metrics.steps.fetch_add(1, Relaxed);
        let index: Vec<usize> = scheduled
            .iter()
            .map(|s| self.sched.running.iter().position(|r| r.id == s.id).expect("scheduled is running"))
            .collect();
        // Proposals not scheduled this step are dropped (proposed afresh next step).
        let verifying: Vec<bool> = index.iter().map(|&i| !self.sched.running[i].proposal.tokens.is_empty()).collect();
        for (i, seq) in self.sched.running.iter_mut().enumerate() {
            if !index.contains(&i) {
                seq.proposal.clear();
            }
        }
        for (&i, &v) in index.iter().zip(&verifying) {
            if v {
                let seq = &mut self.sched.running[i];
                seq.verify_tokens.clear();
                seq.verify_tokens.push(*seq.tokens.last().expect("a decode has tokens"));
                seq.verify_tokens.extend_from_slice(&seq.proposal.tokens);
            }
        }
        let running = &self.sched.running;
        let chunks: Vec<SeqChunk> = scheduled
            .iter()
            .zip(&index)
            .zip(&verifying)
            .enumerate()
            .map(|(k, ((s, &i), &v))| {
                let seq = &running[i];
                let (from, to) = (seq.num_computed, seq.num_computed + s.n_new);
                if v {
                    debug_assert_eq!(seq.verify_tokens.len(), s.n_new);
                    return SeqChunk { seq: k, tokens: &seq.verify_tokens, pos0: from, logits: Some(LogitsFor::All) };
                }
                SeqChunk {
                    seq: k,
                    tokens: &seq.tokens[from..to],
                    pos0: from,
                    logits: (to == seq.tokens.len()).then_some(LogitsFor::Last),
                }
            })
            .collect();
        let wants_logits: Vec<bool> = chunks.iter().map(|c| c.logits.is_some()).collect();
        let greedy: Vec<bool> = chunks
            .iter()
            .zip(&index)
            .filter(|(c, _)| c.logits.is_some())
            .map(|(_, &i)| !running[i].needs_logits())
            .collect();
        let tables: Vec<&[u32]> = index.iter().map(|&i| running[i].table.as_slice()).collect();
        let launch_started = std::time::Instant::now();
        let launched = self.runner.launch(&chunks, &tables, &greedy, &mut self.out);
        let launch_micros = launch_started.elapsed().as_micros() as u64;
        // While the device runs this step, the previous step's tokens become text and events.
        let stream_started = std::time::Instant::now();
        let mut ended: Vec<(u64, Result<FinishReason, String>)> =
            self.stream_unsent().into_iter().map(|(id, message)| (id, Err(message))).collect();
        let stream_micros = stream_started.elapsed().as_micros() as u64;
        let collect_started = std::time::Instant::now();
        let result = launched.and_then(|()| self.runner.collect(&mut self.out));
        let forward_micros = launch_micros + collect_started.elapsed().as_micros() as u64;
        self.metrics.forward_micros.fetch_add(forward_micros, Relaxed);
        if let Err(e) = result {
            for s in &scheduled {
                self.fail(s.id, format!("forward pass failed: {e:#}"));
            }
            for (id, outcome) in ended {
                if let Err(message) = outcome {
                    self.fail(id, message);
                }
            }
            return;
        }
        let output_started = std::time::Instant::now();
        let vocab = self.runner.config().vocab_size;
        // Taken out while sequences read the logits (put back for the next step's reuse).
        let out_rows = std::mem::take(&mut self.out.rows);
        let mut rows = out_rows.iter();
        for (((s, &i), wants), v) in scheduled.iter().zip(&index).zip(wants_logits).zip(verifying) {
            if v {
                let outcome = self.verify(i, s.n_new, &mut rows);
                match outcome {
                    Ok(Some(reason)) => ended.push((s.id, Ok(reason))),
                    Ok(None) => {}
                    Err(e) => ended.push((s.id, Err(format!("{e:#}")))),
                }
                continue;
            }
            let seq = &mut self.sched.running[i];
            let prompt_part = (seq.num_computed + s.n_new).min(seq.n_prompt).saturating_sub(seq.num_computed);
            self.metrics.prefill_tokens_computed.fetch_add(prompt_part as u64, Relaxed);
            seq.advance(s.n_new, &mut self.blocks, self.block_size);
            if !wants {
                continue;
            }
            let outcome = match rows.next() {
                Some(&Row::Logits(r)) => {
                    let logits = &mut self.out.logits[r * vocab..(r + 1) * vocab];
                    seq.on_logits(logits, self.tokenizer.as_deref(), &self.metrics)
                }
                Some(&Row::Token(t)) => seq.on_token(t, None, self.tokenizer.as_deref(), &self.metrics),
                None => Err(anyhow::anyhow!("the runner returned fewer rows than asked for")),
            };
            match outcome {
                Ok(Some(reason)) => ended.push((s.id, Ok(reason))),
                Ok(None) => {}
                Err(e) => ended.push((s.id, Err(format!("{e:#}")))),
            }
        }
        self.out.rows = out_rows;
        for (id, outcome) in ended {
            match outcome {
                Ok(reason) => self.end(id, reason),
                Err(message) => self.fail(id, message),
            }
        }
        self.update_gauges();
        let output_micros = stream_micros + output_started.elapsed().as_micros() as u64;
        self.metrics.output_micros.fetch_add(output_micros, Relaxed);
    }

    /// Streams every sequence's unsent tokens; returns those whose detokenizer failed.
    fn stream_unsent(&mut self) -> Vec<(u64, String)> {
        let tok = self.tokenizer.as_deref();
        let mut failed = Vec::new();
        for seq in self.sched.running.iter_mut().chain(self.sched.waiting.iter_mut()) {
            if seq.has_unsent() {
                if let Err(e) = seq.stream(tok) {
                    failed.push((seq.id, format!("{e:#}")));
                }
            }
        }
        failed
    }

    /// Checks running sequence `i`'s proposal against its `n` rows (the last token and each
    /// proposed token: logits, or the device's argmax for a plain greedy sequence), keeps what
    /// the rule accepts, and rolls the rest back: the rejected positions' blocks go back to the
    /// pool and the drafter forgets what no longer matches.
    fn verify(&mut self, i: usize, n: usize, rows: &mut std::slice::Iter<'_, Row>) -> Result<Option<FinishReason>> {
        let vocab = self.runner.config().vocab_size;
        let taken: Vec<Row> = rows.by_ref().take(n).copied().collect();
        if taken.len() < n {
            bail!("the runner returned fewer rows than a verification needs");
        }
        let seq = &mut self.sched.running[i];
        let proposed = seq.proposal.tokens.clone();
        let tok = self.tokenizer.as_deref();
        let (accepted, reason) = match taken[0] {
            Row::Logits(first) => {
                if taken.iter().enumerate().any(|(j, &r)| r != Row::Logits(first + j)) {
                    bail!("the runner's logits rows of a verification are not consecutive");
                }
                let logits = &mut self.out.logits[first * vocab..(first + n) * vocab];
                seq.on_verify(logits, vocab, tok, &self.metrics)?
            }
            Row::Token(_) => {
                let argmax: Option<Vec<u32>> =
                    taken.iter().map(|&r| if let Row::Token(t) = r { Some(t) } else { None }).collect();
                let Some(argmax) = argmax else {
                    bail!("the runner returned logits and tokens mixed in one verification");
                };
                seq.on_verify_greedy(&argmax, tok, &self.metrics)?
            }
        };
        let m = &self.metrics;
        m.spec_verifications.fetch_add(1, Relaxed);
        m.spec_proposed_tokens.fetch_add(proposed.len() as u64, Relaxed);
        m.spec_accepted_tokens.fetch_add(accepted as u64, Relaxed);
        if reason.is_some() {
            return Ok(reason);
        }
        // The last token and the accepted proposals are computed; the rejected ones' K/V is
        // garbage past num_computed that the next step overwrites.
        seq.advance(1 + accepted, &mut self.blocks, self.block_size);
        seq.release_unneeded_blocks(&mut self.blocks, self.block_size);
        if let Some(state) = &mut seq.spec {
            state.update(proposed.len(), accepted);
        }
        if let Some(d) = &mut self.drafter {
            d.rollback(seq.id, &seq.tokens, &proposed, accepted);
        }
        Ok(None)
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.running.store(self.sched.running.len() as u64, Relaxed);
        m.waiting.store(self.sched.waiting.len() as u64, Relaxed);
        m.kv_blocks_used.store(self.blocks.n_used() as u64, Relaxed);
    }
}
