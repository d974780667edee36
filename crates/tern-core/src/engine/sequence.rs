//! One request inside the engine: its tokens, how far its KV is computed, its block table,
//! and the per-request output state (sampler, stop strings, streaming detokenizer, events).

use super::block_manager::{block_hash, BlockManager};
use super::metrics::Metrics;
use super::{Event, Finished};
use crate::generation::{FinishReason, GenerateRequest};
use crate::sampling::{logprobs, Sampler, TokenLogprob};
use crate::speculative::{verify, Proposal, SpecState};
use crate::stop::StopChecker;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use anyhow::Result;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

pub(crate) struct Sequence {
    pub id: u64,
    /// Prompt, then generated tokens.
    pub tokens: Vec<u32>,
    pub n_prompt: usize,
    /// Positions whose K/V are in the cache.
    pub num_computed: usize,
    pub table: Vec<u32>,
    /// Chained hashes of the first full blocks of `table` (those shared or registered).
    pub hashes: Vec<u64>,
    /// Prompt tokens taken from the prefix cache at the first admission.
    pub cached_tokens: usize,
    pub admitted: bool,
    /// Speculative decoding for this sequence (None: off).
    pub spec: Option<SpecState>,
    /// This step's proposed tokens (empty: a plain decode step).
    pub proposal: Proposal,
    /// The tokens a verification step runs: the uncomputed last token, then the proposal.
    pub verify_tokens: Vec<u32>,
    /// Tokens chosen but not yet streamed (detokenized, checked against stop strings, sent).
    /// Without stop strings streaming cannot end the sequence, so the engine streams while the
    /// device runs the next step.
    unsent: Vec<(u32, Option<TokenLogprob>)>,
    req: GenerateRequest,
    sampler: Sampler,
    stops: StopChecker,
    detok: StreamDecoder,
    events: UnboundedSender<Event>,
    submitted: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

impl Sequence {
    pub(crate) fn new(id: u64, mut req: GenerateRequest, vocab: usize, events: UnboundedSender<Event>) -> Result<Self> {
        let tokens = std::mem::take(&mut req.prompt_ids);
        let sampler = Sampler::new(req.sampling.clone(), &tokens, vocab)?;
        Ok(Sequence {
            id,
            n_prompt: tokens.len(),
            tokens,
            num_computed: 0,
            table: Vec::new(),
            hashes: Vec::new(),
            cached_tokens: 0,
            admitted: false,
            spec: None,
            proposal: Proposal::default(),
            verify_tokens: Vec::new(),
            unsent: Vec::new(),
            stops: StopChecker::new(&req.stop),
            req,
            sampler,
            detok: StreamDecoder::new(true),
            events,
            submitted: Instant::now(),
            first_token: None,
            last_token: None,
        })
    }

    pub(crate) fn n_output(&self) -> usize {
        self.tokens.len() - self.n_prompt
    }

