//! The dense f64 linear algebra GPTQ needs (n up to a few thousand): Cholesky factors and
//! triangular inverses on row-major matrices, inner loops over contiguous rows.

use anyhow::{bail, Result};

/// Σ a_i·b_i with eight independent partial sums, so the loop vectorizes and pipelines (a
/// single running sum is one dependent add per element: the Cholesky of a 9k-wide Hessian
/// took minutes that way); with AVX2+FMA (checked at run time: the crate targets baseline
/// x86-64) the same loop runs on 256-bit fused multiply-adds.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { dot_fma(a, b) };
    }
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_fma(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] = x[k].mul_add(y[k], acc[k]);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Lower-triangular L with L·Lᵀ = a (n × n, symmetric positive definite). Rows are computed
/// `ROWS` at a time, column by column, so each finished row j is read once per block of rows
/// rather than once per row (the unblocked loop streamed n³/6 values from memory).
pub fn cholesky(a: &[f64], n: usize) -> Result<Vec<f64>> {
    const ROWS: usize = 16;
    let mut l = vec![0f64; n * n];
    for i0 in (0..n).step_by(ROWS) {
        let i1 = (i0 + ROWS).min(n);
        for j in 0..i1 {
            for i in i0.max(j)..i1 {
                let (li, lj) = (&l[i * n..i * n + j], &l[j * n..j * n + j]);
                let s = a[i * n + j] - dot(li, lj);
                if i == j {
                    if s <= 0.0 || !s.is_finite() {
                        bail!("matrix is not positive definite (pivot {i}: {s:e}); raise the damping");
                    }
                    l[i * n + i] = s.sqrt();
                } else {
                    l[i * n + j] = s / l[j * n + j];
                }
            }
        }
    }
    Ok(l)
}

/// The inverse of a lower-triangular matrix, solved for blocks of `COLS` columns at once
/// (forward substitution, x_i = (e_i − Σ_k<i L_ik x_k) / L_ii): each element of L read serves
/// the whole block, so the solve runs from cache instead of streaming L (n²/2 values) once per
/// column. Columns of the block left of the diagonal stay zero.
pub fn lower_inverse(l: &[f64], n: usize) -> Vec<f64> {
    const COLS: usize = 64;
    let mut x = vec![0f64; n * n];
    let mut blk = vec![0f64; n * COLS];
    for j0 in (0..n).step_by(COLS) {
        let w = COLS.min(n - j0);
        blk.iter_mut().for_each(|v| *v = 0.0);
        for i in j0..n {
            let (done, rest) = blk.split_at_mut(i * COLS);
            let xi = &mut rest[..COLS];
            if i < j0 + w {
                xi[i - j0] = 1.0;
            }
            for k in j0..i {
                let f = l[i * n + k];
                if f != 0.0 {
                    for (a, b) in xi.iter_mut().zip(&done[k * COLS..(k + 1) * COLS]) {
                        *a -= f * b;
                    }
                }
            }
            let d = 1.0 / l[i * n + i];
            xi.iter_mut().for_each(|v| *v *= d);
            x[i * n + j0..i * n + j0 + w].copy_from_slice(&xi[..w]);
        }
    }
    x
}

/// Upper-triangular U with Uᵀ·U = a⁻¹ (GPTQ's factor of the inverse Hessian), from one
/// Cholesky: with J the reversal, J·a·J = L·Lᵀ gives a = V·Vᵀ for V = J·L·J (upper), so
/// a⁻¹ = V⁻ᵀ·V⁻¹ and U = V⁻¹ = J·L⁻¹·J.
pub fn upper_cholesky_of_inverse(a: &[f64], n: usize) -> Result<Vec<f64>> {
    let rev: Vec<f64> = (0..n * n).map(|e| a[(n - 1 - e / n) * n + (n - 1 - e % n)]).collect();
    let linv = lower_inverse(&cholesky(&rev, n)?, n);
    Ok((0..n * n).map(|e| linv[(n - 1 - e / n) * n + (n - 1 - e % n)]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn spd(n: usize, rng: &mut Rng) -> Vec<f64> {
        let b: Vec<f64> = (0..n * n).map(|_| rng.normal() as f64).collect();
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] =
                    (0..n).map(|k| b[i * n + k] * b[j * n + k]).sum::<f64>() + if i == j { 0.5 } else { 0.0 };
            }
        }
        a
    }

    fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
        (0..n * n).map(|e| (0..n).map(|k| a[e / n * n + k] * b[k * n + e % n]).sum()).collect()
    }

    #[test]
    fn factors_reconstruct() {
        let mut rng = Rng::new(7);
        // 150: several column blocks of the inverse, the last one partial.
        for n in [9, 150] {
            let a = spd(n, &mut rng);
            let l = cholesky(&a, n).unwrap();
            let lt: Vec<f64> = (0..n * n).map(|e| l[e % n * n + e / n]).collect();
            let llt = matmul(&l, &lt, n);
            let scale = a.iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(llt.iter().zip(&a).all(|(x, y)| (x - y).abs() < 1e-9 * scale));
            let li = lower_inverse(&l, n);
            assert!((0..n * n).all(|e| e / n >= e % n || li[e] == 0.0), "lower triangular");
            let id = matmul(&l, &li, n);
            assert!(id.iter().enumerate().all(|(e, v)| (v - if e / n == e % n { 1.0 } else { 0.0 }).abs() < 1e-9));
            // Uᵀ U · a = I, U upper.
            let u = upper_cholesky_of_inverse(&a, n).unwrap();
            assert!((0..n * n).all(|e| e / n <= e % n || u[e] == 0.0));
            let ut: Vec<f64> = (0..n * n).map(|e| u[e % n * n + e / n]).collect();
            let id = matmul(&matmul(&ut, &u, n), &a, n);
            assert!(id.iter().enumerate().all(|(e, v)| (v - if e / n == e % n { 1.0 } else { 0.0 }).abs() < 1e-8));
        }
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_err(), "indefinite");
    }
}
