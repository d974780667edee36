//! The quantizers on small synthetic layers: exact packing, and GPTQ / AWQ beating
//! round-to-nearest on the output error they minimize.

use super::int4::{q4_1_block, rtn, Grid};
use super::*;
use crate::rng::Rng;

fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * std).collect()
}

/// Inputs with correlated channels (mixtures of a few sources) and a few channels 20× larger
/// than the rest, as transformer activations have.
fn inputs(rng: &mut Rng, n: usize, k: usize) -> Vec<f32> {
    let sources = 16;
    let mix = randn(rng, sources * k, 1.0);
    let mut x = vec![0f32; n * k];
    for t in 0..n {
        let z = randn(rng, sources, 1.0);
        for c in 0..k {
            let v: f32 = (0..sources).map(|s| z[s] * mix[s * k + c]).sum::<f32>() + 0.3 * rng.normal();
            x[t * k + c] = if c % 37 == 5 { 20.0 * v } else { v };
        }
    }
    x
}

fn hessian(x: &[f32], n: usize, k: usize) -> Vec<f64> {
    let mut h = vec![0f64; k * k];
    for t in 0..n {
        let r = &x[t * k..(t + 1) * k];
        for i in 0..k {
            for j in 0..k {
                h[i * k + j] += r[i] as f64 * r[j] as f64;
            }
        }
    }
    h
}

/// ‖X·(Ŵ − W)ᵀ‖² over the inputs.
fn output_error(x: &[f32], n: usize, k: usize, w: &[f32], approx: &[f32]) -> f64 {
    let rows = w.len() / k;
    let mut e = 0f64;
    for t in 0..n {
        for r in 0..rows {
            let d: f64 = (0..k).map(|c| x[t * k + c] as f64 * (approx[r * k + c] - w[r * k + c]) as f64).sum();
            e += d * d;
        }
    }
    e
}

/// Options for `method` with the tests' usual settings.
fn opts(method: Method) -> Options {
    Options {
        method,
        group: 128,
        damp: 0.01,
        act_order: false,
        awq_rows: 0,
        awq_clip: false,
        outlier_threshold: 6.0,
        fp8_per_tensor: false,
    }
}

#[test]
fn q4_1_packing_round_trips_exactly() {
    let mut rng = Rng::new(1);
    let (rows, cols) = (3, 256);
    let w = randn(&mut rng, rows * cols, 0.1);
    for group in [32, 128] {
        let q = rtn(&w, rows, cols, group);
        let bytes = q.to_q4_1();
        assert_eq!(bytes.len(), rows * cols / 32 * 20);
        for (b, blk) in bytes.chunks_exact(20).enumerate() {
            let (r, c0) = (b / (cols / 32), (b % (cols / 32)) * 32);
            let (g, codes) = q4_1_block(blk);
            assert_eq!(g, q.grid(r, c0), "block {b}: grid");
            assert_eq!(&codes[..], &q.codes[r * cols + c0..r * cols + c0 + 32], "block {b}: codes");
        }
        // tern's Q4_1 kernel path reads the same values.
        let mut back = vec![0f32; rows * cols];
        crate::kernels::dequantize_row(DType::Q4_1, &bytes, &mut back).unwrap();
        assert_eq!(back, q.dequantize(), "group {group}");
        // Groups wider than a block share one grid.
        if group == 128 {
            assert_eq!(q.grid(0, 0), q.grid(0, 96));
        }
    }
}

#[test]
fn grids_hold_zero_and_the_range() {
    let g = Grid::for_range(-1.0, 2.0);
    assert!(g.value(g.code(0.0)).abs() <= 1e-3 * g.m.abs(), "0 is on the grid (up to m's f16 rounding)");
    assert!((g.value(0) - -1.0).abs() < 0.1 && (g.value(15) - 2.0).abs() < 0.15);
    let flat = Grid::for_values(&[0.0; 8]);
    assert_eq!(flat.value(flat.code(0.0)), 0.0);
}

#[test]
fn int8_per_channel_uses_one_scale_per_row() {
    let mut rng = Rng::new(2);
    let (rows, cols) = (4, 64);
    let w = randn(&mut rng, rows * cols, 1.0);
    let b = int8::per_channel_q8_0(&w, cols);
    for r in 0..rows {
        assert_eq!(b[r * 68..r * 68 + 2], b[r * 68 + 34..r * 68 + 36], "row {r}: both blocks carry the row scale");
    }
    let o = opts(Method::Int8);
    let e = encode(&w, rows, cols, &o, None, &[]).unwrap();
    assert!(e.rel_error < 1e-4, "int8 error {}", e.rel_error);
}

#[test]
fn gptq_beats_round_to_nearest() {
    let mut rng = Rng::new(3);
    let (rows, k, n) = (48, 256, 1024);
    let w = randn(&mut rng, rows * k, 0.05);
    let x = inputs(&mut rng, n, k);
    let h = hessian(&x, n, k);
    let rtn_err = output_error(&x, n, k, &w, &rtn(&w, rows, k, 128).dequantize());
    for act_order in [false, true] {
        let q = gptq::gptq(&w, rows, k, &h, gptq::GptqOptions { group: 128, damp: 0.01, act_order }).unwrap();
        let e = output_error(&x, n, k, &w, &q.dequantize());
        eprintln!("gptq (act_order {act_order}) output error {e:.4e}, rtn {rtn_err:.4e}");
        assert!(e < 0.8 * rtn_err, "gptq (act_order {act_order}) {e:e} vs rtn {rtn_err:e}");
    }
}

