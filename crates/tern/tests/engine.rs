//! The serving engine against its oracle: the single-sequence generation loop over the
//! contiguous KV cache. Continuous batching, chunked prefill, paged attention, prefix caching
//! and preemption must not change a single greedy token.

mod common;

use common::engine::{collect, greedy_requests, load, oracle, run_engine};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tern_core::engine::{Device, EngineConfig, EngineHandle, Event, Finished};
use tern_core::generation::{FinishReason, GenerateRequest};
use tern_core::model::kv_cache::KvDtype;
use tern_core::model::LoadedModel;
use tern_core::sampling::SamplingParams;

const PROMPTS: &[&str] = &[
    "The capital of France is",
    "Write a Python function that checks whether a number is prime.",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old \
     clockmaker who had never left the valley. Every morning he opened his shop, wound the \
     clocks on the wall one by one and listened to them tick. One day a stranger came in",
    "1, 2, 3, 4, 5,",
    "Translate to French: The weather is nice today and we are going to the beach.",
    "List three colors:",
];

fn start(m: &LoadedModel, config: EngineConfig) -> EngineHandle {
    EngineHandle::start(m.weights.clone(), m.tokenizer.clone(), config).expect("engine starts")
}

fn config(kv_bytes: u64, max_batched: usize, block_size: usize) -> EngineConfig {
    EngineConfig {
        block_size,
        kv_cache_memory: Some(kv_bytes),
        max_num_seqs: 16,
        max_num_batched_tokens: max_batched,
        enable_prefix_caching: true,
        kv_cache_dtype: KvDtype::F32,
        n_threads: 2,
        device: Device::Cpu,
        speculative: None,
    }
}

fn prompts() -> Vec<String> {
    PROMPTS.iter().map(|s| s.to_string()).collect()
}

fn assert_same(want: &[Vec<u32>], got: &[(Vec<u32>, Finished)], what: &str) {
    for (i, (w, (g, _))) in want.iter().zip(got).enumerate() {
        assert_eq!(w, g, "{what}: request {i} differs from its single-request output");
    }
}

#[test]
fn concurrent_requests_match_single_requests() {
    for key in ["smollm2-135m", "qwen2.5-0.5b"] {
        let m = load(key);
        let reqs = greedy_requests(&m, &prompts(), 24);
        let want = oracle(&m, &reqs);
        // A budget of 48 tokens per step: the long prompt is prefilled in chunks beside the
        // other sequences' decodes.
        let engine = start(&m, config(256 << 20, 48, 16));
        let got = run_engine(&engine, &reqs);
        assert_same(&want, &got, key);
        for (g, _) in &got {
            assert!(!g.is_empty());
        }
        assert!(engine.metrics().steps.load(Relaxed) < 200, "requests were batched");
    }
}

#[test]
fn int8_kv_cache_is_batch_invariant_and_close_to_f32() {
    let m = load("smollm2-135m");
    let reqs = greedy_requests(&m, &prompts(), 24);
    let int8 = EngineConfig { kv_cache_dtype: KvDtype::Int8, ..config(64 << 20, 48, 16) };
    // One request at a time, then all together (chunked prefill beside decodes).
    let alone: Vec<Vec<u32>> =
        reqs.iter().map(|r| run_engine(&start(&m, int8.clone()), std::slice::from_ref(r)).remove(0).0).collect();
    let together = run_engine(&start(&m, int8), &reqs);
    assert_same(&alone, &together, "int8 KV");
    // Greedy tokens mostly agree with the f32 cache (they may part where two tokens are close).
    let f32_out = oracle(&m, &reqs);
    let (same, total) = f32_out.iter().zip(&alone).fold((0, 0), |(s, t), (a, b)| {
        let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        (s + prefix, t + a.len())
    });
    eprintln!("int8 KV: {same}/{total} greedy tokens before the first divergence from f32");
    assert!(same * 2 >= total, "int8 KV diverges early: {same}/{total}");
}

