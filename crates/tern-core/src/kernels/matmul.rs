//! Matrix multiplication entry points: validation, kernel choice, tiling and threading.
//!
//! y[i * ldy + r] = dot(W[r, :], act[i, :]) for weight rows r and activation rows i.
//! Kernels work on a tile of weight rows against a range of activation rows; the activation
//! rows are walked in chunks that stay in L2 while every weight row tile passes over them, so a
//! weight block is unpacked once per chunk and used against several activation rows.

use super::acts::QuantizedActs;
use super::cpu::{cpu_level, CpuLevel};
use super::dot_scalar::dot_row;
use super::dtype::DType;
use super::thread_pool::ThreadPool;
use anyhow::{ensure, Result};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What a tile kernel sees.
pub(crate) struct Mm<'a> {
    pub w: *const u8,
    pub row_bytes: usize,
    pub k: usize,
    pub acts: &'a QuantizedActs,
    pub y: *mut f32,
    pub ldy: usize,
}

/// Computes weight rows `r0..r0+nr` (nr ≤ the kernel's tile height) against activation rows
/// `acts`.
pub(crate) type TileFn = unsafe fn(m: &Mm, r0: usize, nr: usize, acts: Range<usize>);

/// A kernel and its weight-row tile heights (for one activation row, and for several).
#[derive(Clone, Copy)]
pub(crate) struct Kernel {
    pub tile: TileFn,
    pub rows_decode: usize,
    pub rows_prefill: usize,
}

/// Activation bytes per chunk: kept well inside L2 so that they are reused from there.
const ACT_CHUNK_BYTES: usize = 24 * 1024;
/// Row counts of parallel chunks are multiples of this (a multiple of every tile height).
const ROW_ALIGN: usize = 12;

unsafe fn scalar_tile(m: &Mm, r0: usize, nr: usize, acts: Range<usize>, dtype: DType) {
    for r in r0..r0 + nr {
        let w = std::slice::from_raw_parts(m.w.add(r * m.row_bytes), m.row_bytes);
        for i in acts.clone() {
            *m.y.add(i * m.ldy + r) = dot_row(dtype, w, m.acts, i);
        }
    }
}

macro_rules! scalar_kernels {
    ($($t:ident),*) => {
        fn scalar_kernel(dtype: DType) -> Kernel {
            match dtype {
                $(DType::$t => Kernel {
                    tile: |m, r0, nr, a| unsafe { scalar_tile(m, r0, nr, a, DType::$t) },
                    rows_decode: 1,
                    rows_prefill: 1,
                },)*
            }
        }
    };
}
scalar_kernels!(F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, I8, F8E4M3);

/// The best kernel for `dtype` at `level` (falling back to scalar where no SIMD kernel exists).
pub(crate) fn kernel_for(dtype: DType, level: CpuLevel) -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if level >= CpuLevel::Avx2 {
        if let Some(k) = super::avx2::kernel(dtype, level) {
            return k;
        }
    }
    let _ = level;
    scalar_kernel(dtype)
}

/// Checks that `w`, `acts` and an output of `y_len` values fit `matmul(dtype, w, k, n_out_rows)`.
pub fn check_matmul_args(
    dtype: DType,
    w: &[u8],
    k: usize,
    n_out_rows: usize,
    acts: &QuantizedActs,
    y_len: usize,
) -> Result<()> {
    let row_bytes = dtype.row_bytes(k)?;
    ensure!(acts.matches(dtype), "activations were not quantized for {dtype} weights");
    ensure!(acts.k() == k, "activations have k={}, weights k={k}", acts.k());
    ensure!(
        n_out_rows.checked_mul(row_bytes) == Some(w.len()),
        "{dtype} weights: {} bytes, expected {n_out_rows} rows × {row_bytes}",
        w.len()
    );
    ensure!(
        acts.n_rows().checked_mul(n_out_rows) == Some(y_len),
        "output has {y_len} values, expected {} × {n_out_rows}",
        acts.n_rows()
    );
    Ok(())
}

