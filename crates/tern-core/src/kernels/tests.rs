//! Cross-checks: dequantizers against the Python `gguf` package, SIMD against scalar, and the
//! quantized products against dequantize(w)·x in f32.

use super::acts::{quantize_q8k_scalar, quantize_q8x32_scalar, QuantizedActs};
use super::cpu::{cpu_features, CpuLevel};
use super::dequant::dequantize_row;
use super::dot_scalar::dot_row;
use super::dtype::{DType, QK, QK_K};
use super::matmul::{kernel_for, matmul, matmul_parallel, run_tiles, Mm};
use super::packed::{matmul_packed_groups_at, packed_kernel_at, PackedMatrix};
use super::thread_pool::ThreadPool;

/// xorshift64*: deterministic test data without a dependency.
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u64() as u8).collect()
    }
}

/// Offsets of the f16 scale fields in a block (random bytes there could be inf/NaN).
fn scale_offsets(dtype: DType) -> &'static [usize] {
    match dtype {
        DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => &[0],
        DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
        DType::Q2_K => &[80, 82],
        DType::Q3_K => &[108],
        DType::Q6_K => &[208],
        _ => &[],
    }
}

/// Random weights: random quant bits with sane scales, or random floats.
pub(crate) fn random_weights(rng: &mut Rng, dtype: DType, rows: usize, k: usize) -> Vec<u8> {
    let n = rows * k;
    match dtype {
        DType::F32 => (0..n).flat_map(|_| rng.f32().to_le_bytes()).collect(),
        DType::F16 => (0..n).flat_map(|_| half::f16::from_f32(rng.f32()).to_bits().to_le_bytes()).collect(),
        DType::BF16 => (0..n).flat_map(|_| half::bf16::from_f32(rng.f32()).to_bits().to_le_bytes()).collect(),
        // Every code but the NaNs.
        DType::F8E4M3 => rng.bytes(n).into_iter().map(|b| if b & 0x7F == 0x7F { b - 1 } else { b }).collect(),
        DType::I8 => rng.bytes(n),
        _ => {
            let bb = dtype.block_bytes();
            let mut w = rng.bytes(dtype.row_bytes(k).unwrap() * rows);
            for blk in w.chunks_exact_mut(bb) {
                for &o in scale_offsets(dtype) {
                    let v = half::f16::from_f32(rng.f32() * 0.05).to_bits().to_le_bytes();
                    blk[o..o + 2].copy_from_slice(&v);
                }
            }
            w
        }
    }
}

#[test]
fn dequant_matches_gguf_python() {
    let data = include_str!("testdata/gguf_dequant.txt");
    let mut lines = data.lines();
    let mut n = 0;
    while let (Some(head), Some(vals)) = (lines.next(), lines.next()) {
        let (name, hex) = head.split_once(' ').unwrap();
        let dtype = DType::ALL.into_iter().find(|d| d.name() == name).unwrap();
        let bytes: Vec<u8> =
            (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
        let want: Vec<f32> = vals.split(' ').map(|v| v.parse().unwrap()).collect();
        let mut got = vec![0.0; want.len()];
        dequantize_row(dtype, &bytes, &mut got).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "{name}[{i}]: {g} vs {w}");
        }
        n += 1;
    }
    assert_eq!(n, 10);
}

#[test]
fn dequant_rejects_bad_sizes() {
    let mut y = vec![0.0; 33];
    assert!(dequantize_row(DType::Q4_0, &[0; 18], &mut y).is_err());
    let mut y = vec![0.0; 32];
    assert!(dequantize_row(DType::Q4_0, &[0; 17], &mut y).is_err());
    assert!(dequantize_row(DType::Q4_0, &[0; 18], &mut y).is_ok());
}

#[test]
fn act_quant_simd_matches_scalar() {
    let mut rng = Rng::new(7);
    for k in [32usize, 96, 256, 800, 1536] {
        let x: Vec<f32> = (0..k).map(|_| rng.f32() * 3.0).collect();
        let mut qa = QuantizedActs::new();
        if k % QK == 0 {
            qa.quantize(DType::Q4_0, &x, 1, k).unwrap();
            let (mut qs, mut d, mut s) = (vec![0i8; k], vec![0.0; k / QK], vec![0.0; k / QK]);
            quantize_q8x32_scalar(&x, &mut qs, &mut d, &mut s);
            assert_eq!(qa.qs, qs);
            assert_eq!(qa.d, d);
            assert_eq!(qa.s, s);
        }
        if k % QK_K == 0 {
            qa.quantize(DType::Q4_K, &x, 1, k).unwrap();
            let nb = k / QK_K;
            let (mut qs, mut d, mut bs) = (vec![0i8; k], vec![0.0; nb], vec![0i16; nb * 16]);
            quantize_q8k_scalar(&x, &mut qs, &mut d, &mut bs);
            assert_eq!(qa.qs, qs);
            assert_eq!(qa.d, d);
            assert_eq!(qa.bsums, bs);
        }
    }
}