#[test]
fn tiny_kv_pool_preempts_and_still_matches() {
    let m = load("smollm2-135m");
    let c = &m.weights.config;
    let block_size = 8;
    let per_block = (c.n_layers * 2 * block_size * c.n_kv_heads * c.head_dim * 4) as u64;
    let reqs = greedy_requests(&m, &prompts(), 32);
    let longest = reqs.iter().map(|r| r.prompt_ids.len() + r.max_tokens).max().unwrap();
    // Room for the longest request and a little more: the six cannot all run at once.
    let blocks = longest.div_ceil(block_size) as u64 + 4;
    let engine = start(&m, config(blocks * per_block, 64, block_size));
    let got = run_engine(&engine, &reqs);
    assert_same(&oracle(&m, &reqs), &got, "tiny pool");
    let preemptions = engine.metrics().preemptions.load(Relaxed);
    assert!(preemptions > 0, "the tiny pool should have forced preemptions");
    assert_eq!(engine.metrics().kv_blocks_used.load(Relaxed), 0, "every block is released");
    eprintln!("tiny pool: {blocks} blocks of {block_size}, {preemptions} preemptions");
}

#[test]
fn shared_prefix_is_computed_once() {
    let m = load("smollm2-135m");
    let system = "You are a careful assistant. Answer briefly and precisely. ".repeat(12);
    let prompts = vec![format!("{system}Question: what is two plus two?"), format!("{system}Question: name a fruit.")];
    let reqs = greedy_requests(&m, &prompts, 16);
    let want = oracle(&m, &reqs);
    let engine = start(&m, config(128 << 20, 512, 16));
    let metrics = engine.metrics().clone();
    let first = run_engine(&engine, &reqs[..1]);
    let computed_first = metrics.prefill_tokens_computed.load(Relaxed);
    let second = run_engine(&engine, &reqs[1..]);
    let computed_second = metrics.prefill_tokens_computed.load(Relaxed) - computed_first;
    assert_same(&want[..1], &first, "first");
    assert_same(&want[1..], &second, "second (prefix from the cache)");
    let (n0, n1) = (reqs[0].prompt_ids.len(), reqs[1].prompt_ids.len());
    let shared = reqs[0].prompt_ids.iter().zip(&reqs[1].prompt_ids).take_while(|(a, b)| a == b).count();
    let cached = second[0].1.cached_tokens;
    assert_eq!(first[0].1.cached_tokens, 0);
    assert_eq!(cached, shared / 16 * 16, "every full shared block is reused");
    assert_eq!(computed_first as usize, n0);
    assert_eq!(computed_second as usize, n1 - cached, "only the uncached tail is prefilled");
    assert!(metrics.prefix_cache_hit_rate() > 0.3);
    eprintln!("prefix: {shared} shared tokens, {cached} from cache, prefill {n0} then {computed_second}");
}

#[test]
fn dropped_stream_cancels_and_frees_blocks() {
    let m = load("smollm2-135m");
    let engine = start(&m, config(64 << 20, 512, 16));
    let mut req = greedy_requests(&m, &prompts()[..1], 400).remove(0);
    req.ignore_eos = true;
    let mut stream = engine.submit(req).unwrap();
    assert!(matches!(stream.blocking_next(), Some(Event::Token { .. })));
    drop(stream);
    let t0 = Instant::now();
    let metrics = engine.metrics();
    while metrics.requests_abort.load(Relaxed) == 0 || metrics.kv_blocks_used.load(Relaxed) != 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "the cancelled request still holds blocks");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(metrics.running.load(Relaxed), 0);
}

#[test]
fn impossible_requests_are_refused_at_submission() {
    let m = load("smollm2-135m");
    let c = m.weights.config.clone();
    let engine = start(&m, config(8 << 20, 64, 16));
    let ok = greedy_requests(&m, &prompts()[..1], 8).remove(0);
    let cases = [
        GenerateRequest { prompt_ids: vec![], ..ok.clone() },
        GenerateRequest { prompt_ids: vec![c.vocab_size as u32], ..ok.clone() },
        GenerateRequest { max_tokens: 0, ..ok.clone() },
        GenerateRequest { max_tokens: c.max_context, ..ok.clone() },
        GenerateRequest { logprobs: Some(21), ..ok.clone() },
        GenerateRequest { sampling: SamplingParams { top_p: 0.0, ..SamplingParams::greedy() }, ..ok.clone() },
        // Fits the context (8192) but not an 8 MiB KV pool.
        GenerateRequest { max_tokens: 4000, ..ok.clone() },
    ];
    for (i, r) in cases.into_iter().enumerate() {
        assert!(engine.submit(r).is_err(), "case {i} should be refused");
    }
    let (ids, fin) = collect(engine.submit(ok).unwrap());
    assert!(!ids.is_empty() && matches!(fin.reason, FinishReason::Length | FinishReason::Stop));
    engine.shutdown();
    engine.join();
    assert!(engine.submit(greedy_requests(&m, &prompts()[..1], 8).remove(0)).is_err(), "refused after shutdown");
}
