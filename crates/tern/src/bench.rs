//! `tern bench`: prefill and decode throughput (like llama-bench's pp/tg tests) through the
//! engine, and peak RSS.

use crate::args::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::time::{Duration, Instant};
use tern_core::engine::{Device, EngineConfig, EngineHandle, Event, DEFAULT_BLOCK_SIZE};
use tern_core::generation::GenerateRequest;
use tern_core::rng::Rng;
use tern_core::sampling::SamplingParams;

/// Without a subcommand: a model-level benchmark of prefill and decode speed.
/// `tern bench serve` instead loads a running server with concurrent requests; `tern bench
/// spec` compares speculative with plain decoding.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
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
    /// Sequences decoded together in the decode test (like llama-batched-bench's parallel
    /// sequences): B requests, each with its own --depth context, run in the same engine
    /// steps; tok/s counts all of them.
    #[arg(long, short = 'b', default_value_t = 1)]
    pub batch: usize,
    /// Timed repetitions of each test (after one warm-up run).
    #[arg(long, short = 'r', default_value_t = 5)]
    pub repetitions: usize,
    /// Storage of the CPU KV cache: f32, f16 (default), bf16, or int8 / fp8 (e4m3) with a
    /// scale per position and KV head. The GPU cache is bf16.
    #[arg(long)]
    pub kv_cache_dtype: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Load an OpenAI-compatible server (`tern serve`) with streaming completions of random
    /// token-id prompts; report throughput, TTFT, inter-token latency and prefix-cache deltas.
    Serve(crate::bench_serve::ServeBenchArgs),
    /// Speculative against plain decoding on the prompts of a JSON-lines file (batch 1):
    /// tok/s, speedup, acceptance, proposer time.
    Spec(crate::bench_spec::SpecBenchArgs),
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
    /// Weight bytes read per decode token (as the device holds them).
    weight_bytes: usize,
    device: String,
    threads: usize,
    cpu: &'static str,
    results: Vec<TestResult>,
    /// Decode bandwidth implied by the median: weight bytes read per token × tok/s.
    decode_gb_per_s: Option<f64>,
    /// The GPU's device-to-device copy bandwidth, measured in this run (read + write).
    hbm_gb_per_s: Option<f64>,
    /// Model-bandwidth utilization: decode_gb_per_s / hbm_gb_per_s.
    mbu: Option<f64>,
    peak_rss_mib: Option<f64>,
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.command {
        Some(BenchCommand::Serve(s)) => return crate::bench_serve::run(s),
        Some(BenchCommand::Spec(s)) => return crate::bench_spec::run(s),
        None => {}
    }
    if a.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let (weights, tokenizer) = a.model.weights()?;
    let threads = a.model.threads()?;
    let device = a.model.device()?;
    let cfg = weights.config().clone();
    let longest = a.depth + a.prompt_tokens.max(a.gen_tokens + 1);
    if longest > cfg.max_context {
        bail!(
            "{} + {} tokens exceed the model's context length {}",
            a.depth,
            a.prompt_tokens.max(a.gen_tokens),
            cfg.max_context
        );
    }
    // Runs go through the engine: a pool for the context plus two runs of every sequence of
    // the batch, and a step budget that prefills each prompt in one pass.
    let kv_dtype = crate::args::kv_cache_dtype(a.kv_cache_dtype.as_deref(), device)?;
    let per_token = (cfg.n_layers * 2 * kv_dtype.row_bytes(cfg.n_kv_heads, cfg.head_dim)) as u64;
    let per_run = a.batch as u64 * (longest as u64 + 2 * DEFAULT_BLOCK_SIZE as u64);
    let engine_config = EngineConfig {
        kv_cache_dtype: kv_dtype,
        kv_cache_memory: Some(per_token * (2 * per_run + longest as u64)),
        max_num_seqs: a.batch.max(EngineConfig::default().max_num_seqs),
        max_num_batched_tokens: longest.max(a.batch),
        n_threads: threads,
        device,
        ..EngineConfig::default()
    };
    let hbm = hbm_bandwidth(device)?;
    let engine = EngineHandle::start(weights, tokenizer, engine_config)?;
    let weight_bytes = engine.weight_bytes_per_token();
    let mut rng = Rng::new(1);
    let mut random_tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32).collect() };
    let context = random_tokens(a.depth);
    let mut results = Vec::new();
    // The context's KV is computed once and reused through the prefix cache.
    if !context.is_empty() {
        run_request(&engine, context.clone(), 1)?;
    }
    let depth_suffix = if a.depth > 0 { format!(" @ d{}", a.depth) } else { String::new() };
    if a.prompt_tokens > 0 {
        let rates = measure(a.repetitions, || {
            // Fresh tokens every run, so the prompt itself is never a cache hit.
            let prompt = [context.as_slice(), &random_tokens(a.prompt_tokens)].concat();
            let run = run_request(&engine, prompt, 1)?;
            Ok(a.prompt_tokens as f64 / run.time_to_first_token.as_secs_f64())
        })?;
        results.push(summary(format!("pp{}{depth_suffix}", a.prompt_tokens), a.prompt_tokens, rates));
    }
    if a.gen_tokens > 0 {
        let rates = measure(a.repetitions, || {
            // The first token comes from the prompt's pass; the next gen_tokens are decode steps.
            // Each sequence of a batch has a context of its own, as concurrent requests do (a
            // shared one would be read from cache once for all of them).
            let prompts: Vec<Vec<u32>> =
                (0..a.batch)
                    .map(|i| {
                        if i == 0 {
                            [context.as_slice(), &random_tokens(1)].concat()
                        } else {
                            random_tokens(a.depth + 1)
                        }
                    })
                    .collect();
            let decode_time = if a.batch == 1 {
                run_request(&engine, prompts.into_iter().next().unwrap(), a.gen_tokens + 1)?.decode_time
            } else {
                run_batch(&engine, prompts, a.gen_tokens + 1)?
            };
            Ok((a.batch * a.gen_tokens) as f64 / decode_time.as_secs_f64())
        })?;
        let batch_suffix = if a.batch > 1 { format!(" x{}", a.batch) } else { String::new() };
        results.push(summary(format!("tg{}{batch_suffix}{depth_suffix}", a.gen_tokens), a.gen_tokens, rates));
    }
    // One decode step reads the weights once for the whole batch (its K/V reads not counted).
    let decode_gb_per_s = results
        .iter()
        .find(|r| r.test.starts_with("tg"))
        .map(|r| r.tok_per_s_median / a.batch as f64 * weight_bytes as f64 / 1e9);
    let report = Report {
        model: a.model.model.clone(),
        arch: cfg.arch.name(),
        params: cfg.n_params(),
        weight_bytes,
        device: engine.describe().to_string(),
        threads,
        cpu: tern_core::kernels::cpu_level().name(),
        results,
        decode_gb_per_s,
        hbm_gb_per_s: hbm.map(|b| b / 1e9),
        mbu: decode_gb_per_s.zip(hbm).map(|(gb, bw)| gb * 1e9 / bw),
        peak_rss_mib: peak_rss_mib(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "model {} ({}, {:.0}M params, {:.0} MiB of weights read per token), {} threads, kernels {}",
        report.model,
        report.arch,
        report.params as f64 / 1e6,
        report.weight_bytes as f64 / (1 << 20) as f64,
        threads,
        report.cpu
    );
    println!("device {}", report.device);
    println!("| test | tok/s (median) | min | max |");
    println!("|---|---|---|---|");
    for r in &report.results {
        println!("| {} | {:.1} | {:.1} | {:.1} |", r.test, r.tok_per_s_median, r.tok_per_s_min, r.tok_per_s_max);
    }
    if let Some(gb) = report.decode_gb_per_s {
        println!("decode streams {gb:.1} GB/s of weights");
    }
    if let (Some(bw), Some(mbu)) = (report.hbm_gb_per_s, report.mbu) {
        println!(
            "device copy bandwidth {bw:.0} GB/s (read + write, measured now): model-bandwidth utilization {:.1}%",
            100.0 * mbu
        );
    }
    if let Some(rss) = report.peak_rss_mib {
        println!("peak RSS {rss:.0} MiB");
    }
    Ok(())
}

