//! Kernel throughput on model-shaped matrices with random weights.
//!
//! `cargo run --release -p tern-core --example kernel_bench [-- DTYPE... ] [--no-prefill]`
//! Decode: one activation row, weights streamed (GB/s of weight bytes, µs per call).
//! Prefill: 512 activation rows (GFLOP/s, 2·k·n·rows flops), skipped for vocabulary-sized
//! matrices. Activations are quantized before timing (their cost is reported separately).
//! `--shape SUBSTR` keeps only the shapes whose name contains SUBSTR. `--packed` runs the
//! AVX2 / AVX-512 kernels over row-interleaved weights (the decoder's path where the CPU has them).
//! `--rows N` times decode with N activation rows (a verification pass or a small batch;
//! GB/s are still weight bytes per call).

use std::time::Instant;
use tern_core::kernels::{cpu_features, matmul_parallel, DType, PackedMatrix, QuantizedActs, ThreadPool};

const SHAPES: &[(&str, usize, usize)] = &[
    ("smollm2 576x1536", 576, 1536),
    ("smollm2 1536x576", 1536, 576),
    ("smollm2 576x49152", 576, 49152),
    ("qwen 896x4864", 896, 4864),
    ("qwen 4864x896", 4864, 896),
    ("qwen 896x151936", 896, 151936),
    ("qwen1.5b 8960x1536", 8960, 1536),
    ("qwen1.5b 1536x151936", 1536, 151936),
    ("dram 4864x21504", 4864, 21504),
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn random_weights(rng: &mut Rng, dtype: DType, n: usize, k: usize) -> Vec<u8> {
    let bytes = dtype.row_bytes(k).unwrap() * n;
    let mut w: Vec<u8> = (0..bytes).map(|_| rng.next() as u8).collect();
    match dtype {
        DType::F32 => {
            for c in w.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.f32().to_le_bytes());
            }
        }
        // Keep every f16/bf16 finite: clear the top exponent bit.
        DType::F16 | DType::BF16 => {
            for c in w.chunks_exact_mut(2) {
                c[1] &= 0x3F;
            }
        }
        _ => {}
    }
    w
}

/// Fastest of `reps` runs of f (after one warm-up): the least disturbed by other load.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[0]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let no_prefill = args.iter().any(|a| a == "--no-prefill");
    let packed = args.iter().any(|a| a == "--packed");
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1).cloned());
    let shape_filter = value("--shape");
    let dec_rows: usize = value("--rows").map_or(Ok(1), |v| v.parse())?;
    anyhow::ensure!((1..=512).contains(&dec_rows), "--rows takes 1..=512");
    let values = [shape_filter.clone(), value("--rows")];
    let wanted: Vec<&String> =
        args.iter().filter(|a| !a.starts_with("--") && !values.contains(&Some(a.to_string()))).collect();
    let dtypes = [
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q8_0,
        DType::Q4_K,
        DType::Q6_K,
        DType::F16,
        DType::BF16,
        DType::F32,
    ];
    println!("cpu: {:?}", cpu_features());
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    let mut rng = Rng(0x1234_5678_9abc_def1);
    println!(
        "{:<6} {:<18} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "dtype", "shape k x n", "dec1 us", "dec1 GB/s", "dec2 us", "dec2 GB/s", "pp1 GF/s", "pp2 GF/s", "q8 us"
    );
    for dtype in dtypes {
        if !wanted.is_empty() && !wanted.iter().any(|w| w.eq_ignore_ascii_case(dtype.name())) {
            continue;
        }
        for &(name, k, n) in SHAPES {
            if shape_filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
                continue;
            }
            if k % dtype.block_len() != 0 {
                println!("{:<6} {:<18} (k not a multiple of {})", dtype.name(), name, dtype.block_len());
                continue;
            }
            let w = random_weights(&mut rng, dtype, n, k);
            let gb = w.len() as f64 / 1e9;
            let pm = if packed { Some(PackedMatrix::pack(dtype, &w, n, k)?) } else { None };
            let mm = |pool: &ThreadPool, acts: &QuantizedActs, y: &mut [f32]| match &pm {
                Some(pm) => pm.matmul_parallel(pool, acts, y).unwrap(),
                None => matmul_parallel(pool, dtype, &w, k, n, acts, y).unwrap(),
            };
            let x: Vec<f32> = (0..512 * k).map(|_| rng.f32()).collect();
            let mut acts = QuantizedActs::new();
            let tq = time(50, || acts.quantize(dtype, &x[..dec_rows * k], dec_rows, k).unwrap());
            let mut y = vec![0.0f32; dec_rows * n];
            let reps = (0.3 / (gb / 10.0)).clamp(5.0, 200.0) as usize;
            let mut dec = [0.0; 2];
            for (t, pool) in pools.iter().enumerate() {
                dec[t] = time(reps, || mm(pool, &acts, &mut y));
            }
            let mut pp = [f64::NAN; 2];
            if !no_prefill && n < 10000 {
                let rows = 512;
                let mut acts = QuantizedActs::new();
                acts.quantize(dtype, &x, rows, k)?;
                let mut y = vec![0.0f32; rows * n];
                let flops = 2.0 * (rows * k * n) as f64;
                for (t, pool) in pools.iter().enumerate() {
                    let s = time(3, || mm(pool, &acts, &mut y));
                    pp[t] = flops / s / 1e9;
                }
            }
            println!(
                "{:<6} {:<18} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8.2}",
                dtype.name(),
                name,
                dec[0] * 1e6,
                gb / dec[0],
                dec[1] * 1e6,
                gb / dec[1],
                pp[0],
                pp[1],
                tq * 1e6
            );
        }
    }
    Ok(())
}
