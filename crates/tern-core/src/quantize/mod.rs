//! `tern quantize`: re-encodes the matrix products of a GGUF model's layers from their
//! dequantized (f32) values with a chosen method, and writes a GGUF file that tern and
//! llama.cpp load. Everything else (embedding, output head, norms, biases, tokenizer and
//! metadata) is copied as it was, so methods differ only in the layers' matrices.
//!
//! Methods and their stored encodings:
//! - `f32`, `f16`: the dequantized weights (the full-precision baseline and its f16 rounding);
//! - `int8`: per-output-channel symmetric int8 (one scale per row), as Q8_0 blocks (the CPU
//!   multiplies them with activations quantized per 32 values, as llama.cpp does);
//! - `w8a8`: the same int8 rows as I8 with f32 row scales (`<name>.scale`), multiplied with
//!   activations quantized per token (one scale per row of x): one integer dot per output;
//! - `fp8`: FP8 E4M3 codes (stored as I8; `tern.quantize.method` says so) with a scale per
//!   row or per tensor (`<name>.scale`);
//! - `llm-int8`: LLM.int8()'s mixed decomposition: input channels whose calibration
//!   activations reach the outlier threshold keep their weight columns in f32 (extra tensors
//!   `<name>.outlier_cols` / `.outlier_weight`), the rest is per-channel int8;
//! - `int4-rtn`, `gptq`, `awq`: group-wise asymmetric int4 with integer zero points, as Q4_1
//!   blocks (groups of `group` columns share their blocks' scale and min).

pub mod awq;
pub mod calib;
pub mod fp8;
pub mod gptq;
pub mod int4;
pub mod int8;
pub mod linalg;

