//! The decoder forward pass shared by every architecture (pre-norm transformer: RMSNorm,
//! grouped-query attention with rotary embeddings, SwiGLU MLP). Per-architecture differences
//! (q/k/v bias, rotary layout, sliding window) are data in `ModelConfig`.
//!
//! Every buffer lives in a `Workspace` reused across calls; matmuls run on the stored weight
//! encoding through `kernels`, split across the thread pool, and the matrices that read the
//! same input (q/k/v, gate/up) share one parallel region.

use crate::kernels::{self, QuantizedActs, ThreadPool};
use crate::model::config::{ModelConfig, RopeStyle};
use crate::model::kv_cache::{KvCache, KvDtype, KvStore};
use crate::model::ops;
use crate::model::weights::{Matrix, ModelWeights};
use anyhow::{bail, Result};
use std::sync::Mutex;

/// Which positions of a forward pass need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last token (generation).
    Last,
    /// Every token (scoring, perplexity, prompt logprobs).
    All,
}

/// Receives (layer, which input, the input rows) during a forward pass.
pub type LinearObserver<'a> = dyn FnMut(usize, LinearInput, &[f32]) + 'a;

/// The inputs of a layer's matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearInput {
    /// Normed residual: the input of q, k and v.
    Attention,
    /// Attention output: the input of o.
    Output,
    /// Normed residual: the input of gate and up.
    Ffn,
    /// SiLU(gate) · up: the input of down.
    Down,
}

pub struct Decoder {
    pub weights: ModelWeights,
    pool: ThreadPool,
    inv_freq: Vec<f32>,
    ws: Workspace,
}

#[derive(Default)]
struct Workspace {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Rotary cos/sin per token and frequency, shared by every layer and head.
    cos: Vec<f32>,
    sin: Vec<f32>,
    acts: [QuantizedActs; 3],
    /// Sequence and position of each token of the batch.
    slots: Vec<Slot>,
    /// Attention scores, one buffer per thread.
    scores: Vec<Mutex<Vec<f32>>>,
}

/// A raw pointer that threads write through at disjoint indices.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);

