//! `tern bench`: prefill and decode throughput (like llama-bench's pp/tg tests) and peak RSS.

use crate::args::ModelArgs;
use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;
use std::time::Instant;
use tern_core::model::decoder::{Decoder, LogitsFor};
use tern_core::rng::Rng;
use tern_core::sampling::argmax;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length of the prefill test (0 skips it).
    #[arg(long, short = 'p', default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens generated in the decode test, from an empty context (0 skips it).
    #[arg(long, short = 'n', default_value_t = 128)]
    pub gen_tokens: usize,
    /// Tokens already in the context before each test (like llama-bench's -d): shows what
    /// attention over a long context costs.
    #[arg(long, short = 'd', default_value_t = 0)]
    pub depth: usize,
    /// Timed repetitions of each test (after one warm-up run).
    #[arg(long, short = 'r', default_value_t = 5)]
    pub repetitions: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct TestResult {
    test: String,
    tokens: usize,
    tok_per_s_median: f64,
    tok_per_s_min: f64,
    tok_per_s_max: f64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    arch: &'static str,
    params: usize,
    weight_bytes: usize,
    threads: usize,
    cpu: &'static str,
    results: Vec<TestResult>,
    /// Decode bandwidth implied by the median: weight bytes read per token × tok/s.
    decode_gb_per_s: Option<f64>,
    peak_rss_mib: Option<f64>,
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    let loaded = a.model.load()?;
    let threads = a.model.threads()?;
    let mut model = Decoder::new(loaded.weights, threads);
    let cfg = model.config().clone();
    if a.depth + a.prompt_tokens.max(a.gen_tokens) > cfg.max_context {
        bail!(
            "{} + {} tokens exceed the model's context length {}",
            a.depth,
            a.prompt_tokens.max(a.gen_tokens),
            cfg.max_context
        );
    }
    let mut rng = Rng::new(1);
    let mut random_tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32).collect() };
    let context = random_tokens(a.depth);
    let prompt = random_tokens(a.prompt_tokens);
    let mut logits = Vec::new();
    let mut results = Vec::new();

    // The context (if any) is prefilled once; each run truncates back to it.
    let prefill_context = |model: &mut Decoder, capacity: usize| -> Result<_> {
        let mut cache = model.new_cache(a.depth + capacity);
        if !context.is_empty() {
            model.forward(&context, &mut cache, LogitsFor::Last, &mut Vec::new())?;
        }
        Ok(cache)
    };
    let depth_suffix = if a.depth > 0 { format!(" @ d{}", a.depth) } else { String::new() };
    if a.prompt_tokens > 0 {
        let mut cache = prefill_context(&mut model, a.prompt_tokens)?;
        let rates = measure(a.repetitions, || {
            cache.truncate(a.depth);
            let t = Instant::now();
            model.forward(&prompt, &mut cache, LogitsFor::Last, &mut logits)?;
            Ok(a.prompt_tokens as f64 / t.elapsed().as_secs_f64())
        })?;
        results.push(summary(format!("pp{}{depth_suffix}", a.prompt_tokens), a.prompt_tokens, rates));
    }
    if a.gen_tokens > 0 {
        let mut cache = prefill_context(&mut model, a.gen_tokens)?;
        let rates = measure(a.repetitions, || {
            cache.truncate(a.depth);
            let mut token = prompt.first().copied().unwrap_or(1);
            let t = Instant::now();
            for _ in 0..a.gen_tokens {
                model.forward(&[token], &mut cache, LogitsFor::Last, &mut logits)?;
                token = argmax(&logits);
            }
            Ok(a.gen_tokens as f64 / t.elapsed().as_secs_f64())
        })?;
        results.push(summary(format!("tg{}{depth_suffix}", a.gen_tokens), a.gen_tokens, rates));
    }
    let weight_bytes = model.weights.bytes_per_token();
    let decode_gb_per_s =
        results.iter().find(|r| r.test.starts_with("tg")).map(|r| r.tok_per_s_median * weight_bytes as f64 / 1e9);
    let report = Report {
        model: a.model.model.clone(),
        arch: cfg.arch.name(),
        params: cfg.n_params(),
        weight_bytes: model.weights.total_bytes(),
        threads,
        cpu: tern_core::kernels::cpu_level().name(),
        results,
        decode_gb_per_s,
        peak_rss_mib: peak_rss_mib(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "model {} ({}, {:.0}M params, {:.0} MiB weights), {} threads, kernels {}",
        report.model,
        report.arch,
        report.params as f64 / 1e6,
        report.weight_bytes as f64 / (1 << 20) as f64,
        threads,
        report.cpu
    );
    println!("| test | tok/s (median) | min | max |");
    println!("|---|---|---|---|");
    for r in &report.results {
        println!("| {} | {:.1} | {:.1} | {:.1} |", r.test, r.tok_per_s_median, r.tok_per_s_min, r.tok_per_s_max);
    }
    if let Some(gb) = report.decode_gb_per_s {
        println!("decode streams {gb:.1} GB/s of weights");
    }
    if let Some(rss) = report.peak_rss_mib {
        println!("peak RSS {rss:.0} MiB");
    }
    Ok(())
}

/// One untimed warm-up, then `reps` timed runs.
fn measure(reps: usize, mut f: impl FnMut() -> Result<f64>) -> Result<Vec<f64>> {
    f()?;
    (0..reps).map(|_| f()).collect()
}

fn summary(test: String, tokens: usize, mut rates: Vec<f64>) -> TestResult {
    rates.sort_by(f64::total_cmp);
    TestResult {
        test,
        tokens,
        tok_per_s_median: rates[rates.len() / 2],
        tok_per_s_min: rates[0],
        tok_per_s_max: rates[rates.len() - 1],
    }
}

/// Peak resident set size (VmHWM) on Linux.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
