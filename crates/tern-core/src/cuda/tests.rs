//! GPU kernels against plain CPU references on random inputs, and the CUDA runner against the
//! CPU runner on the same weights. They need a GPU: without one each test prints why it is
//! skipped and passes (CI builds without the `cuda` feature and never compiles them).

use super::device::{DevBuf, Gpu};
use super::ops::{self, Act, AttnSplit, GemmOut, GpuMatrix, Kernels, KvLayout};
use super::runner::CudaRunner;
use crate::engine::runner::{CpuRunner, Row, Runner, StepOutput};
use crate::engine::{Device, EngineConfig, EngineHandle, Event, RequestStream};
use crate::generation::GenerateRequest;
use crate::kernels::{dequantize_row, DType};
use crate::model::config::ModelConfig;
use crate::model::decoder::{LogitsFor, SeqChunk};
use crate::model::weights::{Bytes, Matrix, ModelWeights};
use crate::rng::Rng;
use crate::sampling::SamplingParams;
use crate::speculative::{Proposer, SpeculativeConfig};
use half::{bf16, f16};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

fn gpu() -> Option<(Gpu, Kernels)> {
    match Gpu::open(0) {
        Ok(g) => {
            let k = Kernels::load(&g).expect("kernels load");
            Some((g, k))
        }
        Err(e) => {
            eprintln!("skipped: no CUDA GPU ({e:#})");
            None
        }
    }
}

fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * std).collect()
}

fn download_f32(g: &Gpu, b: &DevBuf, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    g.download(b, 0, &mut v).unwrap();
    v
}

/// n bf16 values, as f32.
fn download_bf16(g: &Gpu, b: &DevBuf, n: usize) -> Vec<f32> {
    let mut bits = vec![0u16; n];
    g.download(b, 0, &mut bits).unwrap();
    bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
}

/// ‖a − b‖ / ‖b‖, failing on NaN.
fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        assert!(x.is_finite(), "non-finite output {x}");
        num += (x as f64 - y).powi(2);
        den += y * y;
    }
    (num / den.max(1e-30)).sqrt()
}

/// A random host matrix in `dtype` with realistic scales, and its f32 values.
fn random_matrix(rng: &mut Rng, dtype: DType, rows: usize, cols: usize) -> (Matrix, Vec<f32>) {
    let rb = dtype.row_bytes(cols).unwrap();
    let mut bytes = vec![0u8; rows * rb];
    match dtype {
        DType::BF16 => {
            for c in bytes.chunks_exact_mut(2) {
                c.copy_from_slice(&bf16::from_f32(rng.normal() * 0.05).to_le_bytes());
            }
        }
        _ => {
            rng.fill_bytes(&mut bytes);
            let bb = dtype.block_bytes();
            for b in bytes.chunks_exact_mut(bb) {
                let s = (0.5 + rng.next_f32()) * 1e-2;
                match dtype {
                    DType::Q8_0 => b[0..2].copy_from_slice(&f16::from_f32(s * 0.1).to_le_bytes()),
                    DType::Q4_K => {
                        b[0..2].copy_from_slice(&f16::from_f32(s * 0.1).to_le_bytes());
                        b[2..4].copy_from_slice(&f16::from_f32(s * 0.05).to_le_bytes());
                    }
                    _ => unreachable!(),
                }
            }
        }
    }
    let m = Matrix::new(dtype, rows, cols, Bytes::Owned(Arc::new(bytes))).unwrap();
    let mut values = vec![0f32; rows * cols];
    for r in 0..rows {
        dequantize_row(dtype, &m.data()[r * rb..(r + 1) * rb], &mut values[r * cols..(r + 1) * cols]).unwrap();
    }
    (m, values)
}

/// q8 activations of dense rows as the kernels make them: per group of 32, d = max|x| / 127,
/// q = x / d rounded to nearest even; and the values they stand for (d · q).
fn q8_reference(x: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let (mut q, mut v) = (Vec::with_capacity(x.len()), Vec::with_capacity(x.len()));
    for grp in x.chunks_exact(32) {
        let amax = grp.iter().fold(0f32, |m, &a| m.max(a.abs()));
        let d = amax / 127.0;
        for &a in grp {
            let qi = if amax > 0.0 { (a / d).round_ties_even() as i8 } else { 0 };
            q.push(qi);
            v.push(d * qi as f32);
        }
    }
    (q, v)
}

/// Device buffers for q8 activations of `n` values.
fn q8_buffers(n: usize) -> (DevBuf, DevBuf, Act) {
    let (q, ds) = (DevBuf::alloc(n).unwrap(), DevBuf::alloc(8 * n / 32).unwrap());
    let act = Act::Q8 { q: q.ptr, ds: ds.ptr };
    (q, ds, act)
}

/// The int8 values and the (scale, scale · sum) pairs of q8 activations.
fn download_q8(g: &Gpu, q: &DevBuf, ds: &DevBuf, n: usize) -> (Vec<i8>, Vec<f32>) {
    let mut qv = vec![0i8; n];
    g.download(q, 0, &mut qv).unwrap();
    let dsv = download_f32(g, ds, 2 * n / 32);
    (qv, dsv)
}

