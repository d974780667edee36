//! `tern quantize`: rewrites a GGUF model's layer matrices with a quantization method
//! (tern_core::quantize), calibrating on text where the method needs it.

use crate::args::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;
use tern_core::gguf::GgufFile;
use tern_core::model::{load_gguf, ModelSource};
use tern_core::quantize::{self, Method, Options};
use tern_core::tokenizer::Tokenizer;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MethodArg {
    /// The dequantized weights in f32 (the full-precision baseline).
    F32,
    /// The dequantized weights rounded to f16.
    F16,
    /// Per-output-channel symmetric int8 (stored as Q8_0; W8A16 in intent, the CPU kernel
    /// quantizes activations per 32 values as llama.cpp does).
    Int8,
    /// Per-output-channel int8 weights (I8 + f32 row scales) × int8 activations quantized per
    /// token: one integer dot per output.
    W8a8,
    /// FP8 E4M3 weights with a scale per output channel (or per tensor: --fp8-scale tensor).
    Fp8,
    /// LLM.int8(): outlier input channels (calibration |x| ≥ --outlier-threshold) in f32, the
    /// rest per-channel int8.
    LlmInt8,
    /// Group-wise asymmetric int4, round to nearest (stored as Q4_1).
    Int4Rtn,
    /// GPTQ int4 from calibration Hessians (stored as Q4_1).
    Gptq,
    /// AWQ activation-aware scales, then group-wise int4 (stored as Q4_1).
    Awq,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Fp8Scale {
    Channel,
    Tensor,
}

#[derive(Args)]
pub struct QuantizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, value_enum)]
    method: MethodArg,
    /// Bits per weight of the method (4 for int4-rtn/gptq/awq, 8 for int8/w8a8/llm-int8/fp8); a
    /// check only.
    #[arg(long)]
    bits: Option<usize>,
    /// Columns per int4 group (a multiple of 32).
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// Calibration text for gptq and awq (e.g. data/botchan-calib.txt; keep it apart from the
    /// evaluation text).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration windows of --calib-ctx tokens.
    #[arg(long, default_value_t = 16)]
    calib_windows: usize,
    #[arg(long, default_value_t = 512)]
    calib_ctx: usize,
    /// GPTQ damping, as a fraction of the Hessian's mean diagonal.
    #[arg(long, default_value_t = 0.1)]
    damp: f64,
    /// GPTQ: quantize columns in their stored order instead of by decreasing activation
    /// energy (act-order; on SmolLM2-135M the stored order lost to round-to-nearest).
    #[arg(long)]
    no_act_order: bool,
    /// AWQ: calibration rows per matrix input (spread over the windows) its clipping search
    /// measures the output error on; the scale search takes 128 of them.
    #[arg(long, default_value_t = 512)]
    awq_rows: usize,
    /// AWQ: also search a clipping range per row and group, as published (measured: SmolLM2-135M
    /// 42.6 -> 40.6 perplexity, Qwen2.5-0.5B 59.9 -> 63.7, so it is not the default).
    #[arg(long)]
    awq_clip: bool,
    /// LLM.int8(): the activation magnitude that makes an input channel an outlier.
    #[arg(long, default_value_t = 6.0)]
    outlier_threshold: f32,
    /// FP8 scale granularity: one per output channel, or one per tensor.
    #[arg(long, value_enum, default_value = "channel")]
    fp8_scale: Fp8Scale,
    /// Output .gguf file (written completely or not at all).
    #[arg(long, short = 'o')]
    out: PathBuf,
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len as u64);
    b.set_style(
        ProgressStyle::with_template(&format!("{what} [{{bar:30}}] {{pos}}/{{len}} ({{elapsed}}, eta {{eta}})"))
            .expect("valid template")
            .progress_chars("=> "),
    );
    b
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let method = match a.method {
        MethodArg::F32 => Method::F32,
        MethodArg::F16 => Method::F16,
        MethodArg::Int8 => Method::Int8,
        MethodArg::W8a8 => Method::W8a8,
        MethodArg::Fp8 => Method::Fp8,
        MethodArg::LlmInt8 => Method::LlmInt8,
        MethodArg::Int4Rtn => Method::Int4Rtn,
        MethodArg::Gptq => Method::Gptq,
        MethodArg::Awq => Method::Awq,
    };
    if let Some(b) = a.bits {
        if b != method.bits() {
            bail!(
                "--method {} quantizes to {} bits; --bits {b} is not supported with it",
                method.name(),
                method.bits()
            );
        }
    }
    if a.no_act_order && method != Method::Gptq {
        bail!("--no-act-order applies to --method gptq only");
    }
    if a.fp8_scale == Fp8Scale::Tensor && method != Method::Fp8 {
        bail!("--fp8-scale applies to --method fp8 only");
    }
    let o = Options {
        method,
        group: a.group_size,
        damp: a.damp,
        act_order: !a.no_act_order,
        awq_rows: a.awq_rows,
        awq_clip: a.awq_clip,
        outlier_threshold: a.outlier_threshold,
        fp8_per_tensor: a.fp8_scale == Fp8Scale::Tensor,
    };
    o.check()?;
    if method.needs_calibration() != a.calib.is_some() {
        bail!(
            "--calib is {} for --method {}",
            if method.needs_calibration() { "required" } else { "not used" },
            method.name()
        );
    }
    let ModelSource::Gguf(path) = a.model.source()? else { bail!("tern quantize reads GGUF models") };
    if a.out.canonicalize().ok() == path.canonicalize().ok() {
        bail!("--out would overwrite the input model");
    }
    let t0 = Instant::now();
    let src = GgufFile::open(&path)?;
    let weights = load_gguf::load(&src)?.dequantized()?;
    let threads = a.model.threads()?;

    let (cal, calib_tokens) = match &a.calib {
        Some(file) => {
            let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            let text = String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", file.display()))?;
            let tok = Tokenizer::from_gguf(&src)?;
            let ids = tok.encode(&text, false)?;
            let windows = tern_core::perplexity::windows(&ids, a.calib_ctx, Some(a.calib_windows))?;
            let b = bar(windows.len(), "calibrating");
            let cal = quantize::calibrate(&weights, &windows, &o, threads, |n| b.set_position(n as u64))?;
            b.finish_and_clear();
            (Some(cal), windows.len() * a.calib_ctx)
        }
        None => (None, 0),
    };
    let total = weights.layers.len() * 7;
    let b = bar(total, &format!("{:>11}", method.name()));
    let pool = tern_core::kernels::ThreadPool::new(threads);
    let (tensors, summary) =
        quantize::quantize(&src, &weights, &o, cal.as_ref(), &pool, |n, _| b.set_position(n as u64))?;
    b.finish_and_clear();
    let meta = quantize::metadata(&src, &o, calib_tokens);
    tern_core::gguf_write::write(&a.out, &meta, &tensors)?;
    let size = std::fs::metadata(&a.out)?.len();
    println!(
        "{}: {} layer matrices ({:.1}M weights) at {:.2} bits/weight stored, mean relative error {:.3e}{}",
        method.name(),
        summary.matrices,
        summary.weights as f64 / 1e6,
        summary.stored_bytes as f64 * 8.0 / summary.weights as f64,
        summary.mean_rel_error,
        if !summary.awq_alphas.is_empty() {
            format!(", AWQ α mean {:.2}", summary.awq_alphas.iter().sum::<f32>() / summary.awq_alphas.len() as f32)
        } else if method == Method::LlmInt8 {
            format!(", {} outlier channels over all matrices", summary.outlier_channels)
        } else {
            String::new()
        }
    );
    println!("wrote {} ({:.1} MB) in {:.1} s", a.out.display(), size as f64 / 1e6, t0.elapsed().as_secs_f64());
    Ok(())
}