use crate::gguf::{GgufFile, MetaValue};
use crate::gguf_write::OutTensor;
use crate::kernels::{DType, ThreadPool};
use crate::model::decoder::{Decoder, LinearInput};
use crate::model::weights::{Matrix, ModelWeights, Outliers};
use anyhow::{bail, Context, Result};
use std::borrow::Cow;
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    F32,
    F16,
    Int8,
    W8a8,
    LlmInt8,
    Fp8,
    Int4Rtn,
    Gptq,
    Awq,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::F32 => "f32",
            Method::F16 => "f16",
            Method::Int8 => "int8",
            Method::W8a8 => "w8a8",
            Method::LlmInt8 => "llm-int8",
            Method::Fp8 => "fp8",
            Method::Int4Rtn => "int4-rtn",
            Method::Gptq => "gptq",
            Method::Awq => "awq",
        }
    }

    pub fn bits(self) -> usize {
        match self {
            Method::F32 => 32,
            Method::F16 => 16,
            Method::Int8 | Method::W8a8 | Method::LlmInt8 | Method::Fp8 => 8,
            Method::Int4Rtn | Method::Gptq | Method::Awq => 4,
        }
    }

    pub fn needs_calibration(self) -> bool {
        matches!(self, Method::Gptq | Method::Awq | Method::LlmInt8)
    }

    fn dtype(self) -> DType {
        match self {
            Method::F32 => DType::F32,
            Method::F16 => DType::F16,
            Method::Int8 | Method::LlmInt8 => DType::Q8_0,
            Method::W8a8 => DType::I8,
            Method::Fp8 => DType::F8E4M3,
            Method::Int4Rtn | Method::Gptq | Method::Awq => DType::Q4_1,
        }
    }

    /// llama.cpp's general.file_type of a model whose layers are in this encoding (none for
    /// I8/FP8 layers, which llama.cpp has no file type for).
    fn file_type(self) -> Option<u32> {
        match self.dtype() {
            DType::F32 => Some(0),
            DType::F16 => Some(1),
            DType::Q4_1 => Some(3),
            DType::Q8_0 => Some(7),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub method: Method,
    /// Columns per int4 group (a multiple of 32).
    pub group: usize,
    pub damp: f64,
    /// GPTQ: columns by decreasing Hessian diagonal.
    pub act_order: bool,
    /// Rows of calibration activations AWQ searches its scales (and clipping ranges) on.
    pub awq_rows: usize,
    /// AWQ: also search a clipping range per (row, group) (`awq::clip`).
    pub awq_clip: bool,
    /// LLM.int8(): activation magnitude from which an input channel is an outlier.
    pub outlier_threshold: f32,
    /// FP8: one scale for the whole matrix instead of one per output row.
    pub fp8_per_tensor: bool,
}

impl Options {
    pub fn check(&self) -> Result<()> {
        if self.method.bits() == 4 && (self.group == 0 || !self.group.is_multiple_of(32)) {
            bail!("--group-size must be a positive multiple of 32 (Q4_1 blocks), got {}", self.group);
        }
        if self.outlier_threshold.is_nan() || self.outlier_threshold <= 0.0 {
            bail!("--outlier-threshold must be positive, got {}", self.outlier_threshold);
        }
        if !(0.0..1.0).contains(&self.damp) {
            bail!("--damp must be in [0, 1), got {}", self.damp);
        }
        Ok(())
    }
}

/// The stored encoding of one layer matrix and how close it is to the f32 weights.
pub struct Encoded {
    pub bytes: Vec<u8>,
    /// LLM.int8()'s f32 outlier columns.
    pub outliers: Option<Outliers>,
    /// W8A8/FP8: the scales of the stored rows (one per row, or one).
    pub row_scale: Option<Vec<f32>>,
    /// ‖Ŵ − W‖² / ‖W‖².
    pub rel_error: f64,
}

/// The input channels whose largest calibration |x| reaches `threshold`.
pub fn outlier_channels(abs_max: &[f32], threshold: f32) -> Vec<usize> {
    abs_max.iter().enumerate().filter(|(_, &m)| m >= threshold).map(|(c, _)| c).collect()
}

/// What `quantize` did, for the report.
#[derive(Default)]
pub struct Summary {
    pub matrices: usize,
    pub weights: usize,
    pub stored_bytes: usize,
    /// Weight-count-weighted mean of the matrices' relative errors.
    pub mean_rel_error: f64,
    /// AWQ's chosen α per (layer, input).
    pub awq_alphas: Vec<f32>,
    /// LLM.int8()'s outlier channels per (layer, matrix).
    pub outlier_channels: usize,
}

const LAYER_MATRICES: [(&str, LinearInput); 7] = [
    ("attn_q.weight", LinearInput::Attention),
    ("attn_k.weight", LinearInput::Attention),
    ("attn_v.weight", LinearInput::Attention),
    ("attn_output.weight", LinearInput::Output),
    ("ffn_gate.weight", LinearInput::Ffn),
    ("ffn_up.weight", LinearInput::Ffn),
    ("ffn_down.weight", LinearInput::Down),
];

fn f32s(m: &Matrix) -> Result<Vec<f32>> {
    let m = m.to_f32()?;
    Ok(m.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn rel_error(approx: &[f32], w: &[f32]) -> f64 {
    let num: f64 = approx.iter().zip(w).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = w.iter().map(|&b| (b as f64).powi(2)).sum();
    num / den.max(1e-30)
}

/// Encodes one matrix (rows × cols f32) with a method that needs no more than `hessian` (GPTQ)
/// or the outlier channels `outlier_cols` (LLM.int8()).
pub fn encode(
    w: &[f32],
    rows: usize,
    cols: usize,
    o: &Options,
    hessian: Option<&[f64]>,
    outlier_cols: &[usize],
) -> Result<Encoded> {
    let mut outliers = None;
    let mut row_scale = None;
    let (bytes, approx): (Vec<u8>, Vec<f32>) = match o.method {
        Method::F32 => (le_bytes(w), w.to_vec()),
        Method::F16 => {
            let h: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
            (h.iter().flat_map(|x| x.to_le_bytes()).collect(), h.iter().map(|x| x.to_f32()).collect())
        }
        Method::Int8 => {
            let b = int8::per_channel_q8_0(w, cols);
            let mut approx = vec![0f32; rows * cols];
            crate::kernels::dequantize_row(DType::Q8_0, &b, &mut approx)?;
            (b, approx)
        }
        Method::W8a8 => {
            let (q, s) = int8::per_channel_i8(w, cols);
            let approx = q.iter().enumerate().map(|(e, &b)| b as i8 as f32 * s[e / cols]).collect();
            row_scale = Some(s);
            (q, approx)
        }
        Method::Fp8 => {
            let (codes, s) = fp8::e4m3(w, cols, o.fp8_per_tensor);
            let approx = fp8::dequantize(&codes, &s, cols);
            row_scale = Some(s);
            (codes, approx)
        }
        Method::LlmInt8 => {
            let mut rest = w.to_vec();
            let mut kept = Vec::with_capacity(rows * outlier_cols.len());
            for r in 0..rows {
                for &c in outlier_cols {
                    kept.push(w[r * cols + c]);
                    rest[r * cols + c] = 0.0;
                }
            }
            let b = int8::per_channel_q8_0(&rest, cols);
            let mut approx = vec![0f32; rows * cols];
            crate::kernels::dequantize_row(DType::Q8_0, &b, &mut approx)?;
            for r in 0..rows {
                for (j, &c) in outlier_cols.iter().enumerate() {
                    approx[r * cols + c] = kept[r * outlier_cols.len() + j];
                }
            }
            if !outlier_cols.is_empty() {
                outliers = Some(Outliers { cols: outlier_cols.to_vec(), w: kept });
            }
            (b, approx)
        }
        Method::Int4Rtn | Method::Awq => {
            let q = int4::rtn(w, rows, cols, o.group);
            (q.to_q4_1(), q.dequantize())
        }
        Method::Gptq => {
            let h = hessian.context("gptq needs the layer's Hessian")?;
            let opts = gptq::GptqOptions { group: o.group, damp: o.damp, act_order: o.act_order };
            let q = gptq::gptq(w, rows, cols, h, opts)?;
            (q.to_q4_1(), q.dequantize())
        }
    };
    Ok(Encoded { rel_error: rel_error(&approx, w), bytes, outliers, row_scale })
}

/// The calibration a method needs.
pub fn wanted(o: &Options) -> calib::Wanted {
    calib::Wanted {
        hessian: o.method == Method::Gptq,
        sample_rows: if o.method == Method::Awq { o.awq_rows } else { 0 },
        abs_max: o.method == Method::LlmInt8,
    }
}

/// Runs the calibration windows through the f32 model.
pub fn calibrate(
    weights: &ModelWeights,
    windows: &[&[u32]],
    o: &Options,
    n_threads: usize,
    progress: impl FnMut(usize),
) -> Result<calib::Calibration> {
    let mut decoder = Decoder::new(weights.clone(), n_threads)?;
    let pool = ThreadPool::new(n_threads);
    calib::gather(&mut decoder, windows, wanted(o), &pool, progress)
}

/// The output tensors (in the source's order) and what was done. `weights` are the source's
/// weights dequantized to f32; `progress` gets (matrices done, total).
pub fn quantize<'a>(
    src: &'a GgufFile,
    weights: &ModelWeights,
    o: &Options,
    cal: Option<&calib::Calibration>,
    pool: &ThreadPool,
    mut progress: impl FnMut(usize, usize),
) -> Result<(Vec<OutTensor<'a>>, Summary)> {
    o.check()?;
    if o.method.needs_calibration() && cal.is_none() {
        bail!("{} needs calibration text (--calib)", o.method.name());
    }
    let mut replaced: HashMap<String, (DType, Vec<u8>)> = HashMap::new();
    // Extra tensors written after the one they belong to.
    let mut extra: HashMap<String, Vec<OutTensor<'a>>> = HashMap::new();
    let mut summary = Summary::default();
    let total = weights.layers.len() * LAYER_MATRICES.len();
    let mut err_sum = 0f64;
    for (li, l) in weights.layers.iter().enumerate() {
        // In LAYER_MATRICES order.
        let layer_mats = [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down];
        let mut mats: Vec<Vec<f32>> = layer_mats.iter().map(|m| f32s(m)).collect::<Result<_>>()?;
        let dims: Vec<(usize, usize)> = layer_mats.iter().map(|m| (m.rows, m.cols)).collect();
        let mut attn_norm = l.attn_norm.clone();
        let mut ffn_norm = l.ffn_norm.clone();
        if o.method == Method::Awq {
            let cal = cal.expect("checked above");
            // q, k, v share the attention norm's output; gate and up the FFN norm's; down reads
            // SiLU(gate)·up, so its scales fold into up's rows. (o is left unscaled: with grouped
            // KV heads, v's rows cannot carry one scale per o input channel.)
            // The scales of the attention, FFN and down inputs, in that order.
            let mut input_scales = Vec::with_capacity(3);
            for (which, idx) in [(LinearInput::Attention, &[0usize, 1, 2][..]), (LinearInput::Ffn, &[4, 5][..])] {
                let st = cal.get(li, which);
                let ws: Vec<&[f32]> = idx.iter().map(|&i| mats[i].as_slice()).collect();
                let (s, alpha) =
                    awq::search_scales(&st.sample, st.sample_rows(), st.width, &st.mean_abs(), &ws, o.group);
                summary.awq_alphas.push(alpha);
                for &i in idx {
                    let cols = dims[i].1;
                    mats[i].iter_mut().enumerate().for_each(|(e, v)| *v *= s[e % cols]);
                }
                let norm = if which == LinearInput::Attention { &mut attn_norm } else { &mut ffn_norm };
                norm.iter_mut().zip(&s).for_each(|(g, sv)| *g /= sv);
                input_scales.push(s);
            }
            let st = cal.get(li, LinearInput::Down);
            let (s, alpha) =
                awq::search_scales(&st.sample, st.sample_rows(), st.width, &st.mean_abs(), &[&mats[6]], o.group);
            summary.awq_alphas.push(alpha);
            let cols = dims[6].1;
            mats[6].iter_mut().enumerate().for_each(|(e, v)| *v *= s[e % cols]);
            let up_cols = dims[5].1;
            mats[5].iter_mut().enumerate().for_each(|(e, v)| *v /= s[e / up_cols]);
            input_scales.push(s);
            // The clipping search, on each matrix's inputs as its scaled weights see them (q and
            // k are left unclipped, as AutoAWQ does: clipping them hurts the attention scores).
            let clipped: &[(LinearInput, &[usize])] = if o.awq_clip {
                &[
                    (LinearInput::Attention, &[2]),
                    (LinearInput::Output, &[3]),
                    (LinearInput::Ffn, &[4, 5]),
                    (LinearInput::Down, &[6]),
                ]
            } else {
                &[]
            };
            for &(which, idx) in clipped {
                let st = cal.get(li, which);
                let scale = match which {
                    LinearInput::Attention => Some(&input_scales[0]),
                    LinearInput::Ffn => Some(&input_scales[1]),
                    LinearInput::Down => Some(&input_scales[2]),
                    LinearInput::Output => None,
                };
                let x: Vec<f32> = match scale {
                    Some(s) => st.sample.iter().enumerate().map(|(e, &v)| v / s[e % st.width]).collect(),
                    None => st.sample.clone(),
                };
                for &i in idx {
                    awq::clip(&mut mats[i], dims[i].1, o.group, &x, st.sample_rows(), pool);
                }
            }
            replaced.insert(format!("blk.{li}.attn_norm.weight"), (DType::F32, le_bytes(&attn_norm)));
            replaced.insert(format!("blk.{li}.ffn_norm.weight"), (DType::F32, le_bytes(&ffn_norm)));
        }
        for (i, (name, which)) in LAYER_MATRICES.iter().enumerate() {
            let (rows, cols) = dims[i];
            let h = match (o.method, cal) {
                (Method::Gptq, Some(c)) => Some(c.get(li, *which).hessian_f64()),
                _ => None,
            };
            let outlier_cols = match (o.method, cal) {
                (Method::LlmInt8, Some(c)) => outlier_channels(&c.get(li, *which).abs_max, o.outlier_threshold),
                _ => Vec::new(),
            };
            let mut e = encode(&mats[i], rows, cols, o, h.as_deref(), &outlier_cols)
                .with_context(|| format!("blk.{li}.{name}"))?;
            let stem = format!("blk.{li}.{}", name.trim_end_matches(".weight"));
            let f32_tensor = |n: String, dims: Vec<u64>, v: &[f32]| OutTensor {
                name: n,
                dims,
                dtype: DType::F32,
                data: Cow::Owned(le_bytes(v)),
            };
            let extras = extra.entry(format!("blk.{li}.{name}")).or_default();
            if let Some(out) = e.outliers.take() {
                summary.outlier_channels += out.cols.len();
                summary.stored_bytes += 4 * (out.w.len() + out.cols.len());
                let idx: Vec<f32> = out.cols.iter().map(|&c| c as f32).collect();
                let no = out.cols.len() as u64;
                extras.push(f32_tensor(format!("{stem}.outlier_cols"), vec![no], &idx));
                extras.push(f32_tensor(format!("{stem}.outlier_weight"), vec![no, rows as u64], &out.w));
            }
            if let Some(s) = e.row_scale.take() {
                summary.stored_bytes += 4 * s.len();
                extras.push(f32_tensor(format!("{stem}.scale"), vec![s.len() as u64], &s));
            }
            summary.matrices += 1;
            summary.weights += rows * cols;
            summary.stored_bytes += e.bytes.len();
            err_sum += e.rel_error * (rows * cols) as f64;
            replaced.insert(format!("blk.{li}.{name}"), (o.method.dtype(), e.bytes));
            progress(summary.matrices, total);
        }
    }
    summary.mean_rel_error = err_sum / summary.weights.max(1) as f64;
    let map = src.map();
    let mut out = Vec::with_capacity(src.tensors.len());
    for t in &src.tensors {
        let (dtype, data) = match replaced.remove(&t.name) {
            Some((dtype, bytes)) => (dtype, Cow::Owned(bytes)),
            None => (t.dtype, Cow::Borrowed(&map[t.offset..t.offset + t.n_bytes])),
        };
        out.push(OutTensor { name: t.name.clone(), dims: t.dims.clone(), dtype, data });
        out.extend(extra.remove(&t.name).unwrap_or_default());
    }
    if let Some(name) = replaced.keys().next() {
        bail!("the model has no tensor {name:?} to replace (not a GGUF llama/qwen2/mistral layout?)");
    }
    Ok((out, summary))
}

/// The source's metadata with the file type and tern's record of the method.
pub fn metadata(src: &GgufFile, o: &Options, calib_tokens: usize) -> Vec<(String, MetaValue)> {
    let mut meta: Vec<(String, MetaValue)> = src
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.file_type" && !k.starts_with("tern.quantize."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(t) = o.method.file_type() {
        meta.push(("general.file_type".into(), MetaValue::U32(t)));
    }
    meta.push(("tern.quantize.method".into(), MetaValue::String(o.method.name().into())));
    if o.method.bits() == 4 {
        meta.push(("tern.quantize.group_size".into(), MetaValue::U32(o.group as u32)));
    }
    if o.method.needs_calibration() {
        meta.push(("tern.quantize.calibration_tokens".into(), MetaValue::U64(calib_tokens as u64)));
    }
    if o.method == Method::Fp8 {
        let scale = if o.fp8_per_tensor { "tensor" } else { "channel" };
        meta.push(("tern.quantize.fp8_scale".into(), MetaValue::String(scale.into())));
    }
    if o.method == Method::Gptq {
        meta.push(("tern.quantize.damp".into(), MetaValue::F32(o.damp as f32)));
        meta.push(("tern.quantize.act_order".into(), MetaValue::Bool(o.act_order)));
    }
    meta
}

#[cfg(test)]
mod tests;