/// Checks q8 activations against the reference quantization of `x`, sums included.
fn check_q8(g: &Gpu, q: &DevBuf, ds: &DevBuf, x: &[f32], what: &str) {
    let (qv, dsv) = download_q8(g, q, ds, x.len());
    let (want, _) = q8_reference(x);
    let diff = qv.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(diff, 0, "{what}: {diff} of {} int8 values differ from the reference", x.len());
    for (gi, grp) in want.chunks_exact(32).enumerate() {
        let sum: i32 = grp.iter().map(|&v| v as i32).sum();
        let (d, ds_sum) = (dsv[2 * gi], dsv[2 * gi + 1]);
        assert!((ds_sum - d * sum as f32).abs() <= 1e-6 * d.abs() * 4096.0, "{what}: group {gi} sum");
    }
}

fn upload(g: &Gpu, m: &Matrix) -> GpuMatrix {
    super::weights::upload_stacked(g, &[m]).unwrap()
}

#[test]
fn gemv_matches_reference() {
    let Some((g, k)) = gpu() else { return };
    let mut rng = Rng::new(1);
    // Wide matrices (four warps per row group where rows are long enough), and a tall one (a
    // warp per row group).
    for (dtype, rows, cols) in [
        (DType::BF16, 100, 2560),
        (DType::BF16, 9000, 256),
        (DType::Q8_0, 100, 2560),
        (DType::Q8_0, 100, 16384),
        (DType::Q8_0, 9000, 256),
        (DType::Q4_K, 100, 2560),
        (DType::Q4_K, 100, 16640),
        (DType::Q4_K, 9000, 256),
    ] {
        let (m, w) = random_matrix(&mut rng, dtype, rows, cols);
        let gm = upload(&g, &m);
        assert_eq!(gm.encoding(), dtype.name().to_ascii_lowercase(), "{dtype} stays in its encoding");
        for n in [1, 2, 3, 8] {
            for accumulate in [false, true] {
                // Inputs: n rows with a row stride wider than the row.
                let x = randn(&mut rng, n * 2 * cols, 1.0);
                let y0 = randn(&mut rng, n * rows, 1.0);
                let (xb, yb) = (g.buffer_from(&x).unwrap(), g.buffer_from(&y0).unwrap());
                // Quantized weights read q8 activations: quantized here from the strided rows,
                // so the reference multiplies the values the int8 codes stand for.
                let dense: Vec<f32> = (0..n).flat_map(|i| x[i * 2 * cols..i * 2 * cols + cols].to_vec()).collect();
                let (q, ds, q8) = q8_buffers(n * cols);
                let (input, xs) = if dtype == DType::BF16 {
                    (Act::F32 { x: xb.ptr, ld: 2 * cols }, dense)
                } else {
                    ops::quantize_q8(&g, &k, xb.ptr, 2 * cols, n, cols, q8).unwrap();
                    check_q8(&g, &q, &ds, &dense, "quantize_q8");
                    (q8, q8_reference(&dense).1)
                };
                ops::gemv(&g, &k, &gm, input, n, yb.ptr, rows, accumulate).unwrap();
                let got = download_f32(&g, &yb, n * rows);
                let want: Vec<f64> = (0..n * rows)
                    .map(|e| {
                        let (i, r) = (e / rows, e % rows);
                        let dot: f64 = (0..cols).map(|j| w[r * cols + j] as f64 * xs[i * cols + j] as f64).sum();
                        dot + if accumulate { y0[e] as f64 } else { 0.0 }
                    })
                    .collect();
                let e = rel_err(&got, &want);
                assert!(e < 2e-5, "{dtype} {rows}x{cols} gemv n={n} accumulate={accumulate}: error {e:.2e}");
            }
        }
    }
}

#[test]
fn gemm_matches_reference() {
    let Some((g, k)) = gpu() else { return };
    let mut rng = Rng::new(2);
    for dtype in [DType::BF16, DType::Q8_0, DType::Q4_K] {
        let (rows, cols, n) = (96, 512, 37);
        let (m, w) = random_matrix(&mut rng, dtype, rows, cols);
        let gm = upload(&g, &m);
        let a: Vec<f32> = randn(&mut rng, n * cols, 1.0).iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let a16: Vec<u16> = a.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let c0 = randn(&mut rng, n * rows, 1.0);
        let (ab, cb) = (g.buffer_from(&a16).unwrap(), g.buffer_from(&c0).unwrap());
        let scratch = DevBuf::alloc(2 * rows * cols).unwrap();
        ops::gemm(&g, &k, &gm, ab.ptr, n, GemmOut::F32 { c: cb.ptr, beta: 1.0 }, &scratch).unwrap();
        let got = download_f32(&g, &cb, n * rows);
        let c16 = DevBuf::alloc(2 * n * rows).unwrap();
        ops::gemm(&g, &k, &gm, ab.ptr, n, GemmOut::Bf16(c16.ptr), &scratch).unwrap();
        let got16 = download_bf16(&g, &c16, n * rows);
        // The GEMM reads weights rounded to bf16.
        let wb: Vec<f64> = w.iter().map(|&v| bf16::from_f32(v).to_f32() as f64).collect();
        let want: Vec<f64> = (0..n * rows)
            .map(|e| {
                let (i, r) = (e / rows, e % rows);
                c0[e] as f64 + (0..cols).map(|j| wb[r * cols + j] * a[i * cols + j] as f64).sum::<f64>()
            })
            .collect();
        let e = rel_err(&got, &want);
        assert!(e < 1e-4, "{dtype} gemm: error {e:.2e}");
        // The bf16 output: the product alone (no beta), rounded.
        let prod: Vec<f64> = want.iter().zip(&c0).map(|(w, &c)| w - c as f64).collect();
        let e = rel_err(&got16, &prod);
        assert!(e < 5e-3, "{dtype} gemm into bf16: error {e:.2e}");
    }
}

