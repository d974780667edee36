//! A draft model that proposes tokens for speculative decoding: a smaller model with the
//! target's vocabulary, or the target's own first layers (early exit). It keeps its own KV
//! cache per sequence (contiguous, sized to the request) and runs the proposals of every
//! speculating sequence of a step together: one batched pass that catches each sequence up
//! with its new tokens and proposes its first token, then one pass per further token.

use super::Proposal;
use crate::model::decoder::{Decoder, LogitsFor, SeqChunk};
use crate::model::kv_cache::{KvCache, KvDtype, KvRows, KvStore};
use crate::model::weights::ModelWeights;
use crate::sampling::{Sampler, SamplingParams};
use anyhow::{Context, Result};
use std::collections::HashMap;

pub(crate) struct Drafter {
    decoder: Decoder,
    seqs: HashMap<u64, DraftSeq>,
    logits: Vec<f32>,
}

/// One sequence's draft state.
struct DraftSeq {
    cache: KvCache,
    /// Positions of the sequence whose K/V the cache holds.
    computed: usize,
    /// Draws proposals when the target samples (temperature, top-k/top-p as the target's
    /// request; penalties left out: any q is exact as long as it is the one drawn from).
    sampler: Sampler,
}

/// What the engine asks of the drafter for one sequence in a step.
pub(crate) struct DraftRequest<'a> {
    pub id: u64,
    /// The sequence so far (its last token not yet run by the target).
    pub tokens: &'a [u32],
    /// Tokens to propose.
    pub k: usize,
    /// The positions the sequence may reach (prompt + max_tokens + proposals).
    pub capacity: usize,
    pub sampling: &'a SamplingParams,
    pub out: &'a mut Proposal,
}

impl Drafter {
    /// A drafter on `weights` (a draft model, or the target truncated to its first layers).
    pub(crate) fn new(weights: ModelWeights, n_threads: usize) -> Result<Self> {
        Ok(Drafter { decoder: Decoder::new(weights, n_threads)?, seqs: HashMap::new(), logits: Vec::new() })
    }

    /// The target's first `layers` layers with its final norm and LM head (shared weights).
    pub(crate) fn truncated(target: &ModelWeights, layers: usize) -> ModelWeights {
        let mut w = target.clone();
        w.layers.truncate(layers);
        w.config.n_layers = layers;
        w
    }

    /// Forgets a sequence (finished, cancelled or preempted).
    pub(crate) fn remove(&mut self, id: u64) {
        self.seqs.remove(&id);
    }

