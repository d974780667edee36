//! The engine's runner on a CUDA GPU: weights and the paged KV pool in device memory, one
//! forward pass per engine step over the packed batch, greedy tokens picked on the device.
//!
//! Few tokens (decode) take the matrix-vector kernels (f32 activations), which fuse the
//! residual adds into the o and down products.
//! More tokens take cuBLAS bf16 GEMMs (quantized weights dequantized into a scratch buffer
//! first). Decode steps (every token asks for logits: plain decode, and the verification of a
//! few proposed tokens per sequence) are captured once per batch-size bucket as CUDA graphs and
//! replayed: the batch is padded to the bucket with tokens whose position is -1, which write
//! no KV and attend to nothing.

use super::device::{DevBuf, Gpu, Graph, Profiler};
use super::ops::{self, Act, AttnSplit, GemmOut, Kernels, KvLayout};
use super::weights::GpuModel;
use crate::engine::runner::{blocks_in, most_needed, Row, Runner, StepOutput};
use crate::engine::EngineConfig;
use crate::model::config::{ModelConfig, RopeStyle};
use crate::model::decoder::{LogitsFor, SeqChunk};
use crate::model::kv_cache::KvDtype;
use crate::model::Weights;
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;

/// Steps of at most this many tokens take the matrix-vector kernels; more take cuBLAS. Each
/// extra activation row adds L1 traffic of its own, and past four rows the tensor cores win.
const GEMV_TOKENS: usize = 4;
/// Share of the GPU memory free after weights and buffers that the KV pool takes by default.
const KV_FREE_FRACTION: f64 = 0.9;
/// Largest decode batch replayed from a graph.
const MAX_GRAPH_BATCH: usize = 256;
/// (token, split) pairs of partial attention results the scratch holds, per batch token.
const PAIRS_PER_TOKEN: usize = 4;

/// Offsets (in i32) of the step's metadata in the device buffer `meta`.
struct MetaLayout {
    tokens: usize,
    pos: usize,
    seq: usize,
    slot: usize,
    rows: usize,
    /// Tokens that take the decode attention kernel (in eager steps with prefill tiles).
    dlist: usize,
    /// Prefill attention tiles: [first token, tokens, sequence, first position] each.
    tiles: usize,
    tables: usize,
}

/// How a step's attention is divided between the kernels.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct AttnPlan {
    /// Tokens for the decode kernel, and whether they are listed (else tokens 0..n_decode).
    n_decode: usize,
    listed: bool,
    split: AttnSplit,
    n_tiles: usize,
    table_stride: usize,
}

/// Chunks longer than this take the tensor-core prefill attention (when the head size has one).
const PREFILL_MIN_TOKENS: usize = 8;

struct Workspace {
    x: DevBuf,
    /// bf16 GEMM inputs (normed x, attention output, SiLU·up).
    hb: DevBuf,
    qkv: DevBuf,
    /// f32 attention output (matrix-vector path, where the attention cannot write q8).
    attn: DevBuf,
    /// [gate | up] rows: f32 (matrix-vector path) or bf16 (GEMM path).
    gate_up: DevBuf,
    /// f32 normed rows (matrix-vector path).
    hn: DevBuf,
    /// f32 SiLU·up rows (matrix-vector path).
    act: DevBuf,
    /// q8 activations of the matrix-vector path with quantized weights: int8 values and
    /// (scale, scale · sum) per group of 32.
    xq: DevBuf,
    xds: DevBuf,
    logits: DevBuf,
    argmax: DevBuf,
    part_o: DevBuf,
    part_ml: DevBuf,
    /// Dequantized weights for the GEMM path (empty for bf16 models).
    scratch: DevBuf,
    meta: DevBuf,
}

/// What a captured graph depends on besides buffer contents.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct GraphKey {
    batch: usize,
    plan: AttnPlan,
}

pub struct CudaRunner {
    // Field order is drop order: graphs and buffers go before the GPU context.
    graphs: HashMap<GraphKey, Graph>,
    ws: Workspace,
    kv: DevBuf,
    /// Rotary cos and sin per position and frequency.
    rope: (DevBuf, DevBuf),
    model: GpuModel,
    k: Kernels,
    gpu: Gpu,
    cfg: ModelConfig,
    layout: KvLayout,
    n_blocks: usize,
    cap_tokens: usize,
    cap_rows: usize,
    max_blocks: usize,
    meta_layout: MetaLayout,
    host_meta: Vec<i32>,
    ids: Vec<i32>,
    profiler: Option<Profiler>,
    /// The launched pass that `collect` has not waited for yet.
    launched: Option<Launched>,
}