/// For weight rows `rows` of W (dtype, row-major, k columns, `w` = the whole matrix's bytes)
/// and every activation row i: y[i * ldy + r] = dot(W[r, :], act[i, :]).
///
/// # Safety
/// `w` must hold at least `rows.end` rows of `dtype.row_bytes(k)` bytes, `acts` must be
/// quantized for `dtype` with this `k`, y must be valid for writes at those indices, and
/// callers on different threads pass disjoint `rows`. Cheap checks of the first two panic
/// rather than read out of bounds.
pub unsafe fn matmul_rows(
    dtype: DType,
    w: &[u8],
    k: usize,
    rows: Range<usize>,
    acts: &QuantizedActs,
    y: *mut f32,
    ldy: usize,
) {
    let row_bytes = dtype.row_bytes(k).expect("matmul_rows: k is not a multiple of the block length");
    assert!(
        acts.matches(dtype) && acts.k() == k && rows.end * row_bytes <= w.len(),
        "matmul_rows: weights/activations do not match"
    );
    let m = Mm { w: w.as_ptr(), row_bytes, k, acts, y, ldy };
    run_tiles(&kernel_for(dtype, cpu_level()), &m, rows);
}

/// Walks `rows` × all activation rows in tiles.
pub(crate) unsafe fn run_tiles(kern: &Kernel, m: &Mm, rows: Range<usize>) {
    let n_acts = m.acts.n_rows();
    if n_acts == 0 || rows.is_empty() {
        return;
    }
    let th = if n_acts == 1 { kern.rows_decode } else { kern.rows_prefill };
    let chunk = (ACT_CHUNK_BYTES / m.k.max(1)).clamp(4, 256);
    let mut c0 = 0;
    while c0 < n_acts {
        let c1 = (c0 + chunk).min(n_acts);
        let mut r0 = rows.start;
        while r0 < rows.end {
            let nr = th.min(rows.end - r0);
            (kern.tile)(m, r0, nr, c0..c1);
            r0 += nr;
        }
        c0 = c1;
    }
}

/// Single-threaded y = acts · Wᵀ: y is n_rows(acts) × n_out_rows.
pub fn matmul(dtype: DType, w: &[u8], k: usize, n_out_rows: usize, acts: &QuantizedActs, y: &mut [f32]) -> Result<()> {
    check_matmul_args(dtype, w, k, n_out_rows, acts, y.len())?;
    unsafe { matmul_rows(dtype, w, k, 0..n_out_rows, acts, y.as_mut_ptr(), n_out_rows) };
    Ok(())
}

/// Like [`matmul`], with weight rows split over the pool's threads. Threads take chunks of
/// rows from a shared counter, so a thread that is slowed down does not stall the others.
pub fn matmul_parallel(
    pool: &ThreadPool,
    dtype: DType,
    w: &[u8],
    k: usize,
    n_out_rows: usize,
    acts: &QuantizedActs,
    y: &mut [f32],
) -> Result<()> {
    check_matmul_args(dtype, w, k, n_out_rows, acts, y.len())?;
    let nt = pool.n_threads();
    if nt == 1 || n_out_rows < 2 * ROW_ALIGN {
        unsafe { matmul_rows(dtype, w, k, 0..n_out_rows, acts, y.as_mut_ptr(), n_out_rows) };
        return Ok(());
    }
    // About 4 chunks per thread: small enough to balance, large enough to keep tiles full.
    let chunk = n_out_rows.div_ceil(4 * nt).next_multiple_of(ROW_ALIGN).max(ROW_ALIGN);
    let n_chunks = n_out_rows.div_ceil(chunk);
    let next = AtomicUsize::new(0);
    let yp = SendPtr(y.as_mut_ptr());
    pool.run(|_, _| {
        let yp = &yp;
        loop {
            let c = next.fetch_add(1, Ordering::Relaxed);
            if c >= n_chunks {
                break;
            }
            let r = c * chunk..((c + 1) * chunk).min(n_out_rows);
            // SAFETY: sizes checked above; each chunk of rows goes to exactly one thread.
            unsafe { matmul_rows(dtype, w, k, r, acts, yp.0, n_out_rows) };
        }
    });
    Ok(())
}

struct SendPtr(*mut f32);
// SAFETY: threads write disjoint elements (disjoint weight rows).
unsafe impl Sync for SendPtr {}