#[test]
fn rms_norm_and_silu_match_reference() {
    let Some((g, k)) = gpu() else { return };
    let mut rng = Rng::new(3);
    let (n, d) = (5, 576);
    let x = randn(&mut rng, n * d, 2.0);
    let w = randn(&mut rng, d, 1.0);
    let rows: Vec<i32> = vec![4, 0, 2];
    let (xb, wb, rb) = (g.buffer_from(&x).unwrap(), g.buffer_from(&w).unwrap(), g.buffer_from(&rows).unwrap());
    let out = DevBuf::alloc(4 * n * d).unwrap();
    let f32_out = Act::F32 { x: out.ptr, ld: d };
    ops::rms_norm(&g, &k, xb.ptr, wb.ptr, Some(rb.ptr), f32_out, rows.len(), d, 1e-6).unwrap();
    let got = download_f32(&g, &out, rows.len() * d);
    // The q8 output is the quantization of the f32 output.
    let (q, ds, q8) = q8_buffers(rows.len() * d);
    ops::rms_norm(&g, &k, xb.ptr, wb.ptr, Some(rb.ptr), q8, rows.len(), d, 1e-6).unwrap();
    check_q8(&g, &q, &ds, &got, "rms_norm into q8");
    let mut want = Vec::new();
    for &r in &rows {
        let xr = &x[r as usize * d..(r as usize + 1) * d];
        let inv = 1.0 / (xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64 + 1e-6).sqrt();
        want.extend(xr.iter().zip(&w).map(|(&v, &wv)| v as f64 * inv * wv as f64));
    }
    assert!(rel_err(&got, &want) < 1e-6, "rms_norm");
    // SiLU · up, into f32 and into bf16.
    let f = 300;
    let gu = randn(&mut rng, n * 2 * f, 2.0);
    let gub = g.buffer_from(&gu).unwrap();
    let want: Vec<f64> = (0..n * f)
        .map(|e| {
            let (i, j) = (e / f, e % f);
            let gt = gu[i * 2 * f + j] as f64;
            gt / (1.0 + (-gt).exp()) * gu[i * 2 * f + f + j] as f64
        })
        .collect();
    let act = DevBuf::alloc(4 * n * f).unwrap();
    let gu_f32 = Act::F32 { x: gub.ptr, ld: 2 * f };
    ops::silu_mul(&g, &k, gu_f32, Act::F32 { x: act.ptr, ld: f }, n, f).unwrap();
    assert!(rel_err(&download_f32(&g, &act, n * f), &want) < 1e-5, "silu_mul (f32 output)");
    let strided = Act::F32 { x: gub.ptr, ld: f };
    assert!(ops::silu_mul(&g, &k, strided, Act::F32 { x: act.ptr, ld: f }, n, f).is_err(), "strided input refused");
    // bf16 input (the GEMM's output): the same function of the rounded values.
    let gu16: Vec<u16> = gu.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    let gu16b = g.buffer_from(&gu16).unwrap();
    ops::silu_mul(&g, &k, Act::Bf16(gu16b.ptr), Act::F32 { x: act.ptr, ld: f }, n, f).unwrap();
    let want16: Vec<f64> = (0..n * f)
        .map(|e| {
            let (i, j) = (e / f, e % f);
            let r = |v: f32| bf16::from_f32(v).to_f32() as f64;
            let gt = r(gu[i * 2 * f + j]);
            gt / (1.0 + (-gt).exp()) * r(gu[i * 2 * f + f + j])
        })
        .collect();
    assert!(rel_err(&download_f32(&g, &act, n * f), &want16) < 1e-5, "silu_mul (bf16 input)");
    // bf16 in and out with rows of a multiple of 8 (eight values per thread): as the scalar path.
    let f8 = 320;
    let gu8: Vec<u16> = randn(&mut rng, n * 2 * f8, 2.0).iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    let gu8b = g.buffer_from(&gu8).unwrap();
    let (act8, act8_ref) = (DevBuf::alloc(2 * n * f8).unwrap(), DevBuf::alloc(4 * n * f8).unwrap());
    ops::silu_mul(&g, &k, Act::Bf16(gu8b.ptr), Act::Bf16(act8.ptr), n, f8).unwrap();
    ops::silu_mul(&g, &k, Act::Bf16(gu8b.ptr), Act::F32 { x: act8_ref.ptr, ld: f8 }, n, f8).unwrap();
    let rounded: Vec<f64> =
        download_f32(&g, &act8_ref, n * f8).iter().map(|&v| bf16::from_f32(v).to_f32() as f64).collect();
    assert!(rel_err(&download_bf16(&g, &act8, n * f8), &rounded) < 1e-6, "silu_mul, eight bf16 per thread");
    // q8 output (rows of a multiple of 32): the quantization of the f32 output.
    let (q, ds, q8) = q8_buffers(n * 320);
    let gu320 = randn(&mut rng, n * 2 * 320, 2.0);
    let gu320b = g.buffer_from(&gu320).unwrap();
    let act320 = DevBuf::alloc(4 * n * 320).unwrap();
    let gu320_in = Act::F32 { x: gu320b.ptr, ld: 640 };
    ops::silu_mul(&g, &k, gu320_in, Act::F32 { x: act320.ptr, ld: 320 }, n, 320).unwrap();
    ops::silu_mul(&g, &k, gu320_in, q8, n, 320).unwrap();
    check_q8(&g, &q, &ds, &download_f32(&g, &act320, n * 320), "silu_mul into q8");
    assert!(ops::silu_mul(&g, &k, gu_f32, q8, n, f).is_err(), "q8 rows of 300 values are refused");
    ops::silu_mul(&g, &k, gu_f32, Act::Bf16(act.ptr), n, f).unwrap();
    let got = download_bf16(&g, &act, n * f);
    assert!(rel_err(&got, &want) < 5e-3, "silu_mul (bf16 output)");
}