#[test]
fn awq_beats_round_to_nearest() {
    let mut rng = Rng::new(4);
    let (rows, k, n) = (48, 256, 512);
    let w = randn(&mut rng, rows * k, 0.05);
    let x = inputs(&mut rng, n, k);
    let mean_abs: Vec<f32> = (0..k).map(|c| (0..n).map(|t| x[t * k + c].abs()).sum::<f32>() / n as f32).collect();
    let (s, alpha) = awq::search_scales(&x[..256 * k], 256, k, &mean_abs, &[&w], 128);
    let scaled: Vec<f32> = w.iter().enumerate().map(|(e, &v)| v * s[e % k]).collect();
    let back: Vec<f32> =
        rtn(&scaled, rows, k, 128).dequantize().iter().enumerate().map(|(e, &v)| v / s[e % k]).collect();
    // Judged on all the inputs, most of which the search did not see.
    let awq_err = output_error(&x, n, k, &w, &back);
    let rtn_err = output_error(&x, n, k, &w, &rtn(&w, rows, k, 128).dequantize());
    eprintln!("awq (alpha {alpha}) output error {awq_err:.4e}, rtn {rtn_err:.4e}");
    assert!(alpha > 0.0, "outlier channels make scaling pay");
    assert!(awq_err < 0.8 * rtn_err, "awq {awq_err:e} vs rtn {rtn_err:e}");
}

#[test]
fn calibration_hessian_matches_the_sum() {
    let mut rng = Rng::new(5);
    let (n, k) = (37, 20);
    let x = randn(&mut rng, n * k, 1.0);
    let pool = ThreadPool::new(2);
    let mut s = calib::InputStats::default();
    let wanted = calib::Wanted { hessian: true, sample_rows: 10, abs_max: true };
    calib::add_rows(&mut s, &x[..20 * k], 20, wanted, (0, 5), &pool);
    calib::add_rows(&mut s, &x[20 * k..], n - 20, wanted, (1, 5), &pool);
    let want = hessian(&x, n, k);
    let got = s.hessian_f64();
    assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-3 * b.abs().max(1.0)));
    assert_eq!(s.tokens, n);
    // Five rows of each window, evenly spaced: rows 0, 4, 8, 12, 16 of the first 20 (phase 0),
    // then rows 2, 5, 8, 12, 15 of the other 17 (window 1's phase: 7919 mod 3 = 2).
    let kept: Vec<f32> =
        [0, 4, 8, 12, 16, 22, 25, 28, 32, 35].iter().flat_map(|&t| x[t * k..(t + 1) * k].to_vec()).collect();
    assert_eq!(s.sample, kept, "evenly spaced rows of each window are kept");
    let m = s.mean_abs();
    assert!((m[3] - (0..n).map(|t| x[t * k + 3].abs()).sum::<f32>() / n as f32).abs() < 1e-5);
    assert_eq!(s.abs_max[7], (0..n).map(|t| x[t * k + 7].abs()).fold(0f32, f32::max));
}

#[test]
fn bad_options_are_refused() {
    let o = Options { group: 100, ..opts(Method::Int4Rtn) };
    assert!(o.check().is_err());
    let o = Options { damp: 1.5, act_order: true, ..opts(Method::Gptq) };
    assert!(o.check().is_err());
}

#[test]
fn llm_int8_beats_naive_int8_on_planted_outliers() {
    use crate::model::weights::{Bytes, Matrix};
    use std::sync::Arc;
    let mut rng = Rng::new(6);
    let (rows, k, n) = (64, 256, 48);
    let w = randn(&mut rng, rows * k, 0.05);
    // Activations of magnitude ~1 with four planted outlier features of magnitude ~60.
    let planted = [3usize, 70, 130, 201];
    let mut x = randn(&mut rng, n * k, 1.0);
    for t in 0..n {
        for &c in &planted {
            x[t * k + c] = 60.0 + 10.0 * rng.normal();
        }
    }
    let abs_max: Vec<f32> = (0..k).map(|c| (0..n).map(|t| x[t * k + c].abs()).fold(0f32, f32::max)).collect();
    let found = outlier_channels(&abs_max, 6.0);
    assert_eq!(found, planted.to_vec(), "the planted features are the outliers");
    let exact: Vec<f64> =
        (0..n * rows).map(|e| (0..k).map(|c| x[e / rows * k + c] as f64 * w[e % rows * k + c] as f64).sum()).collect();
    let pool = ThreadPool::new(2);
    let run = |method: Method, cols: &[usize]| -> f64 {
        let o = opts(method);
        let e = encode(&w, rows, k, &o, None, cols).unwrap();
        let mut m = Matrix::new(DType::Q8_0, rows, k, Bytes::Owned(Arc::new(e.bytes))).unwrap();
        if let Some(out) = e.outliers {
            m = m.with_outliers(out).unwrap();
        }
        // The decoder's own product: int8 activations per 32 values for the stored part.
        let y = crate::model::decoder::project(&pool, &m, &x, n).unwrap();
        y.iter().zip(&exact).map(|(a, b)| (*a as f64 - b).powi(2)).sum::<f64>()
    };
    let naive = run(Method::Int8, &[]);
    let mixed = run(Method::LlmInt8, &found);
    eprintln!("output error: naive int8 {naive:.4e}, LLM.int8 {mixed:.4e}");
    assert!(mixed < 0.25 * naive, "LLM.int8 {mixed:e} vs naive int8 {naive:e}");
}