/// The GPU's copy bandwidth (bytes/s), for the utilization figure; None on the CPU.
fn hbm_bandwidth(device: Device) -> Result<Option<f64>> {
    match device {
        Device::Cpu => Ok(None),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => Ok(Some(tern_core::cuda::copy_bandwidth(ordinal)?)),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => bail!("this tern was built without CUDA support: rebuild with `--features cuda`"),
    }
}

struct Run {
    time_to_first_token: Duration,
    /// From the first generated token to the last.
    decode_time: Duration,
}

/// One greedy request of fixed length, timed at the client side of the stream.
fn run_request(engine: &EngineHandle, prompt: Vec<u32>, max_tokens: usize) -> Result<Run> {
    let req =
        GenerateRequest { ignore_eos: true, ..GenerateRequest::new(prompt, max_tokens, SamplingParams::greedy()) };
    let start = Instant::now();
    let mut stream = engine.submit(req)?;
    let (mut first, mut last) = (None, start);
    loop {
        match stream.blocking_next() {
            Some(Event::Token { id: Some(_), .. }) => {
                last = Instant::now();
                first.get_or_insert(last);
            }
            Some(Event::Token { .. }) => {}
            Some(Event::Finished(_)) => break,
            Some(Event::Error(e)) => bail!("{e}"),
            None => bail!("the engine stopped unexpectedly"),
        }
    }
    let first = first.context("no token was generated")?;
    Ok(Run { time_to_first_token: first - start, decode_time: last - first })
}

/// Requests submitted together, each read on its own thread (so every token is timed when
/// it arrives): the time from the first token of the last sequence to start decoding to the
/// last token of all, during which every sequence of the batch is decoding.
fn run_batch(engine: &EngineHandle, prompts: Vec<Vec<u32>>, max_tokens: usize) -> Result<Duration> {
    let streams = prompts
        .into_iter()
        .map(|p| {
            let req =
                GenerateRequest { ignore_eos: true, ..GenerateRequest::new(p, max_tokens, SamplingParams::greedy()) };
            engine.submit(req).map_err(anyhow::Error::from)
        })
        .collect::<Result<Vec<_>>>()?;
    let spans = std::thread::scope(|s| {
        let readers: Vec<_> = streams
            .into_iter()
            .map(|mut stream| {
                s.spawn(move || -> Result<(Instant, Instant)> {
                    let mut span: Option<(Instant, Instant)> = None;
                    loop {
                        match stream.blocking_next() {
                            Some(Event::Token { id: Some(_), .. }) => {
                                let now = Instant::now();
                                span = Some((span.map_or(now, |(f, _)| f), now));
                            }
                            Some(Event::Token { .. }) => {}
                            Some(Event::Finished(_)) => break,
                            Some(Event::Error(e)) => bail!("{e}"),
                            None => bail!("the engine stopped unexpectedly"),
                        }
                    }
                    span.context("no token was generated")
                })
            })
            .collect();
        readers.into_iter().map(|r| r.join().expect("stream reader panicked")).collect::<Result<Vec<_>>>()
    })?;
    let start = spans.iter().map(|s| s.0).max().context("empty batch")?;
    let end = spans.iter().map(|s| s.1).max().context("empty batch")?;
    Ok(end - start)
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