#[test]
fn argmax_picks_the_first_maximum() {
    let Some((g, k)) = gpu() else { return };
    let mut rng = Rng::new(4);
    let (n, vocab) = (6, 50_000);
    let mut logits = randn(&mut rng, n * vocab, 3.0);
    // Row 1: a tie between two late maxima; row 2: all equal; row 3: a NaN before the max.
    logits[vocab + 40_000] = 100.0;
    logits[vocab + 45_000] = 100.0;
    logits[2 * vocab..3 * vocab].fill(0.5);
    logits[3 * vocab + 7] = f32::NAN;
    let lb = g.buffer_from(&logits).unwrap();
    let out = DevBuf::alloc(4 * n).unwrap();
    ops::argmax_rows(&g, &k, lb.ptr, n, vocab, out.ptr).unwrap();
    let mut got = vec![0i32; n];
    g.download(&out, 0, &mut got).unwrap();
    for i in 0..n {
        let want = crate::sampling::argmax(&logits[i * vocab..(i + 1) * vocab]);
        assert_eq!(got[i] as u32, want, "row {i}");
    }
}

/// Host reference of rotary embedding (halves style) at position p.
fn rope_ref(x: &mut [f64], hd: usize, p: usize, inv_freq: &[f32]) {
    let half = hd / 2;
    for head in x.chunks_exact_mut(hd) {
        for (i, &f) in inv_freq.iter().enumerate() {
            let a = (p as f32 * f) as f64;
            let (x0, x1) = (head[i], head[i + half]);
            head[i] = x0 * a.cos() - x1 * a.sin();
            head[i + half] = x0 * a.sin() + x1 * a.cos();
        }
    }
}

