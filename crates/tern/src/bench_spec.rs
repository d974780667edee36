//! `tern bench spec`: speculative against plain decoding on the same prompts, in one process.
//! Each prompt runs alone (batch 1, the latency case speculation is for), first without then
//! with the configured proposer; reports end-to-end and decode tok/s, the speedup, acceptance,
//! and the proposer's time against the target's forward passes.

use crate::args::{EngineArgs, ModelArgs};
use crate::generate::encode_chat;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use tern_core::chat_template::ChatMessage;
use tern_core::engine::{EngineConfig, EngineHandle, Event};
use tern_core::generation::GenerateRequest;
use tern_core::model::Weights;
use tern_core::sampling::SamplingParams;
use tern_core::tokenizer::Tokenizer;

#[derive(Args, Debug)]
pub struct SpecBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The speculative settings under test (--speculative is required).
    #[command(flatten)]
    pub engine: EngineArgs,
    /// JSON lines, one prompt each: {"name": "...", "prompt": "..."} (as a user message with
    /// --chat) and optionally "max_tokens".
    #[arg(long)]
    pub prompts: PathBuf,
    /// Tokens to generate per prompt (unless the prompt says).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Wrap each prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// Sampling temperature (0: greedy, where both runs must give the same tokens).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub json: bool,
}

#[derive(Deserialize)]
struct PromptLine {
    name: String,
    prompt: String,
    max_tokens: Option<usize>,
}

#[derive(Serialize, Default, Clone)]
struct Run {
    tokens: usize,
    seconds: f64,
    decode_seconds: f64,
}

/// One mode's outputs, timings, and engine counter deltas (proposed, accepted, verifications,
/// proposer µs, forward µs).
struct ModeResult {
    outs: Vec<Vec<u32>>,
    runs: Vec<Run>,
    counters: [u64; 5],
}

#[derive(Serialize)]
struct Row {
    name: String,
    prompt_tokens: usize,
    plain: Run,
    speculative: Run,
    same_output: bool,
}

#[derive(Serialize)]
struct Report {
    model: String,
    proposer: String,
    num_speculative_tokens: usize,
    rows: Vec<Row>,
    plain_tok_per_s: f64,
    speculative_tok_per_s: f64,
    speedup: f64,
    plain_decode_tok_per_s: f64,
    speculative_decode_tok_per_s: f64,
    decode_speedup: f64,
    proposed_tokens: u64,
    accepted_tokens: u64,
    acceptance_rate: f64,
    verifications: u64,
    mean_accepted_per_verification: f64,
    propose_seconds: f64,
    target_forward_seconds: f64,
}

fn run_one(
    engine: &EngineHandle,
    prompt: &[u32],
    max_tokens: usize,
    params: &SamplingParams,
) -> Result<(Vec<u32>, Run)> {
    let req = GenerateRequest::new(prompt.to_vec(), max_tokens, params.clone());
    let start = Instant::now();
    let mut stream = engine.submit(req)?;
    let mut ids = Vec::new();
    let mut first = None;
    loop {
        match stream.blocking_next() {
            Some(Event::Token { id, .. }) => {
                first.get_or_insert_with(Instant::now);
                ids.extend(id);
            }
            Some(Event::Finished(_)) => break,
            Some(Event::Error(e)) => bail!("{e}"),
            None => bail!("the engine stopped unexpectedly"),
        }
    }
    let end = Instant::now();
    let first = first.unwrap_or(end);
    let run =
        Run { tokens: ids.len(), seconds: (end - start).as_secs_f64(), decode_seconds: (end - first).as_secs_f64() };
    Ok((ids, run))
}