#[test]
fn act_quant_rejects_bad_shapes() {
    let mut qa = QuantizedActs::new();
    assert!(qa.quantize(DType::Q4_0, &[0.0; 48], 1, 48).is_err());
    assert!(qa.quantize(DType::Q4_K, &[0.0; 64], 2, 32).is_err());
    assert!(qa.quantize(DType::F32, &[0.0; 10], 2, 4).is_err());
    assert!(qa.quantize(DType::F32, &[0.0; 8], 2, 4).is_ok());
}

fn levels() -> Vec<CpuLevel> {
    let mut v = vec![CpuLevel::Scalar];
    if cpu_features().detected >= CpuLevel::Avx2 {
        v.push(CpuLevel::Avx2);
    }
    if cpu_features().detected >= CpuLevel::Avx512 {
        v.push(CpuLevel::Avx512);
    }
    v
}

/// Runs the kernel of `level` for all rows.
fn run_level(level: CpuLevel, dtype: DType, w: &[u8], k: usize, n: usize, qa: &QuantizedActs) -> Vec<f32> {
    let mut y = vec![f32::NAN; qa.n_rows() * n];
    let m = Mm { w: w.as_ptr(), row_bytes: dtype.row_bytes(k).unwrap(), k, acts: qa, y: y.as_mut_ptr(), ldy: n };
    unsafe { run_tiles(&kernel_for(dtype, level), &m, 0..n) };
    y
}

/// The packed kernel of `level` for all rows, written with a row stride 2 wider than the
/// matrix: the two extra columns must stay untouched (NaN), so padding rows of a group are
/// never stored.
fn run_packed(level: CpuLevel, pm: &PackedMatrix, n: usize, qa: &QuantizedActs) -> Vec<f32> {
    let ldy = n + 2;
    let mut y = vec![f32::NAN; qa.n_rows() * ldy];
    unsafe { matmul_packed_groups_at(level, pm, 0..pm.groups(), qa, y.as_mut_ptr(), ldy) };
    for (i, row) in y.chunks_exact(ldy).enumerate() {
        assert!(row[n..].iter().all(|v| v.is_nan()), "packed {}: row {i} written past its {n} outputs", pm.dtype());
    }
    y.chunks_exact(ldy).flat_map(|row| row[..n].to_vec()).collect()
}

/// Each kernel of a dtype: row-major ones at every CPU level here, and the packed ones
/// (AVX2, and AVX-512 VNNI where the CPU has it).
#[derive(Debug, Clone, Copy)]
enum Path {
    Level(CpuLevel),
    Packed(CpuLevel),
}

fn paths(dtype: DType) -> Vec<Path> {
    let levels = levels();
    let mut v: Vec<Path> = levels.iter().map(|&l| Path::Level(l)).collect();
    v.extend(levels.iter().filter(|&&l| packed_kernel_at(l, dtype)).map(|&l| Path::Packed(l)));
    if packed_kernel_at(CpuLevel::Avx512, dtype) && cpu_features().detected < CpuLevel::Avx512 {
        eprintln!("{dtype}: packed AVX-512 kernel not tested (this CPU has no AVX-512 VNNI)");
    }
    v
}

fn run_path(path: Path, dtype: DType, w: &[u8], k: usize, n: usize, qa: &QuantizedActs) -> Vec<f32> {
    match path {
        Path::Level(level) => run_level(level, dtype, w, k, n, qa),
        Path::Packed(level) => run_packed(level, &PackedMatrix::pack(dtype, w, n, k).unwrap(), n, qa),
    }
}

