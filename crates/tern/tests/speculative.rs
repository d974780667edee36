//! Speculative decoding inside the engine: every proposer (n-gram lookup, a draft model, the
//! target's own first layers) must leave greedy output token for token as plain decoding gives
//! it, beside sequences that do not speculate and under preemption; sampled output must keep
//! the target's distribution.

mod common;

use common::engine::{greedy_requests, load, oracle, run_engine};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use tern_core::engine::{Device, EngineConfig, EngineHandle};
use tern_core::generation::GenerateRequest;
use tern_core::model::kv_cache::KvDtype;
use tern_core::model::LoadedModel;
use tern_core::sampling::SamplingParams;
use tern_core::speculative::{Proposer, SpeculativeConfig};

/// Prompts whose answers copy from the input (where lookup pays) and free-running ones.
const PROMPTS: &[&str] = &[
    "Repeat the following list exactly:\napples, pears, plums, cherries, grapes, lemons, limes\n\
     Answer: apples, pears,",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n# Rewrite both functions with type hints.\n",
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a great forest,",
];

fn config(kv_bytes: u64, spec: SpeculativeConfig) -> EngineConfig {
    EngineConfig {
        block_size: 16,
        kv_cache_memory: Some(kv_bytes),
        max_num_seqs: 16,
        max_num_batched_tokens: 64,
        enable_prefix_caching: true,
        kv_cache_dtype: KvDtype::F32,
        n_threads: 2,
        device: Device::Cpu,
        speculative: Some(spec),
    }
}

fn run(engine: &EngineHandle, reqs: &[GenerateRequest]) -> Vec<Vec<u32>> {
    run_engine(engine, reqs).into_iter().map(|(ids, _)| ids).collect()
}

/// Greedy outputs with `proposer` equal the oracle's, with one request not speculating.
/// Returns (proposed, accepted, preemptions).
fn check_greedy(m: &LoadedModel, want: &[Vec<u32>], proposer: Proposer, kv_bytes: u64) -> (u64, u64, u64) {
    check_greedy_with(
        m,
        want,
        SpeculativeConfig { proposer, num_tokens: 5, adaptive: true, draft_vocab: None },
        kv_bytes,
    )
}

fn check_greedy_with(m: &LoadedModel, want: &[Vec<u32>], spec: SpeculativeConfig, kv_bytes: u64) -> (u64, u64, u64) {
    let name = spec.proposer.name();
    let engine =
        EngineHandle::start(m.weights.clone(), m.tokenizer.clone(), config(kv_bytes, spec)).expect("engine starts");
    let mut reqs = greedy_requests(m, PROMPTS, want[0].len());
    reqs[2].num_speculative_tokens = Some(0);
    let got = run(&engine, &reqs);
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w, g, "{name}: request {i} differs from plain greedy decoding");
    }
    let mx = engine.metrics();
    let (proposed, accepted) = (mx.spec_proposed_tokens.load(Relaxed), mx.spec_accepted_tokens.load(Relaxed));
    let preemptions = mx.preemptions.load(Relaxed);
    eprintln!(
        "{name}: {accepted}/{proposed} proposed tokens accepted over {} verifications, {preemptions} preemptions",
        mx.spec_verifications.load(Relaxed),
    );
    (proposed, accepted, preemptions)
}

#[test]
fn every_proposer_keeps_greedy_output() {
    for key in ["qwen2.5-0.5b", "qwen2.5-1.5b"] {
        let m = load(key);
        let want = oracle(&m, &greedy_requests(&m, PROMPTS, 32));
        let (_, accepted, _) = check_greedy(&m, &want, Proposer::Ngram { min_n: 1, max_n: 3, per_match: 0 }, 256 << 20);
        assert!(accepted > 0, "{key}: n-gram lookup never accepted a token on copying prompts");
        let layers = m.weights.config.n_layers / 2;
        let (proposed, _, _) = check_greedy(&m, &want, Proposer::EarlyExit { layers }, 256 << 20);
        assert!(proposed > 0, "{key}: early exit proposed nothing");
        // A head of the first 4,096 tokens: proposals change, the output does not.
        let small_head = SpeculativeConfig {
            proposer: Proposer::EarlyExit { layers },
            num_tokens: 5,
            adaptive: true,
            draft_vocab: Some(4096),
        };
        let (proposed, _, _) = check_greedy_with(&m, &want, small_head, 256 << 20);
        assert!(proposed > 0, "{key}: early exit with a small head proposed nothing");
        if key == "qwen2.5-1.5b" {
            let draft = load("qwen2.5-0.5b").weights;
            let (_, accepted, _) = check_greedy(&m, &want, Proposer::Draft(Box::new(draft)), 256 << 20);
            assert!(accepted > 0, "the 0.5B draft never agreed with the 1.5B target");
        }
    }
}

