//! A draft model that proposes tokens for speculative decoding: a smaller model with the
//! target's vocabulary, or the target's own first layers (early exit). A draft model keeps its
//! own KV cache per sequence (contiguous, sized to the request); early exit reads its layers'
//! K/V from the target's pool (`shared_kv`). The proposals of every speculating sequence of a
//! step run together: one batched pass over each sequence's tokens the drafter has not seen
//! that proposes its first token, then one pass per further token.

use super::shared_kv::{start_tail, SharedKv, SharedSeq};
use super::Proposal;
use crate::engine::paged_kv::PagedKv;
use crate::model::decoder::{Decoder, LogitsFor, SeqChunk};
use crate::model::kv_cache::{KvCache, KvDtype, KvRows, KvStore};
use crate::model::weights::ModelWeights;
use crate::sampling::{Sampler, SamplingParams};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;

pub(crate) struct Drafter {
    decoder: Decoder,
    /// Early exit: the target's pool holds the K/V of this model's layers.
    reads_target_kv: bool,
    seqs: HashMap<u64, DraftSeq>,
    logits: Vec<f32>,
}

/// One sequence's draft state.
struct DraftSeq {
    kv: DraftKv,
    /// Draws proposals when the target samples (temperature, top-k/top-p as the target's
    /// request; penalties left out: any q is exact as long as it is the one drawn from).
    sampler: Sampler,
}

enum DraftKv {
    /// A draft model's cache and the positions of the sequence whose K/V it holds.
    Own { cache: KvCache, computed: usize },
    /// Early exit: the positions past the target's (rebuilt every step).
    Tail(PagedKv),
}

/// What the engine asks of the drafter for one sequence in a step.
pub(crate) struct DraftRequest<'a> {
    pub id: u64,
    /// The sequence so far (its last token not yet run by the target).
    pub tokens: &'a [u32],
    /// The sequence's block table in the target's pool, and the positions whose K/V the
    /// target has computed there.
    pub table: &'a [u32],
    pub computed: usize,
    /// Tokens to propose.
    pub k: usize,
    /// The positions the sequence may reach (prompt + max_tokens + proposals).
    pub capacity: usize,
    pub sampling: &'a SamplingParams,
    pub out: &'a mut Proposal,
}

impl Drafter {
    /// A drafter on a draft model's weights, with caches of its own; its LM head keeps the
    /// first `head_rows` tokens where given.
    pub(crate) fn new(mut weights: ModelWeights, head_rows: Option<usize>, n_threads: usize) -> Result<Self> {
        if let Some(n) = head_rows.filter(|&n| n < weights.lm_head().rows) {
            weights.lm_head = Some(weights.lm_head().first_rows(n)?);
        }
        Ok(Drafter {
            decoder: Decoder::new(weights, n_threads)?,
            reads_target_kv: false,
            seqs: HashMap::new(),
            logits: Vec::new(),
        })
    }

    /// The target's first `layers` layers with its final norm and LM head (shared weights),
    /// reading their K/V from the target's pool.
    pub(crate) fn early_exit(
        target: &ModelWeights,
        layers: usize,
        head_rows: Option<usize>,
        n_threads: usize,
    ) -> Result<Self> {
        let mut w = target.clone();
        w.layers.truncate(layers);
        w.config.n_layers = layers;
        Ok(Drafter { reads_target_kv: true, ..Drafter::new(w, head_rows, n_threads)? })
    }

    /// Forgets a sequence (finished, cancelled or preempted).
    pub(crate) fn remove(&mut self, id: u64) {
        self.seqs.remove(&id);
    }