#[test]
fn w8a8_and_fp8_round_trip_and_multiply_through_the_decoder() {
    use crate::model::weights::{Bytes, Matrix};
    use std::sync::Arc;
    let mut rng = Rng::new(8);
    let (rows, k, n) = (24, 192, 5);
    // Rows 2⁻¹² .. 2¹¹ in magnitude: a scale per row matters.
    let w: Vec<f32> = (0..rows * k).map(|e| rng.normal() * 2f32.powi((e / k) as i32 - 12)).collect();
    let x = randn(&mut rng, n * k, 1.0);
    let pool = ThreadPool::new(2);
    let worst_row_error = |approx: &[f32]| {
        (0..rows).map(|r| rel_error(&approx[r * k..(r + 1) * k], &w[r * k..(r + 1) * k])).fold(0f64, f64::max)
    };
    for (method, per_tensor, dtype, max_row_err) in [
        (Method::W8a8, false, DType::I8, 1e-4),
        (Method::Fp8, false, DType::F8E4M3, 3e-3),
        (Method::Fp8, true, DType::F8E4M3, 1.0),
    ] {
        let o = Options { fp8_per_tensor: per_tensor, ..opts(method) };
        let e = encode(&w, rows, k, &o, None, &[]).unwrap();
        let scale = e.row_scale.clone().unwrap();
        assert_eq!(scale.len(), if per_tensor { 1 } else { rows });
        let m = Matrix::new(dtype, rows, k, Bytes::Owned(Arc::new(e.bytes))).unwrap().with_row_scale(scale).unwrap();
        // Unpacking the stored matrix gives exactly the weights the error was measured on.
        let back = f32s(&m).unwrap();
        assert!((rel_error(&back, &w) - e.rel_error).abs() <= 1e-12, "{method:?}");
        let worst = worst_row_error(&back);
        eprintln!(
            "{} (per tensor {per_tensor}): relative error {:.3e}, worst row {worst:.3e}",
            method.name(),
            e.rel_error
        );
        if per_tensor {
            assert!(worst > 0.5, "one scale for rows 2²³ apart flushes the small ones, got {worst}");
        } else {
            assert!(worst < max_row_err, "{method:?}: worst row error {worst}");
        }
        // The decoder's product (I8: activations quantized per token) against f32 on `back`.
        let y = crate::model::decoder::project(&pool, &m, &x, n).unwrap();
        for t in 0..n {
            let xt = &x[t * k..(t + 1) * k];
            let amax = xt.iter().fold(0f32, |a, v| a.max(v.abs()));
            for r in 0..rows {
                let wr = &back[r * k..(r + 1) * k];
                let exact: f32 = wr.iter().zip(xt).map(|(a, b)| a * b).sum();
                let abs_w: f32 = wr.iter().map(|a| a.abs()).sum();
                let tol = if dtype == DType::I8 { 0.5 * amax / 127.0 * abs_w } else { 0.0 } + 1e-4 * abs_w;
                assert!(
                    (y[t * rows + r] - exact).abs() <= tol,
                    "{method:?} t {t} r {r}: {} vs {exact}",
                    y[t * rows + r]
                );
            }
        }
    }
}

#[test]
fn awq_clipping_lowers_the_output_error() {
    let mut rng = Rng::new(9);
    let (rows, k, n) = (32, 256, 1024);
    // Heavy-tailed weights: a few large values per group stretch round-to-nearest's range.
    let mut w = randn(&mut rng, rows * k, 0.05);
    for v in w.iter_mut().step_by(37) {
        *v *= 6.0;
    }
    let x = inputs(&mut rng, n, k);
    let mut clipped = w.clone();
    awq::clip(&mut clipped, k, 128, &x[..512 * k], 512, &ThreadPool::new(2));
    // Judged on all the inputs, half of which the search did not see.
    let clip_err = output_error(&x, n, k, &w, &rtn(&clipped, rows, k, 128).dequantize());
    let rtn_err = output_error(&x, n, k, &w, &rtn(&w, rows, k, 128).dequantize());
    eprintln!("clipped output error {clip_err:.4e}, rtn {rtn_err:.4e}");
    assert!(clip_err < 0.95 * rtn_err, "clipped {clip_err:e} vs rtn {rtn_err:e}");
}