#[test]
fn attention_over_paged_kv_matches_reference() {
    let Some((g, k)) = gpu() else { return };
    let mut rng = Rng::new(5);
    // (query heads, KV heads, head dim, sliding window, forced (keys per split, splits)):
    // 16 splits of at least 32 keys leave some splits empty for the shorter sequence. Forced
    // splits run with one query head per block and with a KV head's whole group.
    for &(nh, nkv, hd, window, split) in &[
        (4, 2, 16, 0, None),
        (9, 3, 64, 0, Some((64, 5))),
        (28, 4, 128, 0, None),
        (28, 4, 128, 0, Some((128, 3))),
        (28, 4, 128, 0, Some((32, 16))),
        (8, 8, 64, 50, Some((64, 5))),
        (16, 1, 256, 0, Some((32, 2))),
        (8, 1, 32, 0, None),
    ] {
        let bs = 16;
        let (qd, kvd) = (nh * hd, nkv * hd);
        let ld = qd + 2 * kvd;
        // Two sequences with contexts of 300 and 41 positions; every position is written, then
        // the last 3 tokens of the first and the last token of the second attend.
        let lens = [300usize, 41];
        let n_blocks = 64;
        let mut perm: Vec<u32> = (0..n_blocks as u32).collect();
        for i in (1..perm.len()).rev() {
            perm.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let tables: Vec<Vec<u32>> = {
            let mut it = perm.iter().copied();
            lens.iter().map(|&l| (0..l.div_ceil(bs)).map(|_| it.next().unwrap()).collect()).collect()
        };
        let n_layers = 1;
        let layout =
            KvLayout { n_heads: nh, n_kv: nkv, head_dim: hd, block_size: bs, block_stride: n_layers * 2 * bs * kvd };
        let kv = DevBuf::alloc(2 * n_blocks * layout.block_stride).unwrap();
        let inv_freq: Vec<f32> = (0..hd / 2).map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / hd as f32)).collect();
        let (cos_t, sin_t) = ops::rope_tables(&g, &inv_freq, 300).unwrap();
        // Write all positions (one token per position) through rope_kv_write.
        let mut tok_seq = Vec::new();
        let mut tok_pos = Vec::new();
        let mut slot = Vec::new();
        for (s, &l) in lens.iter().enumerate() {
            for p in 0..l {
                tok_seq.push(s as i32);
                tok_pos.push(p as i32);
                slot.push((tables[s][p / bs] as usize * bs + p % bs) as i32);
            }
        }
        let n_all = tok_pos.len();
        let qkv = randn(&mut rng, n_all * ld, 1.0);
        let bias = randn(&mut rng, ld, 0.1);
        let qkvb = g.buffer_from(&qkv).unwrap();
        let (biasb, posb, slotb) =
            (g.buffer_from(&bias).unwrap(), g.buffer_from(&tok_pos).unwrap(), g.buffer_from(&slot).unwrap());
        ops::rope_kv_write(
            &g,
            &k,
            qkvb.ptr,
            Some(biasb.ptr),
            (cos_t.ptr, sin_t.ptr),
            posb.ptr,
            slotb.ptr,
            kv.ptr,
            &layout,
            0,
            n_all,
        )
        .unwrap();
        let rotated = download_f32(&g, &qkvb, n_all * ld);
        // Reference rotation of q and k, bf16 rounding of the cached k and v.
        let mut refq = Vec::with_capacity(n_all * qd);
        let mut refk = Vec::with_capacity(n_all * kvd);
        let mut refv = Vec::with_capacity(n_all * kvd);
        for t in 0..n_all {
            let row: Vec<f64> = (0..ld).map(|j| qkv[t * ld + j] as f64 + bias[j] as f64).collect();
            let (mut q, mut kk) = (row[..qd].to_vec(), row[qd..qd + kvd].to_vec());
            rope_ref(&mut q, hd, tok_pos[t] as usize, &inv_freq);
            rope_ref(&mut kk, hd, tok_pos[t] as usize, &inv_freq);
            refq.extend(q);
            refk.extend(kk.iter().map(|&v| bf16::from_f32(v as f32).to_f32() as f64));
            refv.extend(row[qd + kvd..].iter().map(|&v| bf16::from_f32(v as f32).to_f32() as f64));
        }
        let got_q: Vec<f32> = (0..n_all).flat_map(|t| rotated[t * ld..t * ld + qd].to_vec()).collect();
        assert!(rel_err(&got_q, &refq) < 1e-5, "rope of q (hd {hd})");
        // Queries: the last 3 positions of sequence 0, the last of sequence 1 (rows of qkv).
        let queries = [lens[0] - 3, lens[0] - 2, lens[0] - 1, lens[0] + lens[1] - 1];
        let qrows: Vec<f32> = queries.iter().flat_map(|&t| rotated[t * ld..(t + 1) * ld].to_vec()).collect();
        let qb = g.buffer_from(&qrows).unwrap();
        let qs: Vec<i32> = queries.iter().map(|&t| tok_seq[t]).collect();
        let qp: Vec<i32> = queries.iter().map(|&t| tok_pos[t]).collect();
        let stride = tables.iter().map(|t| t.len()).max().unwrap();
        let flat: Vec<i32> =
            tables.iter().flat_map(|t| (0..stride).map(|j| t.get(j).copied().unwrap_or(0) as i32)).collect();
        let (qsb, qpb, tb) = (g.buffer_from(&qs).unwrap(), g.buffer_from(&qp).unwrap(), g.buffer_from(&flat).unwrap());
        let n = queries.len();
        let first = [0usize, lens[0]];
        // Reference attention output (all heads) of query token t.
        let reference = |t: usize| -> Vec<f64> {
            let mut want = vec![0f64; qd];
            let (sq, p) = (tok_seq[t] as usize, tok_pos[t] as usize);
            let start = if window > 0 { (p + 1).saturating_sub(window) } else { 0 };
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let q = &refq[t * qd + h * hd..t * qd + (h + 1) * hd];
                let scores: Vec<f64> = (start..=p)
                    .map(|j| {
                        let kr = &refk[(first[sq] + j) * kvd + kvh * hd..][..hd];
                        q.iter().zip(kr).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (jj, j) in (start..=p).enumerate() {
                    let vr = &refv[(first[sq] + j) * kvd + kvh * hd..][..hd];
                    for dd in 0..hd {
                        want[h * hd + dd] += e[jj] / sum * vr[dd];
                    }
                }
            }
            want
        };
        let plans = match split {
            Some((split, n_splits)) => {
                vec![AttnSplit { split, n_splits, heads: 1 }, AttnSplit { split, n_splits, heads: nh / nkv }]
            }
            None => vec![ops::attn_split(&layout, n, 300, 264, 1024)],
        };
        for s in plans {
            let out = DevBuf::alloc(4 * n * qd).unwrap();
            let part_o = DevBuf::alloc(4 * n * s.n_splits * qd).unwrap();
            let part_ml = DevBuf::alloc(4 * n * s.n_splits * nh * 2).unwrap();
            let run = |out: Act| {
                ops::attention(
                    &g,
                    &k,
                    &layout,
                    qb.ptr,
                    ld,
                    kv.ptr,
                    tb.ptr,
                    stride,
                    qsb.ptr,
                    qpb.ptr,
                    None,
                    window,
                    n,
                    s,
                    out,
                    (part_o.ptr, part_ml.ptr),
                )
            };
            run(Act::F32 { x: out.ptr, ld: qd }).unwrap();
            let got = download_f32(&g, &out, n * qd);
            let want: Vec<f64> = queries.iter().flat_map(|&t| reference(t)).collect();
            let e = rel_err(&got, &want);
            assert!(e < 1e-4, "attention heads {nh}/{nkv} hd {hd} window {window} split {s:?}: error {e:.2e}");
            // Written as bf16 (the GEMM input): the f32 result, rounded.
            let out16 = DevBuf::alloc(2 * n * qd).unwrap();
            run(Act::Bf16(out16.ptr)).unwrap();
            let rounded: Vec<f64> = got.iter().map(|&v| bf16::from_f32(v).to_f32() as f64).collect();
            let e = rel_err(&download_bf16(&g, &out16, n * qd), &rounded);
            assert!(e < 1e-5, "attention bf16 output, hd {hd} split {s:?}: error {e:.2e}");
            // Written as q8 where the kernels can: exactly the quantization of the f32 result.
            let (q, ds, q8) = q8_buffers(n * qd);
            if ops::attention_writes_q8(&layout, &s) {
                run(q8).unwrap();
                check_q8(&g, &q, &ds, &got, &format!("attention q8 output, hd {hd} split {s:?}"));
            } else {
                assert!(run(q8).is_err(), "q8 output refused where the kernels cannot write it ({s:?})");
            }
            // The same queries picked by a token list from the whole batch (outputs at their rows).
            let list: Vec<i32> = queries.iter().map(|&t| t as i32).collect();
            let (lb, seqb) = (g.buffer_from(&list).unwrap(), g.buffer_from(&tok_seq).unwrap());
            let out_rows = DevBuf::alloc(4 * n_all * qd).unwrap();
            ops::attention(
                &g,
                &k,
                &layout,
                qkvb.ptr,
                ld,
                kv.ptr,
                tb.ptr,
                stride,
                seqb.ptr,
                posb.ptr,
                Some(lb.ptr),
                window,
                n,
                s,
                Act::F32 { x: out_rows.ptr, ld: qd },
                (part_o.ptr, part_ml.ptr),
            )
            .unwrap();
            let all = download_f32(&g, &out_rows, n_all * qd);
            let got: Vec<f32> = queries.iter().flat_map(|&t| all[t * qd..(t + 1) * qd].to_vec()).collect();
            assert!(rel_err(&got, &want) < 1e-4, "attention through a token list");
        }

        // The tensor-core prefill kernel: every position of both sequences as a query, in
        // tiles of up to 64 tokens (bf16 queries and probabilities: a looser tolerance).
        if !ops::has_prefill_attention(hd) {
            continue;
        }
        let mut tiles: Vec<i32> = Vec::new();
        for (sq, &l) in lens.iter().enumerate() {
            for p0 in (0..l).step_by(ops::PREFILL_TILE) {
                let len = (l - p0).min(ops::PREFILL_TILE);
                tiles.extend([(first[sq] + p0) as i32, len as i32, sq as i32, p0 as i32]);
            }
        }
        let tb2 = g.buffer_from(&tiles).unwrap();
        let prefill = |out: Act| {
            ops::attention_prefill(
                &g,
                &k,
                &layout,
                qkvb.ptr,
                ld,
                kv.ptr,
                tb.ptr,
                stride,
                tb2.ptr,
                tiles.len() / 4,
                window,
                out,
            )
            .unwrap()
        };
        let out_all = g.buffer_from(&vec![f32::NAN; n_all * qd]).unwrap();
        prefill(Act::F32 { x: out_all.ptr, ld: qd });
        let got = download_f32(&g, &out_all, n_all * qd);
        let want: Vec<f64> = (0..n_all).flat_map(reference).collect();
        let e = rel_err(&got, &want);
        assert!(e < 1e-2, "prefill attention heads {nh}/{nkv} hd {hd} window {window}: error {e:.2e}");
        // bf16 output: the f32 output, rounded.
        let out16 = DevBuf::alloc(2 * n_all * qd).unwrap();
        prefill(Act::Bf16(out16.ptr));
        let rounded: Vec<f64> = got.iter().map(|&v| bf16::from_f32(v).to_f32() as f64).collect();
        let e = rel_err(&download_bf16(&g, &out16, n_all * qd), &rounded);
        assert!(e < 1e-5, "prefill attention bf16 output, hd {hd}: error {e:.2e}");
    }
}