/// What `collect` needs of a launched pass.
struct Launched {
    /// Argmax rows the pass writes (a graph's whole bucket).
    rows: usize,
    /// Per logits row: whether its argmax suffices.
    greedy: Vec<bool>,
    decode: bool,
    started: std::time::Instant,
}

impl CudaRunner {
    pub fn new(weights: Weights, cfg: &EngineConfig, ordinal: usize) -> Result<Self> {
        if cfg.kv_cache_dtype != KvDtype::F32 {
            bail!("--kv-cache-dtype {} is CPU-only: the GPU cache is bf16", cfg.kv_cache_dtype.name());
        }
        let gpu = Gpu::open(ordinal)?;
        let k = Kernels::load(&gpu)?;
        let model = match weights {
            Weights::Host(w) => GpuModel::upload(&gpu, &w)?,
            Weights::Dummy { config, dtype, seed } => GpuModel::dummy(&gpu, &k, &config, dtype, seed)?,
        };
        let c = model.config.clone();
        ensure!(c.head_dim % 8 == 0 && c.hidden % 8 == 0, "the CUDA kernels need dimensions in multiples of 8");
        let (qd, kvd, f) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.ffn_hidden);
        // Logit rows: one per sequence (and one per proposed token where speculation verifies
        // them), rounded up to a graph bucket; tokens: a step's budget, and at least one padded
        // decode bucket.
        let rows_per_seq = 1 + cfg.speculative.as_ref().map_or(0, |s| s.num_tokens);
        let cap_rows = (cfg.max_num_seqs.max(1) * rows_per_seq).next_power_of_two();
        let cap_tokens = cfg.max_num_batched_tokens.max(cap_rows);
        let max_blocks = c.max_context.div_ceil(cfg.block_size);
        let meta_layout = MetaLayout {
            tokens: 0,
            pos: cap_tokens,
            seq: 2 * cap_tokens,
            slot: 3 * cap_tokens,
            rows: 4 * cap_tokens,
            dlist: 5 * cap_tokens,
            tiles: 6 * cap_tokens,
            tables: 10 * cap_tokens,
        };
        let meta_len = meta_layout.tables + cap_tokens * max_blocks;
        let f32s = |n: usize| DevBuf::alloc(4 * n);
        let pairs = cap_tokens * PAIRS_PER_TOKEN;
        let ws = Workspace {
            x: f32s(cap_tokens * c.hidden)?,
            hb: DevBuf::alloc(2 * cap_tokens * c.hidden.max(qd).max(f))?,
            qkv: f32s(cap_tokens * (qd + 2 * kvd))?,
            attn: f32s(GEMV_TOKENS * qd)?,
            gate_up: f32s(cap_tokens * 2 * f)?,
            hn: f32s(GEMV_TOKENS * c.hidden)?,
            act: f32s(GEMV_TOKENS * f)?,
            xq: DevBuf::alloc(GEMV_TOKENS * c.hidden.max(qd).max(f))?,
            xds: DevBuf::alloc(8 * GEMV_TOKENS * c.hidden.max(qd).max(f).div_ceil(32))?,
            logits: f32s(cap_rows * c.vocab_size)?,
            argmax: DevBuf::alloc(4 * cap_rows)?,
            part_o: f32s(pairs * c.n_heads * c.head_dim)?,
            part_ml: f32s(pairs * c.n_heads * 2)?,
            scratch: DevBuf::alloc(2 * model.largest_matrix())?,
            meta: DevBuf::alloc(4 * meta_len)?,
        };
        let half = c.head_dim / 2;
        // As the CPU decoder (and transformers) computes them, so rotations agree.
        let inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0 / c.rope_theta.powf((2 * i) as f32 / c.head_dim as f32)).collect();
        let rope = ops::rope_tables(&gpu, &inv_freq, c.max_context)?;
        let bs = cfg.block_size;
        let per_block = (c.n_layers * 2 * bs * kvd * 2) as u64;
        let budget = match cfg.kv_cache_memory {
            Some(b) => b,
            None => {
                let (free, _) = gpu.memory()?;
                ((free as f64 * KV_FREE_FRACTION) as u64).min(most_needed(&c, cfg) * per_block)
            }
        };
        let n_blocks = blocks_in(budget, per_block, bs)?;
        let kv = DevBuf::alloc(n_blocks * per_block as usize)?;
        let layout = KvLayout {
            n_heads: c.n_heads,
            n_kv: c.n_kv_heads,
            head_dim: c.head_dim,
            block_size: bs,
            block_stride: c.n_layers * 2 * bs * kvd,
        };
        Ok(CudaRunner {
            graphs: HashMap::new(),
            ws,
            kv,
            rope,
            model,
            k,
            gpu,
            cfg: c,
            layout,
            n_blocks,
            cap_tokens,
            cap_rows,
            max_blocks,
            meta_layout,
            host_meta: vec![0; meta_len],
            ids: vec![0; cap_rows],
            profiler: Profiler::from_env(),
            launched: None,
        })
    }

    /// Bytes of GPU memory in use on the device (all processes).
    pub fn memory_used(&self) -> Result<usize> {
        let (free, total) = self.gpu.memory()?;
        Ok(total - free)
    }

    /// Runs one operation, timed when profiling operations.
    fn op(&self, name: &'static str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        match &self.profiler {
            Some(p) if p.per_op => p.span(&self.gpu, name, f),
            _ => f(),
        }
    }

    /// Runs one whole step's GPU work, timed when profiling steps.
    fn step(&self, name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        match &self.profiler {
            Some(p) if !p.per_op => p.span(&self.gpu, name, f),
            _ => f(),
        }
    }

    fn meta(&self, offset: usize) -> u64 {
        self.ws.meta.at::<i32>(offset)
    }

    /// Enqueues the forward pass of `n` tokens (metadata already on the device) and the
    /// argmax of `m` logit rows.
    fn enqueue(&self, n: usize, m: usize, plan: AttnPlan) -> Result<()> {
        let (g, k, c, w, ws) = (&self.gpu, &self.k, &self.cfg, &self.model, &self.ws);
        let (d, qd, kvd, f) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.ffn_hidden);
        let qkv_ld = qd + 2 * kvd;
        let ml = &self.meta_layout;
        let small = n <= GEMV_TOKENS;
        let style = match c.rope_style {
            RopeStyle::Halves => 0,
            RopeStyle::Adjacent => 1,
        };
        let (pos, slot) = (self.meta(ml.pos), self.meta(ml.slot));
        let q8 = (ws.xq.ptr, ws.xds.ptr);
        self.op("embed", || ops::embed(g, k, w.embed_table(), self.meta(ml.tokens), ws.x.ptr, n, d))?;
        for (li, l) in w.layers.iter().enumerate() {
            let kv_layer = self.kv.at::<u16>(li * 2 * self.layout.block_size * kvd);
            if small {
                let into = ops::gemv_input(&l.qkv, ws.hn.ptr, q8);
                self.op("rms_norm", || ops::rms_norm(g, k, ws.x.ptr, l.attn_norm.ptr, None, into, n, d, c.rms_eps))?;
                self.op("gemv qkv", || ops::gemv(g, k, &l.qkv, into, n, ws.qkv.ptr, qkv_ld, false))?;
            } else {
                self.op("rms_norm", || {
                    ops::rms_norm(g, k, ws.x.ptr, l.attn_norm.ptr, None, Act::Bf16(ws.hb.ptr), n, d, c.rms_eps)
                })?;
                let out = GemmOut::F32 { c: ws.qkv.ptr, beta: 0.0 };
                self.op("gemm qkv", || ops::gemm(g, k, &l.qkv, ws.hb.ptr, n, out, &ws.scratch))?;
            }
            let bias = l.qkv_bias.as_ref().map(|b| b.ptr);
            self.op(if small { "rope + kv write (≤8)" } else { "rope + kv write (>8)" }, || {
                ops::rope_kv_write(
                    g,
                    k,
                    ws.qkv.ptr,
                    bias,
                    (self.rope.0.ptr, self.rope.1.ptr),
                    pos,
                    slot,
                    kv_layer,
                    &self.layout,
                    style,
                    n,
                )
            })?;
            // The attention writes the o projection's input itself: bf16 for the GEMM, and
            // q8 for the matrix-vector product where the decode kernels cover every token of
            // the step and can.
            let o_in = ops::gemv_input(&l.wo, ws.attn.ptr, q8);
            let attn_q8 = small
                && matches!(o_in, Act::Q8 { .. })
                && plan.n_tiles == 0
                && plan.n_decode == n
                && ops::attention_writes_q8(&self.layout, &plan.split);
            let attn_out = match (small, attn_q8) {
                (false, _) => Act::Bf16(ws.hb.ptr),
                (true, true) => o_in,
                (true, false) => Act::F32 { x: ws.attn.ptr, ld: qd },
            };
            if plan.n_decode > 0 {
                self.op(if small { "attention (≤4 tokens)" } else { "attention, decode kernel" }, || {
                    ops::attention(
                        g,
                        k,
                        &self.layout,
                        ws.qkv.ptr,
                        qkv_ld,
                        kv_layer,
                        self.meta(ml.tables),
                        plan.table_stride,
                        self.meta(ml.seq),
                        pos,
                        plan.listed.then(|| self.meta(ml.dlist)),
                        c.sliding_window.unwrap_or(0),
                        plan.n_decode,
                        plan.split,
                        attn_out,
                        (ws.part_o.ptr, ws.part_ml.ptr),
                    )
                })?;
            }
            if plan.n_tiles > 0 {
                self.op("attention, prefill kernel", || {
                    ops::attention_prefill(
                        g,
                        k,
                        &self.layout,
                        ws.qkv.ptr,
                        qkv_ld,
                        kv_layer,
                        self.meta(ml.tables),
                        plan.table_stride,
                        self.meta(ml.tiles),
                        plan.n_tiles,
                        c.sliding_window.unwrap_or(0),
                        attn_out,
                    )
                })?;
            }
            if small {
                if matches!(o_in, Act::Q8 { .. }) && !attn_q8 {
                    self.op("quantize_q8", || ops::quantize_q8(g, k, ws.attn.ptr, qd, n, qd, o_in))?;
                }
                self.op("gemv o", || ops::gemv(g, k, &l.wo, o_in, n, ws.x.ptr, d, true))?;
                let into = ops::gemv_input(&l.gate_up, ws.hn.ptr, q8);
                self.op("rms_norm", || ops::rms_norm(g, k, ws.x.ptr, l.ffn_norm.ptr, None, into, n, d, c.rms_eps))?;
                self.op("gemv gate_up", || ops::gemv(g, k, &l.gate_up, into, n, ws.gate_up.ptr, 2 * f, false))?;
                let act = ops::gemv_input(&l.down, ws.act.ptr, q8);
                let gu = Act::F32 { x: ws.gate_up.ptr, ld: 2 * f };
                self.op("silu_mul", || ops::silu_mul(g, k, gu, act, n, f))?;
                self.op("gemv down", || ops::gemv(g, k, &l.down, act, n, ws.x.ptr, d, true))?;
            } else {
                let residual = GemmOut::F32 { c: ws.x.ptr, beta: 1.0 };
                self.op("gemm o", || ops::gemm(g, k, &l.wo, ws.hb.ptr, n, residual, &ws.scratch))?;
                self.op("rms_norm", || {
                    ops::rms_norm(g, k, ws.x.ptr, l.ffn_norm.ptr, None, Act::Bf16(ws.hb.ptr), n, d, c.rms_eps)
                })?;
                // gate and up in bf16: SiLU·up is the only reader and rounds to bf16 anyway.
                let gate_up = GemmOut::Bf16(ws.gate_up.ptr);
                self.op("gemm gate_up", || ops::gemm(g, k, &l.gate_up, ws.hb.ptr, n, gate_up, &ws.scratch))?;
                let gu = Act::Bf16(ws.gate_up.ptr);
                self.op("silu_mul", || ops::silu_mul(g, k, gu, Act::Bf16(ws.hb.ptr), n, f))?;
                self.op("gemm down", || ops::gemm(g, k, &l.down, ws.hb.ptr, n, residual, &ws.scratch))?;
            }
        }
        let rows = Some(self.meta(ml.rows));
        let head = w.lm_head();
        if m <= GEMV_TOKENS {
            let into = ops::gemv_input(head, ws.hn.ptr, q8);
            self.op("rms_norm", || ops::rms_norm(g, k, ws.x.ptr, w.out_norm.ptr, rows, into, m, d, c.rms_eps))?;
            self.op("gemv lm_head", || ops::gemv(g, k, head, into, m, ws.logits.ptr, c.vocab_size, false))?;
        } else {
            self.op("rms_norm", || {
                ops::rms_norm(g, k, ws.x.ptr, w.out_norm.ptr, rows, Act::Bf16(ws.hb.ptr), m, d, c.rms_eps)
            })?;
            let logits = GemmOut::F32 { c: ws.logits.ptr, beta: 0.0 };
            self.op("gemm lm_head", || ops::gemm(g, k, head, ws.hb.ptr, m, logits, &ws.scratch))?;
        }
        self.op("argmax", || ops::argmax_rows(g, k, ws.logits.ptr, m, c.vocab_size, ws.argmax.ptr))
    }
}