impl SharedMut {
    /// Going through a method makes closures capture the whole (Sync) wrapper.
    fn ptr(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: every user writes disjoint index ranges and the pool joins before the buffer is read.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl Decoder {
    /// Takes the weights and packs them for this CPU's kernels (see `Matrix::pack_for_cpu`).
    pub fn new(mut weights: ModelWeights, n_threads: usize) -> Result<Self> {
        weights.pack_for_cpu()?;
        let c = &weights.config;
        let half = c.head_dim / 2;
        // Computed as transformers does (f32 pow), so rotary angles agree bit for bit.
        let inv_freq = (0..half).map(|i| 1.0 / c.rope_theta.powf((2 * i) as f32 / c.head_dim as f32)).collect();
        let pool = ThreadPool::new(n_threads.max(1));
        let ws =
            Workspace { scores: (0..pool.n_threads()).map(|_| Mutex::new(Vec::new())).collect(), ..Default::default() };
        Ok(Decoder { weights, pool, inv_freq, ws })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.weights.config
    }

    pub fn new_cache(&self, capacity: usize) -> KvCache {
        self.new_cache_of(capacity, KvDtype::F32)
    }

    pub fn new_cache_of(&self, capacity: usize, dtype: KvDtype) -> KvCache {
        let c = self.config();
        KvCache::new(c.n_layers, c.n_kv_heads, c.head_dim, capacity, dtype)
    }

    /// Runs `tokens` at positions `cache.len()..` of a single sequence, appends their K/V to
    /// the contiguous cache and writes logits (`vocab` per requested position, row-major).
    pub fn forward(
        &mut self,
        tokens: &[u32],
        cache: &mut KvCache,
        which: LogitsFor,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let pos0 = cache.len();
        if pos0 + tokens.len() > cache.capacity() {
            bail!(
                "context full: {pos0} cached + {} new tokens exceed the context size {}",
                tokens.len(),
                cache.capacity()
            );
        }
        self.forward_batch(&[SeqChunk { seq: 0, tokens, pos0, logits: Some(which) }], cache, logits)?;
        cache.advance(tokens.len());
        Ok(())
    }

    /// One forward pass over a packed batch: every chunk's tokens run at positions
    /// `pos0..pos0 + len` of its sequence, their K/V are written to `kv`, and logits are written
    /// for the chunks that ask (row-major, `vocab` per row, in chunk order). Each token's result
    /// depends only on its own sequence: the kernels do the same arithmetic per row whatever
    /// the batch holds, so batching never changes outputs.
    pub fn forward_batch(&mut self, chunks: &[SeqChunk], kv: &mut dyn KvStore, logits: &mut Vec<f32>) -> Result<()> {
        self.forward_batch_observed(chunks, kv, logits, None)
    }

    /// [`Self::forward_batch`], handing the input rows of every layer's matrix products to
    /// `observe` (calibration for quantization): (layer, which input, n rows × width values).
    pub fn forward_batch_observed(
        &mut self,
        chunks: &[SeqChunk],
        kv: &mut dyn KvStore,
        logits: &mut Vec<f32>,
        mut observe: Option<&mut LinearObserver>,
    ) -> Result<()> {
        let mut seen = |li: usize, which: LinearInput, rows: &[f32]| {
            if let Some(f) = observe.as_mut() {
                f(li, which, rows);
            }
        };
        let c = self.weights.config.clone();
        let n: usize = chunks.iter().map(|ch| ch.tokens.len()).sum();
        if n == 0 {
            bail!("forward called with no tokens");
        }
        let tokens = chunks.iter().flat_map(|ch| ch.tokens.iter());
        if let Some(&bad) = tokens.clone().find(|&&t| t as usize >= c.vocab_size) {
            bail!("token id {bad} is out of range for a vocabulary of {}", c.vocab_size);
        }
        let (d, qd, kvd) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let ws = &mut self.ws;
        for (buf, len) in [
            (&mut ws.x, n * d),
            (&mut ws.h, n * d),
            (&mut ws.q, n * qd),
            (&mut ws.k, n * kvd),
            (&mut ws.v, n * kvd),
            (&mut ws.attn, n * qd),
            (&mut ws.proj, n * d),
            (&mut ws.gate, n * c.ffn_hidden),
            (&mut ws.up, n * c.ffn_hidden),
        ] {
            buf.resize(len, 0.0);
        }
        ws.slots.clear();
        for ch in chunks {
            ws.slots.extend((0..ch.tokens.len()).map(|i| Slot { seq: ch.seq, pos: ch.pos0 + i }));
        }
        for (i, &t) in tokens.enumerate() {
            self.weights.embed.row_f32(t as usize, &mut ws.x[i * d..(i + 1) * d])?;
        }
        let half = self.inv_freq.len();
        ws.cos.clear();
        ws.sin.clear();
        for slot in &ws.slots {
            for &f in &self.inv_freq {
                let angle = slot.pos as f32 * f;
                ws.cos.push(angle.cos());
                ws.sin.push(angle.sin());
            }
        }

        for (li, layer) in self.weights.layers.iter().enumerate() {
            ops::rms_norm(&ws.x, &layer.attn_norm, c.rms_eps, &mut ws.h);
            seen(li, LinearInput::Attention, &ws.h);
            matmuls(
                &self.pool,
                &mut ws.acts,
                &ws.h,
                n,
                &mut [(&layer.wq, &mut ws.q), (&layer.wk, &mut ws.k), (&layer.wv, &mut ws.v)],
            )?;
            if let Some([bq, bk, bv]) = &layer.qkv_bias {
                for (buf, b) in [(&mut ws.q, bq), (&mut ws.k, bk), (&mut ws.v, bv)] {
                    buf.chunks_exact_mut(b.len()).for_each(|row| ops::add_in_place(row, b));
                }
            }
            for (i, slot) in ws.slots.iter().enumerate() {
                let (cos, sin) = (&ws.cos[i * half..(i + 1) * half], &ws.sin[i * half..(i + 1) * half]);
                rope(&mut ws.q[i * qd..(i + 1) * qd], c.head_dim, cos, sin, c.rope_style);
                let k = &mut ws.k[i * kvd..(i + 1) * kvd];
                rope(k, c.head_dim, cos, sin, c.rope_style);
                kv.write(li, slot.seq, slot.pos, k, &ws.v[i * kvd..(i + 1) * kvd]);
            }
            attention(&self.pool, &c, &*kv, li, &ws.q, &ws.slots, &ws.scores, &mut ws.attn);
            seen(li, LinearInput::Output, &ws.attn);
            matmuls(&self.pool, &mut ws.acts, &ws.attn, n, &mut [(&layer.wo, &mut ws.proj)])?;
            ops::add_in_place(&mut ws.x, &ws.proj);

            ops::rms_norm(&ws.x, &layer.ffn_norm, c.rms_eps, &mut ws.h);
            seen(li, LinearInput::Ffn, &ws.h);
            matmuls(
                &self.pool,
                &mut ws.acts,
                &ws.h,
                n,
                &mut [(&layer.w_gate, &mut ws.gate), (&layer.w_up, &mut ws.up)],
            )?;
            ops::silu_mul(&mut ws.gate, &ws.up);
            seen(li, LinearInput::Down, &ws.gate);
            matmuls(&self.pool, &mut ws.acts, &ws.gate, n, &mut [(&layer.w_down, &mut ws.proj)])?;
            ops::add_in_place(&mut ws.x, &ws.proj);
        }

        // Final norm of the rows that need logits, gathered in chunk order.
        let mut n_out = 0;
        let mut first = 0;
        for ch in chunks {
            let len = ch.tokens.len();
            let rows = match ch.logits {
                None => 0..0,
                Some(LogitsFor::Last) => first + len - 1..first + len,
                Some(LogitsFor::All) => first..first + len,
            };
            for r in rows {
                let h = &mut ws.h[n_out * d..(n_out + 1) * d];
                ops::rms_norm(&ws.x[r * d..(r + 1) * d], &self.weights.out_norm, c.rms_eps, h);
                n_out += 1;
            }
            first += len;
        }
        // (A drafter's head may keep only the first tokens of the vocabulary.)
        logits.resize(n_out * self.weights.lm_head().rows, 0.0);
        if n_out > 0 {
            matmuls(&self.pool, &mut ws.acts, &ws.h[..n_out * d], n_out, &mut [(self.weights.lm_head(), logits)])?;
        }
        Ok(())
    }
}

/// One sequence's share of a batched forward pass.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// The sequence's index in the `KvStore`.
    pub seq: usize,
    pub tokens: &'a [u32],
    /// Position of the first token.
    pub pos0: usize,
    /// Which of the chunk's positions need logits (None: none).
    pub logits: Option<LogitsFor>,
}

/// Where one token of the packed batch belongs.
#[derive(Debug, Clone, Copy)]
struct Slot {
    seq: usize,
    pos: usize,
}

/// y_j = x · W_jᵀ for every (W_j, y_j). A matrix with outlier columns multiplies the
/// activations without those channels through its stored encoding and adds their product in
/// f32 (LLM.int8()'s decomposition).
fn matmuls(
    pool: &ThreadPool,
    acts: &mut [QuantizedActs; 3],
    x: &[f32],
    n: usize,
    jobs: &mut [(&Matrix, &mut Vec<f32>)],
) -> Result<()> {
    if jobs.iter().all(|(m, _)| m.outliers.is_none()) {
        return matmuls_stored(pool, acts, x, n, jobs);
    }
    let k = jobs[0].0.cols;
    // Matrices with the same outlier channels (q, k and v share their input's) share one
    // masked copy of the activations and one activation quantization.
    let mut done = vec![false; jobs.len()];
    for first in 0..jobs.len() {
        if done[first] {
            continue;
        }
        let cols = jobs[first].0.outliers.as_ref().map(|o| o.cols.clone());
        let mut group: Vec<(&Matrix, &mut Vec<f32>)> = Vec::new();
        for (j, (m, y)) in jobs.iter_mut().enumerate().skip(first) {
            if !done[j] && m.outliers.as_ref().map(|o| &o.cols) == cols.as_ref() {
                done[j] = true;
                group.push((*m, &mut **y));
            }
        }
        let Some(cols) = cols else {
            matmuls_stored(pool, acts, x, n, &mut group)?;
            continue;
        };
        let mut rest = x.to_vec();
        for row in rest.chunks_exact_mut(k) {
            cols.iter().for_each(|&c| row[c] = 0.0);
        }
        matmuls_stored(pool, acts, &rest, n, &mut group)?;
        for (m, y) in group {
            m.outliers.as_ref().expect("grouped by outliers").add_product(x, n, k, y, m.rows);
        }
    }
    Ok(())
}

/// y = x · Wᵀ for one matrix (tests and tools): the decoder's own matrix product.
pub fn project(pool: &ThreadPool, m: &Matrix, x: &[f32], n: usize) -> Result<Vec<f32>> {
    let mut acts = [QuantizedActs::new(), QuantizedActs::new(), QuantizedActs::new()];
    let mut y = vec![0f32; n * m.rows];
    matmuls(pool, &mut acts, x, n, &mut [(m, &mut y)])?;
    Ok(y)
}

/// y_j = x · W_jᵀ through the stored encodings, all in one parallel region. Activations are
/// quantized once per distinct activation format (e.g. Q5_0 and Q8_0 weights share Q8_0
/// activations); I8/F8E4M3 products are scaled by their rows' scales.
fn matmuls_stored(
    pool: &ThreadPool,
    acts: &mut [QuantizedActs; 3],
    x: &[f32],
    n: usize,
    jobs: &mut [(&Matrix, &mut Vec<f32>)],
) -> Result<()> {
    debug_assert!(jobs.len() <= 3, "matmuls takes at most 3 jobs");
    let k = jobs[0].0.cols;
    let mut act_index = [0usize; 3];
    let mut n_quantized = 0;
    for (j, (m, _)) in jobs.iter().enumerate() {
        act_index[j] = match acts[..n_quantized].iter().position(|a| a.matches(m.dtype)) {
            Some(i) => i,
            None => {
                acts[n_quantized].quantize_parallel(pool, m.dtype, x, n, k)?;
                n_quantized += 1;
                n_quantized - 1
            }
        };
    }
    // Raw output pointers (at most 3 jobs): no allocation on the per-token path.
    let mut outs = [(SharedMut(std::ptr::null_mut()), 0usize); 3];
    for (out, (m, y)) in outs.iter_mut().zip(jobs.iter_mut()) {
        *out = (SharedMut(y.as_mut_ptr()), m.rows);
    }
    let acts = &*acts;
    let jobs = &*jobs;
    pool.run(|t, nt| {
        for (j, (m, _)) in jobs.iter().enumerate() {
            let (out, ldy) = outs[j];
            let acts = &acts[act_index[j]];
            if let Some(pm) = &m.packed {
                let groups = split_rows(pm.groups(), 1, t, nt);
                // SAFETY: each thread gets disjoint groups of rows; y has n × m.rows elements.
                unsafe { kernels::matmul_packed_groups(pm, groups, acts, out.ptr(), ldy) };
                continue;
            }
            let rows = split_rows(m.rows, 12, t, nt);
            if rows.is_empty() {
                continue;
            }
            // SAFETY: each thread gets a disjoint row range; y has n × m.rows elements.
            unsafe { kernels::matmul_rows(m.dtype, m.data(), m.cols, rows.clone(), acts, out.ptr(), ldy) };
            if m.row_scale.is_some() {
                for i in 0..n {
                    for r in rows.clone() {
                        // SAFETY: as above (this thread's rows).
                        unsafe { *out.ptr().add(i * ldy + r) *= m.scale_of(r) };
                    }
                }
            }
        }
    });
    Ok(())
}

/// Thread t's share of `rows`, in multiples of `unit` (12 keeps the row-major kernels' tiles
/// of 1-4 rows full; packed matrices are split by whole groups).
fn split_rows(rows: usize, unit: usize, t: usize, nt: usize) -> std::ops::Range<usize> {
    let chunks = rows.div_ceil(unit);
    let (lo, hi) = (chunks * t / nt * unit, chunks * (t + 1) / nt * unit);
    lo.min(rows)..hi.min(rows)
}

/// Rotates each head of `x` by the token's angles (`cos`/`sin` per frequency).
fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for (i, (&cos, &sin)) in cos.iter().zip(sin).enumerate() {
            let (a, b) = match style {
                RopeStyle::Halves => (i, i + half),
                RopeStyle::Adjacent => (2 * i, 2 * i + 1),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos - x1 * sin;
            head[b] = x0 * sin + x1 * cos;
        }
    }
}