fn check_dtype(dtype: DType, ks: &[usize]) {
    let paths = paths(dtype);
    let mut rng = Rng::new(dtype.ggml_id() as u64 + 100);
    for &k in ks {
        for (n_out, n_acts) in [(1usize, 1usize), (13, 1), (7, 3), (9, 5), (5, 8), (17, 11), (40, 14)] {
            let w = random_weights(&mut rng, dtype, n_out, k);
            let x: Vec<f32> = (0..n_acts * k).map(|_| rng.f32() * 2.0).collect();
            let mut qa = QuantizedActs::new();
            qa.quantize(dtype, &x, n_acts, k).unwrap();
            let row_bytes = dtype.row_bytes(k).unwrap();
            // Scalar reference and the f32 bound from activation quantization.
            let mut wf = vec![0.0f32; n_out * k];
            for r in 0..n_out {
                dequantize_row(dtype, &w[r * row_bytes..(r + 1) * row_bytes], &mut wf[r * k..(r + 1) * k]).unwrap();
            }
            // Elements that share an activation scale.
            let (act_quantized, bl) = match dtype {
                DType::I8 => (true, k),
                DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3 => (false, 1),
                _ => (true, dtype.block_len()),
            };
            let mut yref = vec![0.0f32; n_acts * n_out];
            for i in 0..n_acts {
                for r in 0..n_out {
                    let yr = dot_row(dtype, &w[r * row_bytes..(r + 1) * row_bytes], &qa, i);
                    yref[i * n_out + r] = yr;
                    let (mut exact, mut bound, mut magnitude) = (0.0f64, 0.0f64, 0.0f64);
                    for (blk_w, blk_x) in wf[r * k..(r + 1) * k].chunks(bl).zip(x[i * k..(i + 1) * k].chunks(bl)) {
                        let amax = blk_x.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
                        for (a, b) in blk_w.iter().zip(blk_x) {
                            exact += *a as f64 * *b as f64;
                            magnitude += (*a as f64 * *b as f64).abs();
                            bound += (a.abs() as f64) * amax / 127.0 * 0.6;
                        }
                    }
                    // f32 summation error grows with the terms' magnitude, not the result's.
                    let tol = if act_quantized { bound } else { 0.0 } + 1e-4 * (1.0 + exact.abs()) + 1e-5 * magnitude;
                    assert!(
                        (yr as f64 - exact).abs() <= tol,
                        "{dtype} k={k} r={r} i={i}: quantized {yr} vs f32 {exact} (tol {tol})"
                    );
                }
            }
            let scale = yref.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            for &path in &paths {
                let y = run_path(path, dtype, &w, k, n_out, &qa);
                for (j, (a, b)) in y.iter().zip(&yref).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * scale + 1e-4 * b.abs(),
                        "{dtype} {path:?} k={k} n_out={n_out} n_acts={n_acts} at {j}: {a} vs {b}"
                    );
                }
                // Batch invariance: a row alone gives bit for bit what it gives inside the batch.
                for i in 0..n_acts {
                    let mut one = QuantizedActs::new();
                    one.quantize(dtype, &x[i * k..(i + 1) * k], 1, k).unwrap();
                    let alone = run_path(path, dtype, &w, k, n_out, &one);
                    let in_batch = &y[i * n_out..(i + 1) * n_out];
                    assert!(
                        alone.iter().zip(in_batch).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{dtype} {path:?} k={k} n_acts={n_acts}: row {i} alone {alone:?} != in batch {in_batch:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn matmul_q4_0() {
    check_dtype(DType::Q4_0, &[32, 224, 1184]);
}
#[test]
fn matmul_q4_1() {
    check_dtype(DType::Q4_1, &[32, 224, 1184]);
}
#[test]
fn matmul_q5_0() {
    check_dtype(DType::Q5_0, &[32, 224, 1184]);
}
#[test]
fn matmul_q5_1() {
    check_dtype(DType::Q5_1, &[32, 224, 1184]);
}
#[test]
fn matmul_q8_0() {
    check_dtype(DType::Q8_0, &[32, 224, 1184]);
}
#[test]
fn matmul_q2_k() {
    check_dtype(DType::Q2_K, &[256, 768]);
}
#[test]
fn matmul_q3_k() {
    check_dtype(DType::Q3_K, &[256, 768]);
}
#[test]
fn matmul_q4_k() {
    check_dtype(DType::Q4_K, &[256, 768]);
}
#[test]
fn matmul_q5_k() {
    check_dtype(DType::Q5_K, &[256, 768]);
}
#[test]
fn matmul_q6_k() {
    check_dtype(DType::Q6_K, &[256, 768]);
}
#[test]
fn matmul_f32() {
    check_dtype(DType::F32, &[1, 7, 64, 333]);
}
#[test]
fn matmul_f16() {
    check_dtype(DType::F16, &[1, 7, 64, 333]);
}
#[test]
fn matmul_bf16() {
    check_dtype(DType::BF16, &[1, 7, 64, 333]);
}

#[test]
fn matmul_i8() {
    check_dtype(DType::I8, &[1, 32, 70, 224, 1184]);
}
#[test]
fn matmul_f8_e4m3() {
    check_dtype(DType::F8E4M3, &[1, 7, 64, 333]);
}

#[test]
fn matmul_validates_and_parallel_matches() {
    let mut rng = Rng::new(3);
    let (k, n) = (256, 203);
    let w = random_weights(&mut rng, DType::Q4_K, n, k);
    let x: Vec<f32> = (0..5 * k).map(|_| rng.f32()).collect();
    let mut qa = QuantizedActs::new();
    qa.quantize(DType::Q4_K, &x, 5, k).unwrap();
    let mut y1 = vec![0.0; 5 * n];
    matmul(DType::Q4_K, &w, k, n, &qa, &mut y1).unwrap();
    let pool = ThreadPool::new(2);
    let mut y2 = vec![0.0; 5 * n];
    matmul_parallel(&pool, DType::Q4_K, &w, k, n, &qa, &mut y2).unwrap();
    assert_eq!(y1, y2);
    let mut qa2 = QuantizedActs::new();
    qa2.quantize_parallel(&pool, DType::Q4_K, &x, 5, k).unwrap();
    assert_eq!(qa.qs, qa2.qs);
    // Wrong sizes and mismatched activations are errors, not panics.
    assert!(matmul(DType::Q4_K, &w[1..], k, n, &qa, &mut y1).is_err());
    assert!(matmul(DType::Q4_K, &w, k, n, &qa, &mut y1[1..]).is_err());
    assert!(matmul(DType::Q6_K, &w, k, n, &qa, &mut y1).is_err());
    assert!(matmul(DType::Q4_0, &w, k, n, &qa, &mut y1).is_err());
    assert!(matmul(DType::Q4_K, &w, 255, n, &qa, &mut y1).is_err());
}