/// A small config in Hugging Face form.
fn config(json: &str) -> ModelConfig {
    ModelConfig::from_hf_json(json).unwrap()
}

fn smollm2_shape() -> ModelConfig {
    config(
        r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":576,"intermediate_size":1536,
        "num_hidden_layers":4,"num_attention_heads":9,"num_key_value_heads":3,"vocab_size":49152,
        "max_position_embeddings":2048,"rms_norm_eps":1e-5,"rope_theta":100000.0,"tie_word_embeddings":true}"#,
    )
}

fn qwen_shape() -> ModelConfig {
    config(
        r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","hidden_size":896,"intermediate_size":4864,
        "num_hidden_layers":3,"num_attention_heads":14,"num_key_value_heads":2,"vocab_size":4096,
        "max_position_embeddings":4096,"rms_norm_eps":1e-6,"rope_theta":1000000.0,"tie_word_embeddings":true}"#,
    )
}

fn engine_config(device: Device) -> EngineConfig {
    EngineConfig {
        kv_cache_memory: Some(64 << 20),
        max_num_seqs: 8,
        max_num_batched_tokens: 256,
        n_threads: 2,
        device,
        // Room for the verification rows of `compare_runners`.
        speculative: Some(SpeculativeConfig {
            proposer: Proposer::Ngram { min_n: 1, max_n: 3, per_match: 0 },
            num_tokens: VERIFY_EVERY,
            adaptive: false,
            draft_vocab: None,
        }),
        ..EngineConfig::default()
    }
}

/// Every this many steps of `compare_runners`, each sequence runs a verification chunk.
const VERIFY_EVERY: usize = 4;