    /// Tokens not yet run through the model.
    pub(crate) fn remaining(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Takes the longest cached prefix of full blocks, leaving at least one token to compute
    /// (its logits give the next token). Returns the number of tokens found.
    pub(crate) fn acquire_prefix(&mut self, blocks: &mut BlockManager, bs: usize) -> usize {
        debug_assert!(self.table.is_empty() && self.num_computed == 0);
        for j in 0..(self.tokens.len() - 1) / bs {
            let toks = &self.tokens[j * bs..(j + 1) * bs];
            let parent = self.hashes.last().copied();
            let h = block_hash(parent, toks);
            match blocks.acquire_cached(h, parent, toks) {
                Some(b) => {
                    self.table.push(b);
                    self.hashes.push(h);
                }
                None => break,
            }
        }
        self.num_computed = self.table.len() * bs;
        self.num_computed
    }

    /// Allocates blocks so that `upto` positions fit; all or nothing.
    pub(crate) fn reserve(&mut self, blocks: &mut BlockManager, bs: usize, upto: usize) -> bool {
        let need = upto.div_ceil(bs).saturating_sub(self.table.len());
        if need > blocks.n_available() {
            return false;
        }
        for _ in 0..need {
            self.table.push(blocks.allocate().expect("counted available blocks"));
        }
        true
    }

    /// Marks `n` more positions computed and offers newly full blocks to the prefix cache.
    pub(crate) fn advance(&mut self, n: usize, blocks: &mut BlockManager, bs: usize) {
        self.num_computed += n;
        while self.hashes.len() < self.num_computed / bs {
            let j = self.hashes.len();
            let toks = &self.tokens[j * bs..(j + 1) * bs];
            let parent = self.hashes.last().copied();
            let h = block_hash(parent, toks);
            blocks.register(self.table[j], h, parent, toks);
            self.hashes.push(h);
        }
    }

    /// Gives back the blocks past those holding the computed positions (after a verification
    /// rejected proposed tokens: their K/V is dropped).
    pub(crate) fn release_unneeded_blocks(&mut self, blocks: &mut BlockManager, bs: usize) {
        let keep = self.num_computed.div_ceil(bs).max(self.hashes.len());
        while self.table.len() > keep {
            blocks.release(self.table.pop().expect("longer than keep"));
        }
    }

    /// The request's generation settings.
    pub(crate) fn request(&self) -> &GenerateRequest {
        &self.req
    }

    /// Gives back every block and forgets the computed KV (preemption: recomputed later).
    pub(crate) fn free_blocks(&mut self, blocks: &mut BlockManager) {
        blocks.release_all(&mut self.table);
        self.hashes.clear();
        self.num_computed = 0;
    }

    /// Whether the next token needs the full logits (sampling, penalties, logprobs); if not,
    /// the argmax alone decides it, and a device may pick it without sending logits back.
    pub(crate) fn needs_logits(&self) -> bool {
        self.req.logprobs.is_some() || !self.sampler.is_plain_greedy()
    }

    /// Samples the next token from this sequence's logits and streams it. Returns why the
    /// sequence ends, if it does.
    pub(crate) fn on_logits(
        &mut self,
        logits: &mut [f32],
        tok: Option<&Tokenizer>,
        metrics: &Metrics,
    ) -> Result<Option<FinishReason>> {
        // Logprobs are of the raw model distribution, before penalties and temperature.
        let raw = self.req.logprobs.map(|n| (logits.to_vec(), n));
        let token = self.sampler.sample(logits);
        let logprob = raw.map(|(raw, n)| logprobs(&raw, token, n));
        self.on_token(token, logprob, tok, metrics)
    }

    /// Verifies this step's proposal with the target's logits at its k + 1 positions (`rows`,
    /// `vocab` each: after the last token, then after each proposed token): keeps the accepted
    /// prefix and one more token (the replacement of the first rejected one, or a bonus after a
    /// full acceptance), streaming each. Returns the number accepted and why the sequence ends.
    pub(crate) fn on_verify(
        &mut self,
        rows: &mut [f32],
        vocab: usize,
        tok: Option<&Tokenizer>,
        metrics: &Metrics,
    ) -> Result<(usize, Option<FinishReason>)> {
        debug_assert_eq!(rows.len(), (self.proposal.tokens.len() + 1) * vocab);
        let mut rows = rows.chunks_exact_mut(vocab);
        self.emit_verified(tok, metrics, |seq, proposal, i| {
            let row = rows.next().expect("a row per position");
            let raw = seq.req.logprobs.map(|n| (row.to_vec(), n));
            // Drawn before the distribution so the generator's use does not depend on outcomes.
            let (u_accept, u_draw) = if seq.sampler.params().is_greedy() {
                (0.0, 0.0)
            } else {
                (seq.sampler.uniform(), seq.sampler.uniform())
            };
            let p = seq.sampler.distribution(row);
            let (token, kept) = match proposal.tokens.get(i) {
                Some(&d) => match verify::check(p, proposal.q[i].as_deref(), d, u_accept, u_draw) {
                    None => (d, true),
                    Some(x) => (x, false),
                },
                None => (crate::sampling::draw(p, u_draw), false),
            };
            (token, kept, raw.map(|(raw, n)| logprobs(&raw, token, n)))
        })
    }

    /// `on_verify` for a plain greedy sequence from the target's argmax at each of the k + 1
    /// positions (picked on the device): a proposed token is kept exactly when it is the argmax.
    pub(crate) fn on_verify_greedy(
        &mut self,
        argmax: &[u32],
        tok: Option<&Tokenizer>,
        metrics: &Metrics,
    ) -> Result<(usize, Option<FinishReason>)> {
        debug_assert!(!self.needs_logits() && argmax.len() == self.proposal.tokens.len() + 1);
        self.emit_verified(tok, metrics, |_, proposal, i| (argmax[i], proposal.tokens.get(i) == Some(&argmax[i]), None))
    }

    /// Streams the tokens a verification chose: `pick(i)` gives position i's token, whether it
    /// is the kept proposal, and its logprob; the first token that is not a kept proposal is
    /// the last one.
    fn emit_verified(
        &mut self,
        tok: Option<&Tokenizer>,
        metrics: &Metrics,
        mut pick: impl FnMut(&mut Self, &Proposal, usize) -> (u32, bool, Option<TokenLogprob>),
    ) -> Result<(usize, Option<FinishReason>)> {
        // Taken: the proposal is used up (the next step proposes afresh).
        let proposal = std::mem::take(&mut self.proposal);
        let mut accepted = 0;
        for i in 0..=proposal.tokens.len() {
            let (token, kept, logprob) = pick(self, &proposal, i);
            accepted += kept as usize;
            if let Some(reason) = self.on_token(token, logprob, tok, metrics)? {
                return Ok((accepted, Some(reason)));
            }
            if !kept {
                break;
            }
        }
        Ok((accepted, None))
    }

    /// Appends the chosen next token and streams it now, or with the next `stream` where that
    /// cannot change the outcome. Returns why the sequence ends, if it does.
    pub(crate) fn on_token(
        &mut self,
        token: u32,
        logprob: Option<TokenLogprob>,
        tok: Option<&Tokenizer>,
        metrics: &Metrics,
    ) -> Result<Option<FinishReason>> {
        self.sampler.accept(token);
        let now = Instant::now();
        match self.last_token {
            None => metrics.observe_ttft(now - self.submitted),
            Some(t) => metrics.observe_itl(now - t),
        }
        self.first_token.get_or_insert(now);
        self.last_token = Some(now);
        let is_stop_token = !self.req.ignore_eos
            && (tok.is_some_and(|t| t.is_stop_token(token)) || self.req.stop_token_ids.contains(&token));
        if is_stop_token {
            return Ok(Some(FinishReason::Stop));
        }
        self.tokens.push(token);
        metrics.generation_tokens.fetch_add(1, Relaxed);
        self.unsent.push((token, logprob));
        let length = self.n_output() >= self.req.max_tokens;
        // The first token streams at once: deferring it would add a step to the TTFT.
        if self.stops.is_empty() && !length && self.n_output() > 1 {
            return Ok(None);
        }
        if self.stream(tok)? {
            return Ok(Some(FinishReason::Stop));
        }
        Ok(length.then_some(FinishReason::Length))
    }

    /// Streams the unsent tokens' text; true when it hit a stop string (the rest is dropped).
    pub(crate) fn stream(&mut self, tok: Option<&Tokenizer>) -> Result<bool> {
        let mut unsent = std::mem::take(&mut self.unsent);
        let mut hit = false;
        for (token, logprob) in unsent.drain(..) {
            let delta = match tok {
                Some(t) => self.detok.push(t, token)?,
                None => String::new(),
            };
            let text;
            (text, hit) = self.stops.push(&delta);
            self.send(Event::Token { id: Some(token), text, logprob });
            if hit {
                break;
            }
        }
        unsent.clear();
        self.unsent = unsent;
        Ok(hit)
    }

    /// Whether tokens wait to be streamed.
    pub(crate) fn has_unsent(&self) -> bool {
        !self.unsent.is_empty()
    }

    /// Streams any held-back text and the final event.
    pub(crate) fn finish(&mut self, reason: FinishReason, tok: Option<&Tokenizer>) {
        // (A detokenizer error here has nothing left to fail: the text so far stands.)
        let _ = self.stream(tok);
        if reason != FinishReason::Abort && !self.stops.matched() {
            let held = match tok {
                Some(t) => self.detok.flush(t).unwrap_or_default(),
                None => String::new(),
            };
            let tail = self.stops.finish(&held);
            if !tail.is_empty() {
                self.send(Event::Token { id: None, text: tail, logprob: None });
            }
        }
        let now = Instant::now();
        self.send(Event::Finished(Finished {
            reason,
            prompt_tokens: self.n_prompt,
            completion_tokens: self.n_output(),
            cached_tokens: self.cached_tokens,
            time_to_first_token: self.first_token.unwrap_or(now) - self.submitted,
            total_time: now - self.submitted,
        }));
    }

    pub(crate) fn fail(&mut self, message: String) {
        self.send(Event::Error(message));
    }

    /// False once the receiver is gone (the client left): the engine then cancels.
    pub(crate) fn is_listening(&self) -> bool {
        !self.events.is_closed()
    }

    fn send(&self, ev: Event) {
        let _ = self.events.send(ev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;

    const VOCAB: usize = 8;

    fn proposing(proposal: &[u32]) -> Sequence {
        let req = GenerateRequest::new(vec![1, 2], 16, SamplingParams::greedy());
        let (events, _) = tokio::sync::mpsc::unbounded_channel();
        let mut seq = Sequence::new(0, req, VOCAB, events).unwrap();
        seq.proposal = Proposal { tokens: proposal.to_vec(), q: vec![None; proposal.len()] };
        seq
    }

    /// The device-argmax verification keeps and emits what the logits verification does.
    #[test]
    fn greedy_verification_from_argmaxes_matches_logits() {
        let m = Metrics::default();
        for (proposal, argmax, accepted) in
            [(&[3, 5, 1][..], &[3, 5, 2, 7][..], 2), (&[3, 5, 1], &[3, 5, 1, 6], 3), (&[4], &[0, 2], 0)]
        {
            let mut from_ids = proposing(proposal);
            assert_eq!(from_ids.on_verify_greedy(argmax, None, &m).unwrap(), (accepted, None));
            let mut rows: Vec<f32> =
                argmax.iter().flat_map(|&t| (0..VOCAB as u32).map(move |v| if v == t { 1.0 } else { 0.0 })).collect();
            let mut from_logits = proposing(proposal);
            assert_eq!(from_logits.on_verify(&mut rows, VOCAB, None, &m).unwrap(), (accepted, None));
            let kept = &argmax[..accepted + 1];
            assert_eq!(&from_ids.tokens[2..], kept, "proposal {proposal:?}, argmax {argmax:?}");
            assert_eq!(from_ids.tokens, from_logits.tokens);
            assert!(from_ids.proposal.tokens.is_empty(), "the proposal is used up");
        }
    }
}