pub fn run(a: SpecBenchArgs) -> Result<()> {
    if a.engine.speculative.is_none() {
        bail!("tern bench spec compares against plain decoding: give --speculative ngram|draft|early-exit");
    }
    let (weights, tok) = a.model.weights()?;
    let tok: Tokenizer = tok.context("this model has no tokenizer: bench spec needs one (see --tokenizer)")?;
    let text = std::fs::read_to_string(&a.prompts).with_context(|| format!("cannot read {}", a.prompts.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let p: PromptLine = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: expected {{\"name\", \"prompt\"}}", a.prompts.display(), i + 1))?;
        let ids = if a.chat {
            encode_chat(&tok, &[ChatMessage::new("user", &p.prompt)])?
        } else {
            tok.encode(&p.prompt, true)?
        };
        prompts.push((p.name, ids, p.max_tokens.unwrap_or(a.max_tokens)));
    }
    if prompts.is_empty() {
        bail!("{} holds no prompts", a.prompts.display());
    }
    let params = SamplingParams { temperature: a.temperature, seed: Some(0), ..Default::default() };
    params.validate()?;
    let threads = a.model.threads()?;
    let device = a.model.device()?;
    let spec_cfg = a.engine.config(threads, device, Some(&tok))?;
    let plain_cfg = EngineConfig { speculative: None, ..spec_cfg.clone() };
    let proposer = spec_cfg.speculative.as_ref().map(|s| format!("{:?}", s.proposer)).unwrap_or_default();
    let k = spec_cfg.speculative.as_ref().map_or(0, |s| s.num_tokens);

    let mut results: Vec<ModeResult> = Vec::new();
    for cfg in [plain_cfg, spec_cfg] {
        let engine = EngineHandle::start(clone_weights(&weights), Some(tok.clone()), cfg)?;
        // Warm-up (page the weights in, size the buffers).
        run_one(&engine, &prompts[0].1, 8, &params)?;
        let m = engine.metrics();
        let before = [m.spec_proposed_tokens.load(Relaxed), m.spec_accepted_tokens.load(Relaxed)];
        let before_v = m.spec_verifications.load(Relaxed);
        let (before_p, before_f) = (m.spec_propose_micros.load(Relaxed), m.forward_micros.load(Relaxed));
        let mut outs = Vec::new();
        let mut runs = Vec::new();
        for (_, ids, max_tokens) in &prompts {
            let (out, run) = run_one(&engine, ids, *max_tokens, &params)?;
            outs.push(out);
            runs.push(run);
        }
        let counters = [
            m.spec_proposed_tokens.load(Relaxed) - before[0],
            m.spec_accepted_tokens.load(Relaxed) - before[1],
            m.spec_verifications.load(Relaxed) - before_v,
            m.spec_propose_micros.load(Relaxed) - before_p,
            m.forward_micros.load(Relaxed) - before_f,
        ];
        results.push(ModeResult { outs, runs, counters });
    }
    let ModeResult { outs: spec_outs, runs: spec_runs, counters: c } = results.pop().expect("two runs");
    let ModeResult { outs: plain_outs, runs: plain_runs, .. } = results.pop().expect("two runs");
    let rows: Vec<Row> = prompts
        .iter()
        .enumerate()
        .map(|(i, (name, ids, _))| Row {
            name: name.clone(),
            prompt_tokens: ids.len(),
            plain: plain_runs[i].clone(),
            speculative: spec_runs[i].clone(),
            same_output: plain_outs[i] == spec_outs[i],
        })
        .collect();
    let rate = |runs: &[Run], decode: bool| {
        let toks: usize = runs.iter().map(|r| if decode { r.tokens.saturating_sub(1) } else { r.tokens }).sum();
        let secs: f64 = runs.iter().map(|r| if decode { r.decode_seconds } else { r.seconds }).sum();
        toks as f64 / secs.max(1e-9)
    };
    let (pt, st) = (rate(&plain_runs, false), rate(&spec_runs, false));
    let (pd, sd) = (rate(&plain_runs, true), rate(&spec_runs, true));
    let report = Report {
        model: a.model.model.clone(),
        proposer,
        num_speculative_tokens: k,
        plain_tok_per_s: pt,
        speculative_tok_per_s: st,
        speedup: st / pt,
        plain_decode_tok_per_s: pd,
        speculative_decode_tok_per_s: sd,
        decode_speedup: sd / pd,
        proposed_tokens: c[0],
        accepted_tokens: c[1],
        acceptance_rate: c[1] as f64 / (c[0] as f64).max(1.0),
        verifications: c[2],
        mean_accepted_per_verification: c[1] as f64 / (c[2] as f64).max(1.0),
        propose_seconds: c[3] as f64 / 1e6,
        target_forward_seconds: c[4] as f64 / 1e6,
        rows,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!("model {}, proposer {}, up to {} tokens per step", report.model, report.proposer, k);
    println!("| prompt | prompt tokens | tokens | plain tok/s | speculative tok/s | speedup | same output |");
    println!("|---|---|---|---|---|---|---|");
    for r in &report.rows {
        let (p, s) = (r.plain.tokens as f64 / r.plain.seconds, r.speculative.tokens as f64 / r.speculative.seconds);
        println!(
            "| {} | {} | {} | {p:.1} | {s:.1} | {:.2}× | {} |",
            r.name,
            r.prompt_tokens,
            r.speculative.tokens,
            s / p,
            if r.same_output { "yes" } else { "no" }
        );
    }
    println!(
        "end to end {pt:.1} → {st:.1} tok/s ({:.2}×); decode {pd:.1} → {sd:.1} tok/s ({:.2}×)",
        report.speedup, report.decode_speedup
    );
    println!(
        "accepted {}/{} proposed tokens ({:.1}%), {:.2} per verification pass over {} passes; proposer {:.2} s, target forward {:.2} s",
        c[1],
        c[0],
        100.0 * report.acceptance_rate,
        report.mean_accepted_per_verification,
        c[2],
        report.propose_seconds,
        report.target_forward_seconds
    );
    Ok(())
}

/// Host weights are shared (memory-mapped or reference-counted); dummy weights are remade.
fn clone_weights(w: &Weights) -> Weights {
    match w {
        Weights::Host(m) => Weights::Host(m.clone()),
        Weights::Dummy { config, dtype, seed } => Weights::Dummy { config: config.clone(), dtype: *dtype, seed: *seed },
    }
}