/// Teacher-forced comparison: both runners see the same tokens (the CPU's greedy choices);
/// logits must agree within `tol.0` (prefill step) and `tol.1` (decode steps), relative to the
/// largest logit, and the GPU's greedy token must equal the CPU's wherever the CPU's top-2 gap
/// exceeds twice that step's error. Four sequences run together (prefill chunks in one step,
/// then batched decode, replayed from a CUDA graph on the GPU); every `VERIFY_EVERY`-th step
/// is a speculative verification: sequence s runs its last token and s + 1 proposed (random)
/// tokens with logits at every position, all of which it then keeps.
fn compare_runners(name: &str, weights: ModelWeights, tol: (f32, f32), failures: &mut Vec<String>) {
    let cfg = engine_config(Device::Cpu);
    let vocab = weights.config.vocab_size;
    let mut cpu = CpuRunner::new(weights.clone(), &cfg).unwrap();
    let mut gpu = match CudaRunner::new(weights.into(), &engine_config(Device::Cuda(0)), 0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("skipped: {e:#}");
            return;
        }
    };
    let mut rng = Rng::new(9);
    let n_seq = 4;
    let prompts: Vec<Vec<u32>> =
        (0..n_seq).map(|s| (0..20 + 7 * s).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()).collect();
    let steps: usize = 33;
    let bs = cfg.block_size;
    let blocks_per = (60 + steps + (steps / VERIFY_EVERY) * n_seq).div_ceil(bs);
    let tables: Vec<Vec<u32>> =
        (0..n_seq).map(|s| (0..blocks_per).map(|b| (s * blocks_per + b) as u32).collect()).collect();
    let mut seqs = prompts.clone();
    let mut computed = vec![0usize; n_seq];
    let (mut worst, mut agreed, mut compared) = ([0f32; 2], 0usize, 0usize);
    for step in 0..steps {
        let verifying = step > 0 && step % VERIFY_EVERY == 0;
        if verifying {
            for (s, seq) in seqs.iter_mut().enumerate() {
                seq.extend((0..=s).map(|_| (rng.next_u64() % vocab as u64) as u32));
            }
        }
        let which = if verifying { LogitsFor::All } else { LogitsFor::Last };
        let chunks: Vec<SeqChunk> = (0..n_seq)
            .map(|s| SeqChunk { seq: s, tokens: &seqs[s][computed[s]..], pos0: computed[s], logits: Some(which) })
            .collect();
        let n_rows: Vec<usize> = chunks.iter().map(|c| if verifying { c.tokens.len() } else { 1 }).collect();
        let total_rows: usize = n_rows.iter().sum();
        let table_refs: Vec<&[u32]> = tables.iter().map(|t| t.as_slice()).collect();
        let mut out_c = StepOutput::default();
        cpu.forward(&chunks, &table_refs, &[false; 4], &mut out_c).unwrap();
        let mut out_g = StepOutput::default();
        gpu.forward(&chunks, &table_refs, &[false; 4], &mut out_g).unwrap();
        let mut out_greedy = StepOutput::default();
        // The same step again on the GPU with device-side greedy picks (rewrites the same KV).
        gpu.forward(&chunks, &table_refs, &[true; 4], &mut out_greedy).unwrap();
        for (what, out) in [("CPU", &out_c), ("GPU", &out_g), ("GPU greedy", &out_greedy)] {
            assert_eq!(out.rows.len(), total_rows, "{name}: step {step}: {what} rows");
        }
        let mut next = Vec::new();
        let mut r = 0;
        for (s, &rows) in n_rows.iter().enumerate() {
            let mut top = 0;
            for _ in 0..rows {
                let (Row::Logits(rc), Row::Logits(rg)) = (out_c.rows[r], out_g.rows[r]) else { panic!("logit rows") };
                let lc = &out_c.logits[rc * vocab..(rc + 1) * vocab];
                let lg = &out_g.logits[rg * vocab..(rg + 1) * vocab];
                let scale = lc.iter().fold(0f32, |a, &v| a.max(v.abs())).max(1e-6);
                let err = lc.iter().zip(lg).fold(0f32, |a, (&x, &y)| a.max((x - y).abs())) / scale;
                let phase = (step > 0) as usize;
                let tol = if phase == 0 { tol.0 } else { tol.1 };
                if !(err.is_finite() && err < tol) {
                    failures.push(format!(
                        "{name}: step {step} seq {s} row {r}: logits differ by {err:.2e} of the largest"
                    ));
                }
                worst[phase] = worst[phase].max(err);
                top = crate::sampling::argmax(lc);
                let mut sorted = lc.to_vec();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let Row::Token(gt) = out_greedy.rows[r] else { panic!("greedy row") };
                assert_eq!(
                    gt,
                    crate::sampling::argmax(lg),
                    "{name}: device argmax differs from the host's on the same logits"
                );
                if sorted[0] - sorted[1] > 2.0 * err * scale {
                    compared += 1;
                    agreed += (gt == top) as usize;
                    if gt != top {
                        failures.push(format!(
                            "{name}: step {step} seq {s} row {r}: greedy token {gt} differs from the CPU's {top}"
                        ));
                    }
                }
                r += 1;
            }
            next.push(top);
        }
        for s in 0..n_seq {
            computed[s] = seqs[s].len();
            seqs[s].push(next[s]);
        }
    }
    eprintln!(
        "{name}: {steps} steps × {n_seq} sequences (every {VERIFY_EVERY}th a verification), logits within {:.2e} (prefill) and {:.2e} (decode) of the largest, greedy tokens equal at {agreed}/{compared} rows with a clear top-2 gap",
        worst[0],
        worst[1]
    );
}

fn tiny(name: &str) -> Option<ModelWeights> {
    let rel = format!("reference/tiny/{name}");
    let candidates =
        [std::path::PathBuf::from(&rel), std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(&rel)];
    let dir = candidates.iter().find(|p| p.join("config.json").is_file())?;
    Some(crate::model::load_hf::load(dir).unwrap())
}