#[test]
fn speculation_under_preemption_keeps_greedy_output() {
    let m = load("qwen2.5-0.5b");
    let want = oracle(&m, &greedy_requests(&m, PROMPTS, 32));
    // 8 blocks of 16 positions: the four requests (60-90 positions each) cannot all fit.
    let per_block = 2 * 24 * 2 * 64 * 4 * 16;
    let (_, accepted, preemptions) =
        check_greedy(&m, &want, Proposer::Ngram { min_n: 1, max_n: 3, per_match: 0 }, 8 * per_block);
    assert!(preemptions > 0 && accepted > 0, "the pool was meant to preempt speculating sequences");
}

/// Pearson's two-sample chi-square statistic over the categories both samples share (rare
/// ones pooled) and its degrees of freedom.
fn two_sample_chi_square(a: &BTreeMap<u32, usize>, b: &BTreeMap<u32, usize>) -> (f64, usize) {
    let (na, nb) = (a.values().sum::<usize>() as f64, b.values().sum::<usize>() as f64);
    let mut cats: Vec<(f64, f64)> = Vec::new();
    let mut pooled = (0.0, 0.0);
    let keys: std::collections::BTreeSet<u32> = a.keys().chain(b.keys()).copied().collect();
    for k in keys {
        let (x, y) = (*a.get(&k).unwrap_or(&0) as f64, *b.get(&k).unwrap_or(&0) as f64);
        if x + y < 20.0 {
            pooled = (pooled.0 + x, pooled.1 + y);
        } else {
            cats.push((x, y));
        }
    }
    if pooled.0 + pooled.1 > 0.0 {
        cats.push(pooled);
    }
    let chi = cats
        .iter()
        .map(|&(x, y)| {
            let t = x + y;
            let (ea, eb) = (t * na / (na + nb), t * nb / (na + nb));
            (x - ea).powi(2) / ea + (y - eb).powi(2) / eb
        })
        .sum();
    (chi, cats.len() - 1)
}

#[test]
fn sampled_tokens_keep_the_target_distribution() {
    // The second and third generated tokens come from verification passes when speculating
    // (the first comes from the prefill); top-k 5 keeps the effective vocabulary small.
    let m = load("smollm2-135m");
    let tok = m.tokenizer.as_ref().unwrap();
    // A list the answer picks from, so that n-gram lookup finds the sampled words and proposes.
    let prompt = tok
        .encode(
            "Fruits: apples, pears, plums, bananas, oranges, grapes, cherries, peaches, mangoes, lemons.\n\
             My favourite fruits are",
            true,
        )
        .unwrap();
    let n = 1200;
    // Seeds differ between runs: samples drawn from one generator stream would be correlated
    // and make the test too lenient.
    let sample = |spec: Option<SpeculativeConfig>, seed0: u64| -> (BTreeMap<u32, usize>, u64) {
        let cfg = EngineConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            kv_cache_memory: Some(256 << 20),
            n_threads: 2,
            speculative: spec,
            ..EngineConfig::default()
        };
        let engine = EngineHandle::start(m.weights.clone(), m.tokenizer.clone(), cfg).expect("engine starts");
        let reqs: Vec<GenerateRequest> = (0..n)
            .map(|i| {
                let params =
                    SamplingParams { temperature: 1.0, top_k: 5, seed: Some(seed0 + i as u64), ..Default::default() };
                let mut r = GenerateRequest::new(prompt.clone(), 3, params);
                r.ignore_eos = true;
                r
            })
            .collect();
        let mut counts = BTreeMap::new();
        for chunk in reqs.chunks(64) {
            for out in run(&engine, chunk) {
                // (second, third) token pairs as one category.
                *counts.entry(out[1] * 7919 + out[2]).or_insert(0) += 1;
            }
        }
        (counts, engine.metrics().spec_verifications.load(Relaxed))
    };
    let (plain, _) = sample(None, 0);
    // The early-exit head keeps the first 2,000 tokens: q has a smaller support than p.
    let early = SpeculativeConfig {
        proposer: Proposer::EarlyExit { layers: 10 },
        num_tokens: 2,
        adaptive: false,
        draft_vocab: Some(2000),
    };
    let lookup = SpeculativeConfig {
        proposer: Proposer::Ngram { min_n: 1, max_n: 3, per_match: 0 },
        num_tokens: 2,
        adaptive: false,
        draft_vocab: None,
    };
    for (run, (name, spec)) in [("early-exit", early), ("ngram", lookup)].into_iter().enumerate() {
        let (got, verifications) = sample(Some(spec), 1_000_000 * (run as u64 + 1));
        eprintln!("{name}: {verifications} verification passes over {n} requests");
        assert!(verifications > n as u64 / 3, "{name}: only {verifications} verification passes");
        let (chi, df) = two_sample_chi_square(&plain, &got);
        // Upper 0.1% points of chi-square (Wilson-Hilferty approximation).
        let z = 3.09;
        let dff = df as f64;
        let limit = dff * (1.0 - 2.0 / (9.0 * dff) + z * (2.0 / (9.0 * dff)).sqrt()).powi(3);
        eprintln!("{name}: chi-square {chi:.1} over {df} degrees of freedom (0.1% limit {limit:.1})");
        assert!(df >= 4, "too few categories to test ({df})");
        assert!(
            chi < limit,
            "{name}: sampled token pairs differ from plain sampling (chi-square {chi:.1} > {limit:.1})"
        );
    }
}