impl Drop for CudaRunner {
    fn drop(&mut self) {
        if let Some(p) = &self.profiler {
            eprintln!("{}", p.report());
        }
    }
}

impl Runner for CudaRunner {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    fn describe(&self) -> String {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        format!(
            "cuda:{} ({}), weights {:.2} GiB read per token, {} KV blocks ({:.2} GiB), {:.2} GiB of GPU memory in use",
            self.gpu.ordinal,
            self.gpu.name,
            gib(self.model.bytes_per_token()),
            self.n_blocks,
            gib(self.kv.bytes),
            gib(self.memory_used().unwrap_or(0))
        )
    }

    fn weight_bytes_per_token(&self) -> usize {
        self.model.bytes_per_token()
    }

    fn host_kv(&self) -> Option<&crate::engine::paged_kv::PagedKv> {
        None
    }

    fn launch(&mut self, chunks: &[SeqChunk], tables: &[&[u32]], greedy: &[bool], _out: &mut StepOutput) -> Result<()> {
        ensure!(self.launched.is_none(), "a forward pass was launched before the previous one was collected");
        let n: usize = chunks.iter().map(|ch| ch.tokens.len()).sum();
        let rows_of = |ch: &SeqChunk| match ch.logits {
            None => 0,
            Some(LogitsFor::Last) => 1,
            Some(LogitsFor::All) => ch.tokens.len(),
        };
        let m: usize = chunks.iter().map(rows_of).sum();
        if n == 0 || n > self.cap_tokens || m > self.cap_rows || chunks.len() > self.cap_tokens {
            bail!(
                "a step of {n} tokens ({m} logit rows) does not fit the GPU buffers ({} tokens, {} rows)",
                self.cap_tokens,
                self.cap_rows
            );
        }
        let vocab = self.cfg.vocab_size;
        if let Some(&bad) = chunks.iter().flat_map(|ch| ch.tokens).find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is out of range for a vocabulary of {vocab}");
        }
        // Steps where every token gets a logits row and takes the decode attention (plain
        // decode, and verifications of a few proposed tokens) replay a graph of the batch's
        // bucket: row r is token r.
        let started = std::time::Instant::now();
        let decode = m == n
            && chunks.iter().all(|ch| ch.tokens.len() <= PREFILL_MIN_TOKENS)
            && n <= MAX_GRAPH_BATCH
            && !self.profiler.as_ref().is_some_and(|p| p.per_op);
        let batch = if decode { n.next_power_of_two().min(self.cap_rows) } else { n };
        let bs = self.layout.block_size;
        let table_stride =
            tables.iter().map(|t| t.len()).max().unwrap_or(1).max(1).next_power_of_two().min(self.max_blocks);
        let ml = &self.meta_layout;
        let meta = &mut self.host_meta;
        let mut t = 0;
        let mut r = 0;
        // Per logits row: whether its argmax suffices (`greedy` is per chunk that asks).
        let (mut row_greedy, mut asking) = (Vec::with_capacity(m), 0);
        let (mut n_decode, mut n_tiles) = (0, 0);
        let mut max_len = 1;
        let window = self.cfg.sliding_window.unwrap_or(usize::MAX);
        let prefill_kernel = ops::has_prefill_attention(self.cfg.head_dim);
        for (ci, ch) in chunks.iter().enumerate() {
            let table = tables[ci];
            if (ch.pos0 + ch.tokens.len()).div_ceil(bs) > table.len() {
                bail!("chunk {ci}: its block table does not cover its positions");
            }
            let tiled = prefill_kernel && ch.tokens.len() > PREFILL_MIN_TOKENS;
            for (j, &tok) in ch.tokens.iter().enumerate() {
                let p = ch.pos0 + j;
                meta[ml.tokens + t] = tok as i32;
                meta[ml.pos + t] = p as i32;
                meta[ml.seq + t] = ci as i32;
                meta[ml.slot + t] = (table[p / bs] as usize * bs + p % bs) as i32;
                if tiled {
                    if j % ops::PREFILL_TILE == 0 {
                        let len = (ch.tokens.len() - j).min(ops::PREFILL_TILE);
                        meta[ml.tiles + 4 * n_tiles..ml.tiles + 4 * n_tiles + 4]
                            .copy_from_slice(&[t as i32, len as i32, ci as i32, p as i32]);
                        n_tiles += 1;
                    }
                } else {
                    meta[ml.dlist + n_decode] = t as i32;
                    n_decode += 1;
                    max_len = max_len.max((p + 1).min(window));
                }
                t += 1;
            }
            if let Some(which) = ch.logits {
                let first = if which == LogitsFor::All { t - ch.tokens.len() } else { t - 1 };
                let flag = greedy.get(asking).copied().unwrap_or(false);
                asking += 1;
                for row in first..t {
                    meta[ml.rows + r] = row as i32;
                    r += 1;
                    row_greedy.push(flag);
                }
            }
            let row = &mut meta[ml.tables + ci * table_stride..ml.tables + (ci + 1) * table_stride];
            row[..table.len()].iter_mut().zip(table.iter()).for_each(|(d, &b)| *d = b as i32);
        }
        // Padding of a graph's bucket: no KV write, no keys, logits ignored.
        for p in t..batch {
            meta[ml.tokens + p] = 0;
            meta[ml.pos + p] = -1;
            meta[ml.seq + p] = 0;
            meta[ml.slot + p] = -1;
            meta[ml.rows + p] = p as i32;
        }
        let rows = if decode { batch } else { m };
        if decode {
            n_decode = batch;
        }
        // Half the scratch, so that rounding the split count up below still fits.
        let pairs = self.cap_tokens * PAIRS_PER_TOKEN / 2;
        let mut split = ops::attn_split(&self.layout, n_decode, max_len, 2 * self.gpu.sm_count, pairs);
        if decode {
            // Graphs are reused as contexts grow: round the split count up.
            split.n_splits = split.n_splits.next_power_of_two();
        }
        let plan = AttnPlan { n_decode, listed: !decode && n_decode < n, split, n_tiles, table_stride };
        let used = ml.tables + chunks.len() * table_stride;
        self.gpu.upload(&self.ws.meta, 0, &self.host_meta[..used])?;
        if decode {
            let key = GraphKey { batch, plan };
            if !self.graphs.contains_key(&key) {
                self.gpu.begin_capture()?;
                let captured = self.enqueue(batch, rows, plan);
                let graph = self.gpu.end_capture();
                captured?;
                self.graphs.insert(key, graph?);
            }
            self.step(&format!("GPU: decode step, batch {batch} (graph)"), || self.gpu.replay(&self.graphs[&key]))?;
        } else {
            self.step("GPU: prefill or mixed step", || self.enqueue(n, m, plan))?;
        }
        self.launched = Some(Launched { rows, greedy: row_greedy, decode, started });
        Ok(())
    }

    fn collect(&mut self, out: &mut StepOutput) -> Result<()> {
        let Launched { rows, greedy, decode, started } =
            self.launched.take().context("collect without a launched forward pass")?;
        let vocab = self.cfg.vocab_size;
        self.gpu.download(&self.ws.argmax, 0, &mut self.ids[..rows])?;
        if let Some(p) = &self.profiler {
            p.collect();
            if !p.per_op {
                p.add(
                    if decode { "host: decode step, wall" } else { "host: other step, wall" },
                    1e3 * started.elapsed().as_secs_f64(),
                );
            }
        }
        out.rows.clear();
        out.logits.clear();
        for (j, greedy) in greedy.into_iter().enumerate() {
            if greedy {
                out.rows.push(Row::Token(self.ids[j] as u32));
            } else {
                let at = out.logits.len();
                out.logits.resize(at + vocab, 0.0);
                self.gpu.download(&self.ws.logits, 4 * j * vocab, &mut out.logits[at..])?;
                out.rows.push(Row::Logits(at / vocab));
            }
        }
        Ok(())
    }
}
