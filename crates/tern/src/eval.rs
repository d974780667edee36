//! `tern eval`: quality measurements of a model. `perplexity` scores a text in non-overlapping
//! windows (the procedure is in tern_core::perplexity) on the CPU decoder: a scoring job needs
//! every position's logits, which the generation engine does not produce.

use crate::args::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;
use tern_core::model::decoder::Decoder;
use tern_core::model::kv_cache::KvDtype;
use tern_core::perplexity::{self, Perplexity};

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Perplexity on a text file (non-overlapping windows of --ctx tokens, all predictions scored).
    Perplexity(PerplexityArgs),
}

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text to score (e.g. data/botchan-eval.txt).
    #[arg(long)]
    text: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Score only the first N windows.
    #[arg(long)]
    max_windows: Option<usize>,
    /// Run on the weights dequantized to f32 (the reference's arithmetic) instead of the
    /// quantized kernels.
    #[arg(long)]
    dequantize: bool,
    /// Storage of the CPU KV cache: f32, f16, bf16, or int8 / fp8 (e4m3) with a scale per
    /// position and KV head.
    #[arg(long, default_value = "f32")]
    kv_cache_dtype: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Perplexity(a) => run_perplexity(a),
    }
}

fn run_perplexity(a: PerplexityArgs) -> Result<()> {
    if a.model.device()? != tern_core::engine::Device::Cpu {
        bail!("tern eval perplexity runs on the CPU (--device cpu)");
    }
    let kv = KvDtype::parse(&a.kv_cache_dtype)?;
    let bytes = std::fs::read(&a.text).with_context(|| format!("cannot read {}", a.text.display()))?;
    let text = String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", a.text.display()))?;
    let loaded = a.model.load()?;
    let tokenizer = match a.model.tokenizer.as_ref() {
        Some(_) => a.model.tokenizer()?,
        None => loaded.tokenizer,
    }
    .context("this model has no tokenizer (see --tokenizer)")?;
    let weights = if a.dequantize { loaded.weights.dequantized()? } else { loaded.weights };
    let max_context = weights.config.max_context;
    let mut decoder = Decoder::new(weights, a.model.threads()?)?;
    let tokens = perplexity::tokenize(&tokenizer, &text, a.ctx, max_context)?;
    let windows = perplexity::windows(&tokens, a.ctx, a.max_windows)?;
    let bos = if tokenizer.add_bos { tokenizer.bos } else { None };
    let bar = if a.json { ProgressBar::hidden() } else { ProgressBar::new(windows.len() as u64) };
    bar.set_style(
        ProgressStyle::with_template("scoring [{bar:30}] {pos}/{len} windows ({eta}) {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let t0 = Instant::now();
    let mut scores = Vec::with_capacity(windows.len());
    for w in &windows {
        scores.push(perplexity::score_window(&mut decoder, w, bos, kv)?);
        bar.set_message(format!("ppl {:.4}", Perplexity::from_windows(&scores).map_or(f64::NAN, |p| p.ppl)));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    let p = Perplexity::from_windows(&scores)?;
    let evaluated = windows.len() * (a.ctx + usize::from(bos.is_some()));
    let c = decoder.config();
    let kv_bytes_per_token = c.n_layers * 2 * kv.row_bytes(c.n_kv_heads, c.head_dim);
    if a.json {
        let out = serde_json::json!({
            "model": a.model.model,
            "text": a.text.display().to_string(),
            "ctx": a.ctx,
            "dequantized": a.dequantize,
            "kv_cache_dtype": kv.name(),
            "kv_bytes_per_token": kv_bytes_per_token,
            "add_bos": bos.is_some(),
            "text_tokens": tokens.len(),
            "windows": windows.len(),
            "tokens_scored": p.tokens_scored,
            "mean_nll": p.mean_nll,
            "ppl": p.ppl,
            "ppl_stderr": p.ppl_stderr,
            "seconds": seconds,
            "tokens_per_second": evaluated as f64 / seconds,
            "window_scores": scores.iter().map(|s| serde_json::json!([s.n, s.sum_nll, s.sum_sq_nll])).collect::<Vec<_>>(),
        });
        println!("{out}");
    } else {
        println!(
            "perplexity {:.4} ± {:.4} over {} tokens ({} windows of {}{}), {:.1} s ({:.0} tokens/s), KV cache {} ({} bytes per token)",
            p.ppl,
            p.ppl_stderr,
            p.tokens_scored,
            windows.len(),
            a.ctx,
            if bos.is_some() { " after BOS" } else { "" },
            seconds,
            evaluated as f64 / seconds,
            kv.name(),
            kv_bytes_per_token
        );
    }
    Ok(())
}