    /// Proposes `k` tokens for every request (fewer where the capacity ends). `pool` is the
    /// target's K/V pool (needed for early exit).
    pub(crate) fn propose(&mut self, reqs: &mut [DraftRequest], pool: Option<&PagedKv>) -> Result<()> {
        let c = self.decoder.config().clone();
        // Logits per row: the head's tokens.
        let vocab = self.decoder.weights.lm_head().rows;
        let pool = match (self.reads_target_kv, pool) {
            (true, None) => {
                bail!("early-exit drafting reads the target's K/V cache, which this device keeps off the host")
            }
            (true, pool) => pool,
            (false, _) => None,
        };
        // A sequence's tokens the drafter has not run: from there on it writes K/V.
        let mut next: Vec<usize> = Vec::with_capacity(reqs.len());
        for r in reqs.iter_mut() {
            r.out.clear();
            // Tail blocks from the target's last partial block to the last proposing position.
            let tail_blocks = pool.map_or(0, |p| {
                (r.computed % p.block_size() + r.tokens.len() - r.computed + r.k).div_ceil(p.block_size())
            });
            let stale = self.seqs.get(&r.id).is_some_and(|s| match &s.kv {
                DraftKv::Own { cache, computed } => cache.capacity() < r.capacity || *computed > r.tokens.len(),
                DraftKv::Tail(tail) => tail.n_blocks() < tail_blocks,
            });
            if stale {
                self.seqs.remove(&r.id);
            }
            if let std::collections::hash_map::Entry::Vacant(e) = self.seqs.entry(r.id) {
                let kv = match pool {
                    Some(p) => DraftKv::Tail(PagedKv::new(&c, p.block_size(), tail_blocks, p.dtype())?),
                    None => DraftKv::Own {
                        cache: KvCache::new(c.n_layers, c.n_kv_heads, c.head_dim, r.capacity, KvDtype::F32),
                        computed: 0,
                    },
                };
                let params = SamplingParams {
                    repetition_penalty: 1.0,
                    presence_penalty: 0.0,
                    frequency_penalty: 0.0,
                    seed: Some(r.sampling.seed.unwrap_or(0) ^ 0x5eed_d4af7),
                    ..r.sampling.clone()
                };
                let sampler = Sampler::new(params, &[], vocab)?;
                e.insert(DraftSeq { kv, sampler });
            }
            let s = self.seqs.get_mut(&r.id).expect("inserted");
            next.push(match &mut s.kv {
                DraftKv::Own { computed, .. } => *computed,
                DraftKv::Tail(tail) => {
                    let pool = pool.expect("a tail reads the target's pool");
                    start_tail(pool, r.table, r.computed, tail, c.n_layers);
                    r.computed
                }
            });
        }
        // Each request's next input: the tokens its K/V lacks, then its own proposals.
        let mut inputs: Vec<Vec<u32>> = reqs.iter().zip(&next).map(|(r, &n)| r.tokens[n..].to_vec()).collect();
        let max_k = reqs.iter().map(|r| r.k).max().unwrap_or(0);
        for step in 0..max_k {
            let active: Vec<usize> = (0..reqs.len())
                .filter(|&i| step < reqs[i].k && !inputs[i].is_empty() && next[i] + inputs[i].len() <= reqs[i].capacity)
                .collect();
            if active.is_empty() {
                break;
            }
            let chunks: Vec<SeqChunk> = active
                .iter()
                .enumerate()
                .map(|(j, &i)| SeqChunk { seq: j, tokens: &inputs[i], pos0: next[i], logits: Some(LogitsFor::Last) })
                .collect();
            {
                // Disjoint entries of the map, in `active` order.
                let mut by_id: HashMap<u64, &mut DraftSeq> = self.seqs.iter_mut().map(|(id, s)| (*id, s)).collect();
                let mut kvs: Vec<&mut DraftKv> = Vec::with_capacity(active.len());
                for &i in &active {
                    kvs.push(&mut by_id.remove(&reqs[i].id).context("draft sequence vanished")?.kv);
                }
                match pool {
                    Some(pool) => {
                        let mut seqs = Vec::with_capacity(kvs.len());
                        for (kv, &i) in kvs.into_iter().zip(&active) {
                            let DraftKv::Tail(tail) = kv else { bail!("a draft cache where a tail belongs") };
                            let r = &reqs[i];
                            seqs.push(SharedSeq {
                                table: r.table,
                                first_tail_block: r.computed / pool.block_size(),
                                tail,
                            });
                        }
                        self.decoder.forward_batch(&chunks, &mut SharedKv { pool, seqs }, &mut self.logits)?;
                    }
                    None => {
                        let mut caches = Vec::with_capacity(kvs.len());
                        for kv in kvs {
                            let DraftKv::Own { cache, .. } = kv else { bail!("a tail where a draft cache belongs") };
                            caches.push(cache);
                        }
                        self.decoder.forward_batch(&chunks, &mut Caches(caches), &mut self.logits)?;
                    }
                }
            }
            drop(chunks);
            for (j, &i) in active.iter().enumerate() {
                let r = &mut reqs[i];
                let s = self.seqs.get_mut(&r.id).expect("active");
                next[i] += inputs[i].len();
                if let DraftKv::Own { computed, .. } = &mut s.kv {
                    *computed = next[i];
                }
                let row = &mut self.logits[j * vocab..(j + 1) * vocab];
                let token = if r.sampling.is_greedy() {
                    r.out.q.push(None);
                    crate::sampling::argmax(row)
                } else {
                    let u = s.sampler.uniform();
                    let dist = s.sampler.distribution(row);
                    let t = crate::sampling::draw(dist, u);
                    r.out.q.push(Some(dist.to_vec()));
                    t
                };
                r.out.tokens.push(token);
                inputs[i] = vec![token];
            }
        }
        Ok(())
    }