    /// Proposes `k` tokens for every request (fewer where the capacity ends).
    pub(crate) fn propose(&mut self, reqs: &mut [DraftRequest]) -> Result<()> {
        let c = self.decoder.config().clone();
        for r in reqs.iter_mut() {
            r.out.clear();
            let stale =
                self.seqs.get(&r.id).is_some_and(|s| s.cache.capacity() < r.capacity || s.computed > r.tokens.len());
            if stale {
                self.seqs.remove(&r.id);
            }
            if let std::collections::hash_map::Entry::Vacant(e) = self.seqs.entry(r.id) {
                let cache = KvCache::new(c.n_layers, c.n_kv_heads, c.head_dim, r.capacity, KvDtype::F32);
                let params = SamplingParams {
                    repetition_penalty: 1.0,
                    presence_penalty: 0.0,
                    frequency_penalty: 0.0,
                    seed: Some(r.sampling.seed.unwrap_or(0) ^ 0x5eed_d4af7),
                    ..r.sampling.clone()
                };
                let sampler = Sampler::new(params, &[], c.vocab_size)?;
                e.insert(DraftSeq { cache, computed: 0, sampler });
            }
        }
        // Each request's next input: the tokens its cache lacks, then its own proposals.
        let mut inputs: Vec<Vec<u32>> = reqs
            .iter()
            .map(|r| {
                let s = &self.seqs[&r.id];
                r.tokens[s.computed..].to_vec()
            })
            .collect();
        let max_k = reqs.iter().map(|r| r.k).max().unwrap_or(0);
        for step in 0..max_k {
            let active: Vec<usize> = (0..reqs.len())
                .filter(|&i| {
                    let r = &reqs[i];
                    let s = &self.seqs[&r.id];
                    step < r.k && !inputs[i].is_empty() && s.computed + inputs[i].len() <= r.capacity
                })
                .collect();
            if active.is_empty() {
                break;
            }
            let ids: Vec<u64> = active.iter().map(|&i| reqs[i].id).collect();
            let pos0: Vec<usize> = ids.iter().map(|id| self.seqs[id].computed).collect();
            let chunks: Vec<SeqChunk> = active
                .iter()
                .enumerate()
                .map(|(j, &i)| SeqChunk { seq: j, tokens: &inputs[i], pos0: pos0[j], logits: Some(LogitsFor::Last) })
                .collect();
            {
                let mut caches: Vec<&mut KvCache> = Vec::with_capacity(ids.len());
                // Disjoint entries of the map, in `ids` order.
                let mut by_id: HashMap<u64, &mut DraftSeq> = self.seqs.iter_mut().map(|(id, s)| (*id, s)).collect();
                for id in &ids {
                    caches.push(&mut by_id.remove(id).context("draft sequence vanished")?.cache);
                }
                let mut store = Caches(caches);
                self.decoder.forward_batch(&chunks, &mut store, &mut self.logits)?;
            }
            drop(chunks);
            for (j, &i) in active.iter().enumerate() {
                let r = &mut reqs[i];
                let s = self.seqs.get_mut(&r.id).expect("active");
                s.computed += inputs[i].len();
                let row = &mut self.logits[j * c.vocab_size..(j + 1) * c.vocab_size];
                let token = if r.sampling.is_greedy() {
                    crate::sampling::argmax(row)
                } else {
                    let u = s.sampler.uniform();
                    let dist = s.sampler.distribution(row);
                    let t = crate::sampling::draw(dist, u);
                    r.out.q.push(Some(dist.to_vec()));
                    t
                };
                if r.sampling.is_greedy() {
                    r.out.q.push(None);
                }
                r.out.tokens.push(token);
                inputs[i] = vec![token];
            }
        }
        Ok(())
    }

    /// After verification: the sequence is `tokens` now; cached positions past what still
    /// agrees with it are dropped (they are recomputed on the next proposal).
    pub(crate) fn rollback(&mut self, id: u64, tokens: &[u32], proposed: &[u32], accepted: usize) {
        let Some(s) = self.seqs.get_mut(&id) else { return };
        // The cache ran the proposals but the last; the first `accepted` of them are now part of
        // the sequence, which continues with a token the cache has not seen.
        let before = tokens.len() - accepted - 1; // length of the sequence before this step's tokens
        let keep = (before + accepted).min(before + proposed.len().saturating_sub(1));
        s.computed = s.computed.min(keep);
        s.cache.truncate(s.computed);
    }
}

/// Per-sequence contiguous caches seen as one store (sequence j of the batch is cache j): one
/// block as long as any cache, so position p is row p of its sequence's cache.
struct Caches<'a>(Vec<&'a mut KvCache>);

/// Larger than any context.
const ONE_BLOCK: usize = 1 << 40;

impl KvStore for Caches<'_> {
    fn block_size(&self) -> usize {
        ONE_BLOCK
    }

    fn kv_block(&self, layer: usize, seq: usize, block: usize) -> (KvRows<'_>, KvRows<'_>) {
        debug_assert_eq!(block, 0);
        self.0[seq].kv_block(layer, 0, 0)
    }

    fn write(&mut self, layer: usize, seq: usize, pos: usize, k: &[f32], v: &[f32]) {
        self.0[seq].write(layer, 0, pos, k, v);
    }
}