/// Causal grouped-query attention of each token's query heads (at `slots[i].pos` of sequence
/// `slots[i].seq`) over its sequence's cached keys/values `0..=pos`, limited to the sliding
/// window when the model has one. K/V are read block by block from `kv`; scores of a head are
/// computed into one row, so the result is the same whatever the block size.
#[allow(clippy::too_many_arguments)]
fn attention(
    pool: &ThreadPool,
    c: &ModelConfig,
    kv: &dyn KvStore,
    layer: usize,
    q: &[f32],
    slots: &[Slot],
    scores: &[Mutex<Vec<f32>>],
    out: &mut [f32],
) {
    let (hd, qd) = (c.head_dim, c.n_heads * c.head_dim);
    let n = slots.len();
    let group = c.n_heads / c.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let bs = kv.block_size();
    let out_ptr = SharedMut(out.as_mut_ptr());
    // One task per (token, KV head): the query heads sharing that KV head read each key and
    // value once, while it is in L1. With few tokens (decode) that is too few tasks to keep
    // every thread busy, so each query head becomes its own task.
    let per_task = if n * c.n_kv_heads >= 4 * pool.n_threads() { group } else { 1 };
    let tasks = n * c.n_heads / per_task;
    pool.run(|t, nt| {
        let mut s = scores[t].lock().unwrap_or_else(|e| e.into_inner());
        // Interleaved so that each thread gets early (short) and late (long) causal rows alike.
        for task in (t..tasks).step_by(nt) {
            let per_token = c.n_heads / per_task;
            let (i, first_head) = (task / per_token, task % per_token * per_task);
            let kvh = first_head / group;
            let Slot { seq, pos } = slots[i];
            let start = c.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let len = pos + 1 - start;
            // The blocks holding positions start..=pos, and each one's share of that range
            // (scores range, first row in the block).
            let spans = (start / bs..=pos / bs).map(|b| {
                let (lo, hi) = (start.max(b * bs), (pos + 1).min((b + 1) * bs));
                (b, lo - start..hi - start, lo - b * bs)
            });
            let heads = i * qd + first_head * hd..i * qd + (first_head + per_task) * hd;
            let qg = &q[heads.clone()];
            s.clear();
            s.resize(per_task * len, 0.0);
            // Blocks outer, heads inner: each block's keys (then values) are fetched once and
            // stay in L1 for every query head that reads them.
            for (b, range, first) in spans.clone() {
                let keys = kv.kv_block(layer, seq, b).0;
                for (qh, sh) in qg.chunks_exact(hd).zip(s.chunks_exact_mut(len)) {
                    keys.scaled_dots(qh, first, kvh, scale, &mut sh[range.clone()]);
                }
            }
            s.chunks_exact_mut(len).for_each(ops::softmax);
            // SAFETY: (token i, these heads) own this disjoint slice of `out`.
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.ptr().add(heads.start), heads.len()) };
            o.fill(0.0);
            for (b, range, first) in spans.clone() {
                let values = kv.kv_block(layer, seq, b).1;
                for (oh, sh) in o.chunks_exact_mut(hd).zip(s.chunks_exact(len)) {
                    values.weighted_sum(&sh[range.clone()], first, kvh, oh);
                }
            }
        }
    });
}
