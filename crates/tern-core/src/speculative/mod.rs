//! Speculative decoding: something cheap proposes the next few tokens of a sequence, the target
//! model scores them all in one pass (they are just more tokens of that sequence in the step's
//! batch), and an acceptance rule keeps a prefix of them, so one target pass can yield several
//! tokens. The rule (`verify`) is exact: greedy output equals plain greedy decoding, sampled
//! output has the target's distribution.
//!
//! Proposers: `ngram` (prompt lookup, no model), `draft` (a smaller model with the same
//! tokenizer, its own KV cache) and `early-exit` (the target's own first layers, final norm and
//! LM head: self-speculation, reading those layers' K/V from the target's cache), the last two
//! through `Drafter`.

pub(crate) mod drafter;
pub mod ngram;
mod shared_kv;
pub mod verify;

use crate::model::config::ModelConfig;
use crate::model::weights::ModelWeights;
use anyhow::{bail, Result};

/// Where proposals come from.
#[derive(Clone)]
pub enum Proposer {
    /// Prompt lookup: the tokens that followed the latest earlier occurrence of the last n
    /// tokens (n from `max_n` down to `min_n`), at most `per_match` · n of them (0: no cap).
    Ngram { min_n: usize, max_n: usize, per_match: usize },
    /// A smaller model (its weights; same vocabulary as the target).
    Draft(Box<ModelWeights>),
    /// The target's first `layers` layers with its final norm and LM head.
    EarlyExit { layers: usize },
}

impl std::fmt::Debug for Proposer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proposer::Ngram { min_n, max_n, per_match: 0 } => write!(f, "ngram (n {min_n}..={max_n})"),
            Proposer::Ngram { min_n, max_n, per_match } => {
                write!(f, "ngram (n {min_n}..={max_n}, {per_match} tokens per matched token)")
            }
            Proposer::Draft(w) => write!(f, "draft model ({} layers, hidden {})", w.config.n_layers, w.config.hidden),
            Proposer::EarlyExit { layers } => write!(f, "early exit after {layers} layers"),
        }
    }
}

impl Proposer {
    pub fn name(&self) -> &'static str {
        match self {
            Proposer::Ngram { .. } => "ngram",
            Proposer::Draft(_) => "draft",
            Proposer::EarlyExit { .. } => "early-exit",
        }
    }
}

/// Server-wide speculation settings.
#[derive(Clone, Debug)]
pub struct SpeculativeConfig {
    pub proposer: Proposer,
    /// Most tokens proposed per sequence and step.
    pub num_tokens: usize,
    /// Vary each sequence's number of proposed tokens with its acceptance (up after a fully
    /// accepted proposal, down after a rejection).
    pub adaptive: bool,
    /// A drafter's LM head keeps only the first this many tokens of the vocabulary (None, or
    /// the vocabulary's size or more: all).
    /// Byte-level BPE numbers tokens in merge order, roughly by frequency, so the first ones are
    /// most of what text uses; the output stays exact (the target supplies any other token,
    /// end-of-text among them), only acceptance can drop.
    pub draft_vocab: Option<usize>,
}

impl SpeculativeConfig {
    /// Checks the settings against the target model's shape.
    pub fn check(&self, target: &ModelConfig) -> Result<()> {
        if self.num_tokens == 0 || self.num_tokens > 32 {
            bail!("--num-speculative-tokens must be in 1..=32, got {}", self.num_tokens);
        }
        match &self.proposer {
            Proposer::Ngram { min_n, max_n, .. } => {
                if *min_n == 0 || min_n > max_n {
                    bail!("n-gram sizes must satisfy 1 <= min <= max, got {min_n}..={max_n}");
                }
            }
            Proposer::Draft(d) => {
                if d.config.vocab_size != target.vocab_size {
                    bail!(
                        "the draft model's vocabulary ({} tokens) differs from the target's ({}): it needs the same tokenizer",
                        d.config.vocab_size,
                        target.vocab_size
                    );
                }
            }
            Proposer::EarlyExit { layers } => {
                if *layers == 0 || *layers >= target.n_layers {
                    bail!(
                        "--early-exit-layers must be in 1..{} (the model has {} layers), got {layers}",
                        target.n_layers,
                        target.n_layers
                    );
                }
            }
        }
        if let Some(n) = self.draft_vocab {
            if matches!(self.proposer, Proposer::Ngram { .. }) {
                bail!("--draft-vocab needs a drafting model (--speculative draft or early-exit)");
            }
            if n == 0 {
                bail!("--draft-vocab must be at least 1");
            }
        }
        Ok(())
    }
}

/// A sequence's proposal for one step: tokens and, for sampled drafts, the distribution each
/// was drawn from (None: proposed deterministically, a point mass).
#[derive(Debug, Default, Clone)]
pub(crate) struct Proposal {
    pub tokens: Vec<u32>,
    pub q: Vec<Option<Vec<(u32, f64)>>>,
}

impl Proposal {
    pub(crate) fn clear(&mut self) {
        self.truncate(0);
    }

    pub(crate) fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
        self.q.truncate(n);
    }
}

/// Per-sequence state of speculation: how many tokens to propose next.
#[derive(Debug, Clone)]
pub(crate) struct SpecState {
    pub k: usize,
    pub max_k: usize,
    pub adaptive: bool,
}

impl SpecState {
    pub(crate) fn new(max_k: usize, adaptive: bool) -> Self {
        SpecState { k: max_k, max_k, adaptive }
    }

    /// After a verification of `proposed` tokens of which `accepted` were kept.
    pub(crate) fn update(&mut self, proposed: usize, accepted: usize) {
        if !self.adaptive || proposed == 0 {
            return;
        }
        // As transformers' assisted generation: +2 after a full acceptance, −1 otherwise.
        self.k = if accepted == proposed { (self.k + 2).min(self.max_k) } else { self.k.saturating_sub(1).max(1) };
    }
}