/// The same model with every matrix rounded to bf16 (what the GPU holds), so that the
/// comparison sees only arithmetic differences.
fn rounded_to_bf16(mut w: ModelWeights) -> ModelWeights {
    let round = |m: &mut Matrix| {
        let f = m.to_f32().unwrap();
        let bytes: Vec<u8> = f
            .data()
            .chunks_exact(4)
            .flat_map(|c| bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
            .collect();
        *m = Matrix::new(DType::BF16, m.rows, m.cols, Bytes::Owned(Arc::new(bytes))).unwrap();
    };
    for l in &mut w.layers {
        for m in [&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.w_gate, &mut l.w_up, &mut l.w_down] {
            round(m);
        }
    }
    round(&mut w.embed);
    if let Some(m) = &mut w.lm_head {
        round(m);
    }
    w
}

#[test]
fn cuda_runner_matches_cpu_runner() {
    if gpu().is_none() {
        return;
    }
    // bf16 weights on both sides: the GPU rounds prefill GEMM inputs and the KV cache to bf16
    // (about 2^-9 relative per value); its decode products keep f32 activations. The tiny
    // random models' logits are small and nearly flat, so the relative error is largest there.
    let bf16_tol = (5e-2, 5e-2);
    let mut failures = Vec::new();
    for name in ["llama", "qwen2", "mistral", "llama-bf16"] {
        match tiny(name) {
            Some(w) => compare_runners(&format!("tiny {name}"), rounded_to_bf16(w), bf16_tol, &mut failures),
            None => eprintln!("skipped tiny {name}: reference/tiny not found from the current directory"),
        }
    }
    let smollm2_bf16 = crate::model::dummy::load(smollm2_shape(), DType::BF16, 1).unwrap();
    compare_runners("smollm2 shape, bf16", smollm2_bf16, bf16_tol, &mut failures);
    // Q8_0 on the CPU quantizes activations to 8 bits; the GPU keeps them in f32.
    let q8_tol = (5e-2, 5e-2);
    let smollm2_q8 = crate::model::dummy::load(smollm2_shape(), DType::Q8_0, 2).unwrap();
    compare_runners("smollm2 shape, q8_0", smollm2_q8, q8_tol, &mut failures);
    let qwen_q8 = crate::model::dummy::load(qwen_shape(), DType::Q8_0, 3).unwrap();
    compare_runners("qwen2 shape, q8_0", qwen_q8, q8_tol, &mut failures);
    let shown: Vec<&String> = failures.iter().take(20).collect();
    assert!(failures.is_empty(), "{} mismatches, the first: {shown:#?}", failures.len());
}

/// A request's tokens (panics on an engine error).
fn drain(mut s: RequestStream) -> Vec<u32> {
    let mut ids = Vec::new();
    loop {
        match s.blocking_next().expect("a stream ends with Finished") {
            Event::Token { id, .. } => ids.extend(id),
            Event::Finished(_) => return ids,
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
}

/// Speculation on the GPU: n-gram lookup proposals verified inside the engine's steps (decode
/// graphs with a logits row per token; the device's argmax for greedy sequences, logits for a
/// sampled one), beside a sequence that does not speculate, leave greedy output as plain
/// decoding on the GPU gives it.
#[test]
fn cuda_speculation_keeps_greedy_output() {
    if gpu().is_none() {
        return;
    }
    let weights = crate::model::dummy::load(smollm2_shape(), DType::BF16, 4).unwrap();
    let mut rng = Rng::new(5);
    // Repeated patterns, so that lookup finds something to propose.
    let prompts: Vec<Vec<u32>> = (0..4)
        .map(|s| {
            let pattern: Vec<u32> = (0..6 + s).map(|_| (rng.next_u64() % 49152) as u32).collect();
            pattern.repeat(4)
        })
        .collect();
    let mut reqs: Vec<GenerateRequest> =
        prompts.iter().map(|p| GenerateRequest::new(p.clone(), 48, SamplingParams::greedy())).collect();
    reqs[2].num_speculative_tokens = Some(0);
    let sampled = SamplingParams { temperature: 0.8, seed: Some(1), ..SamplingParams::greedy() };
    reqs.push(GenerateRequest::new(prompts[0].clone(), 48, sampled));
    let run = |speculative: Option<SpeculativeConfig>| {
        let cfg = EngineConfig { speculative, ..engine_config(Device::Cuda(0)) };
        let engine = EngineHandle::start(weights.clone(), None, cfg).expect("engine starts");
        let streams: Vec<RequestStream> = reqs.iter().map(|r| engine.submit(r.clone()).expect("submit")).collect();
        let outs: Vec<Vec<u32>> = streams.into_iter().map(drain).collect();
        let m = engine.metrics();
        (outs, m.spec_proposed_tokens.load(Relaxed), m.spec_accepted_tokens.load(Relaxed))
    };
    let (plain, _, _) = run(None);
    let (spec, proposed, accepted) = run(engine_config(Device::Cuda(0)).speculative);
    eprintln!("speculation on the GPU: {accepted}/{proposed} proposed tokens accepted");
    for (i, (p, s)) in plain.iter().zip(&spec).take(4).enumerate() {
        assert_eq!(p, s, "greedy request {i} differs with speculation");
    }
    assert_eq!(spec[4].len(), 48, "the sampled request ran to max_tokens");
    assert!(proposed > 0, "lookup proposed nothing on repeated prompts");
}