    /// After verification: the sequence is `tokens` now; a draft model's cached positions past
    /// what still agrees with it are dropped (they are recomputed on the next proposal).
    pub(crate) fn rollback(&mut self, id: u64, tokens: &[u32], proposed: &[u32], accepted: usize) {
        let Some(DraftSeq { kv: DraftKv::Own { cache, computed }, .. }) = self.seqs.get_mut(&id) else { return };
        // The cache ran the proposals but the last; the first `accepted` of them are now part of
        // the sequence, which continues with a token the cache has not seen.
        let before = tokens.len() - accepted - 1; // length of the sequence before this step's tokens
        let keep = (before + accepted).min(before + proposed.len().saturating_sub(1));
        *computed = (*computed).min(keep);
        cache.truncate(*computed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::paged_kv::PagedView;
    use crate::kernels::DType;
    use crate::model::config::ModelConfig;

    /// Early exit reading the target's K/V proposes what the same layers with a cache of their
    /// own propose, over several rounds of acceptance and rejection and across block edges.
    #[test]
    fn early_exit_on_the_targets_cache_proposes_as_a_cache_of_its_own() {
        let cfg = ModelConfig::from_hf_json(
            r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":256,
            "max_position_embeddings":256,"rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":true}"#,
        )
        .unwrap();
        let target = crate::model::dummy::load(cfg.clone(), DType::F32, 7).unwrap();
        let layers = 2;
        let mut own_weights = target.clone();
        own_weights.layers.truncate(layers);
        own_weights.config.n_layers = layers;
        let mut shared = Drafter::early_exit(&target, layers, None, 1).unwrap();
        let mut own = Drafter::new(own_weights, None, 1).unwrap();
        let mut decoder = Decoder::new(target, 1).unwrap();
        let mut pool = PagedKv::new(&cfg, 16, 8, KvDtype::F32).unwrap();
        let table: Vec<u32> = (0..8).rev().collect();
        let mut tokens: Vec<u32> = (0..21).map(|i| (i * 37 % 256) as u32).collect();
        let mut computed = 0;
        let greedy = SamplingParams::greedy();
        for round in 0..4 {
            // The target computes all but the last token, as before a decode step.
            let chunk = SeqChunk { seq: 0, tokens: &tokens[computed..tokens.len() - 1], pos0: computed, logits: None };
            let mut logits = Vec::new();
            decoder
                .forward_batch(&[chunk], &mut PagedView { kv: &mut pool, tables: vec![&table] }, &mut logits)
                .unwrap();
            computed = tokens.len() - 1;
            let (mut a, mut b) = (Proposal::default(), Proposal::default());
            for (drafter, out, pool) in [(&mut shared, &mut a, Some(&pool)), (&mut own, &mut b, None)] {
                let mut req = DraftRequest {
                    id: 1,
                    tokens: &tokens,
                    table: &table,
                    computed,
                    k: 5,
                    capacity: 128,
                    sampling: &greedy,
                    out,
                };
                drafter.propose(std::slice::from_mut(&mut req), pool).unwrap();
            }
            assert_eq!(a.tokens.len(), 5);
            assert_eq!(a.tokens, b.tokens, "round {round}");
            // (This random model mostly repeats its input, so its last logits are compared too.)
            let largest = own.logits.iter().fold(0f32, |m, x| m.max(x.abs()));
            let worst = shared.logits.iter().zip(&own.logits).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(worst <= 1e-5 * largest, "round {round}: logits differ by {worst} (largest {largest})");
            // Keep `round` proposals and one token of the target's own.
            let proposed = a.tokens.clone();
            tokens.extend_from_slice(&proposed[..round]);
            tokens.push((proposed[round] + 1) % 256);
            own.rollback(1, &tokens, &proposed, round);
            shared.rollback(1, &tokens, &proposed, round);
        }
    }
}
