//! Iteration-level scheduling (continuous batching). Each step picks, within a token budget,
//! one token for every decoding sequence, then chunks of the prompts being prefilled, then
//! admits waiting requests (a long prompt is split over several steps and runs beside other
//! sequences' decodes). A decoding sequence with proposed tokens (speculative decoding) runs
//! them in its chunk too, as many as the budget and the free blocks allow. When KV blocks run out, the newest running sequence is preempted: its
//! blocks are freed and it waits to be recomputed (its tokens so far become its prompt).

use super::block_manager::BlockManager;
use super::metrics::Metrics;
use super::sequence::Sequence;
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;

/// `n_new` tokens of sequence `id` run in this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scheduled {
    pub id: u64,
    pub n_new: usize,
}

pub(crate) struct Scheduler {
    pub waiting: VecDeque<Sequence>,
    /// In admission order: the last is the newest (first to be preempted).
    pub running: Vec<Sequence>,
    max_num_seqs: usize,
    max_batched_tokens: usize,
    block_size: usize,
}

impl Scheduler {
    pub(crate) fn new(max_num_seqs: usize, max_batched_tokens: usize, block_size: usize) -> Self {
        Scheduler { waiting: VecDeque::new(), running: Vec::new(), max_num_seqs, max_batched_tokens, block_size }
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Decides this step's batch and reserves its KV blocks.
    pub(crate) fn schedule(&mut self, blocks: &mut BlockManager, metrics: &Metrics) -> Vec<Scheduled> {
        let bs = self.block_size;
        let mut out: Vec<Scheduled> = Vec::new();
        let mut budget = self.max_batched_tokens;
        let mut preempted = false;
        // Decodes first (one token each, latency-critical), then prefills, oldest first.
        let mut order: Vec<(bool, u64)> = self.running.iter().map(|s| (s.remaining() > 1, s.id)).collect();
        order.sort_by_key(|&(prefill, _)| prefill);
        for (_, id) in order {
            if budget == 0 {
                break;
            }
            let Some(i) = self.running.iter().position(|s| s.id == id) else {
                continue; // preempted earlier in this step
            };
            // A decode with proposed tokens verifies them in the same chunk (as many as fit).
            let seq = &mut self.running[i];
            let spare = budget.saturating_sub(seq.remaining());
            seq.proposal.truncate(if seq.remaining() == 1 { spare } else { 0 });
            let mut n_new = (seq.remaining() + seq.proposal.tokens.len()).min(budget);
            loop {
                let seq = &mut self.running[i];
                let upto = seq.num_computed + n_new;
                if seq.reserve(blocks, bs, upto) {
                    out.push(Scheduled { id, n_new });
                    budget -= n_new;
                    break;
                }
                // Out of blocks: give up the proposal before preempting anyone.
                if !seq.proposal.tokens.is_empty() {
                    seq.proposal.clear();
                    n_new = seq.remaining().min(budget);
                    continue;
                }
                let mut victim = self.running.pop().expect("sequence i is running");
                preempted = true;
                metrics.preemptions.fetch_add(1, Relaxed);
                if let Some(k) = out.iter().position(|s| s.id == victim.id) {
                    budget += out.remove(k).n_new;
                }
                victim.free_blocks(blocks);
                victim.proposal.clear();
                let was_self = victim.id == id;
                self.waiting.push_front(victim);
                if was_self {
                    break;
                }
            }
        }
        // Admitting while preempting would only thrash.
        if !preempted {
            while budget > 0 && self.running.len() < self.max_num_seqs {
                let Some(seq) = self.waiting.front_mut() else { break };
                let hit = seq.acquire_prefix(blocks, bs);
                let n_new = seq.remaining().min(budget);
                if !seq.reserve(blocks, bs, seq.num_computed + n_new) {
                    seq.free_blocks(blocks);
                    break;
                }
                if !seq.admitted {
                    seq.admitted = true;
                    seq.cached_tokens = hit.min(seq.n_prompt);
                    metrics.prompt_tokens.fetch_add(seq.n_prompt as u64, Relaxed);
                    metrics.prefix_cache_queries.fetch_add(seq.n_prompt as u64, Relaxed);
                    metrics.prefix_cache_hits.fetch_add(seq.cached_tokens as u64, Relaxed);
                }
                out.push(Scheduled { id: seq.id, n_new });
                budget -= n_new;
                let seq = self.waiting.pop_front().expect("front exists");
                self.running.push(seq);
            }
        }
        out
    }

    /// Removes a sequence wherever it is.
    pub(crate) fn take(&mut self, id: u64) -> Option<Sequence> {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            return Some(self.running.remove(i));
        }
        let i = self.waiting.iter().position(|s| s.id == id)?;
        self.waiting.remove(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::GenerateRequest;
    use crate::sampling::SamplingParams;

    fn seq(id: u64, prompt_len: usize) -> Sequence {
        let req = GenerateRequest::new(
            (0..prompt_len as u32).map(|t| t + 100 * id as u32).collect(),
            8,
            SamplingParams::greedy(),
        );
        Sequence::new(id, req, 1000, tokio::sync::mpsc::unbounded_channel().0).unwrap()
    }

    /// Runs the scheduled work as the engine would (a sampled token when a chunk reaches the end).
    fn run(s: &mut Scheduler, blocks: &mut BlockManager, batch: &[Scheduled]) {
        for b in batch {
            let seq = s.running.iter_mut().find(|q| q.id == b.id).unwrap();
            seq.advance(b.n_new, blocks, 4);
            if seq.remaining() == 0 {
                seq.tokens.push(7);
            }
        }
    }

    #[test]
    fn long_prompts_are_chunked_beside_decodes() {
        let metrics = Metrics::default();
        let mut blocks = BlockManager::new(64, true);
        let mut s = Scheduler::new(8, 32, 4);
        s.waiting.push_back(seq(1, 10));
        s.waiting.push_back(seq(2, 100));
        let step1 = s.schedule(&mut blocks, &metrics);
        assert_eq!(step1, [Scheduled { id: 1, n_new: 10 }, Scheduled { id: 2, n_new: 22 }]);
        run(&mut s, &mut blocks, &step1);
        // Sequence 1 decodes (first), sequence 2 continues its prompt with the rest of the budget.
        let step2 = s.schedule(&mut blocks, &metrics);
        assert_eq!(step2, [Scheduled { id: 1, n_new: 1 }, Scheduled { id: 2, n_new: 31 }]);
    }

    #[test]
    fn the_newest_sequence_is_preempted_when_blocks_run_out() {
        let metrics = Metrics::default();
        // 6 blocks of 4 positions: two 12-token prompts fill them.
        let mut blocks = BlockManager::new(6, false);
        let mut s = Scheduler::new(8, 64, 4);
        s.waiting.push_back(seq(1, 12));
        s.waiting.push_back(seq(2, 12));
        let step1 = s.schedule(&mut blocks, &metrics);
        assert_eq!(step1.len(), 2);
        run(&mut s, &mut blocks, &step1);
        // Both need a 4th block for their 13th position: the newer one (2) yields.
        let step2 = s.schedule(&mut blocks, &metrics);
        assert_eq!(step2, [Scheduled { id: 1, n_new: 1 }]);
        assert_eq!(metrics.preemptions.load(Relaxed), 1);
        assert_eq!(s.waiting.front().map(|q| (q.id, q.num_computed, q.tokens.len())), Some((2, 0, 13)));
        assert!(s.waiting.front().unwrap().table.is_empty(), "its blocks were freed");
    }
}
