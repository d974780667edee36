//! The dense f64 linear algebra GPTQ needs (n up to a few thousand): Cholesky factors and
//! triangular inverses on row-major matrices, inner loops over contiguous rows.

use anyhow::{bail, Result};

/// Lower-triangular L with L·Lᵀ = a (n × n, symmetric positive definite).
pub fn cholesky(a: &[f64], n: usize) -> Result<Vec<f64>> {
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let (li, lj) = (&l[i * n..i * n + j], &l[j * n..j * n + j]);
            let s = a[i * n + j] - li.iter().zip(lj).map(|(x, y)| x * y).sum::<f64>();
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
    Ok(l)
}

/// The inverse of a lower-triangular matrix (row by row: X_i = (e_i − Σ_k<i L_ik X_k) / L_ii).
pub fn lower_inverse(l: &[f64], n: usize) -> Vec<f64> {
    let mut x = vec![0f64; n * n];
    for i in 0..n {
        let (done, rest) = x.split_at_mut(i * n);
        let xi = &mut rest[..n];
        xi[i] = 1.0;
        for k in 0..i {
            let f = l[i * n + k];
            if f != 0.0 {
                for (a, b) in xi[..=k].iter_mut().zip(&done[k * n..k * n + k + 1]) {
                    *a -= f * b;
                }
            }
        }
        let d = 1.0 / l[i * n + i];
        xi[..=i].iter_mut().for_each(|v| *v *= d);
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
        let n = 9;
        let a = spd(n, &mut rng);
        let l = cholesky(&a, n).unwrap();
        let lt: Vec<f64> = (0..n * n).map(|e| l[e % n * n + e / n]).collect();
        let llt = matmul(&l, &lt, n);
        assert!(llt.iter().zip(&a).all(|(x, y)| (x - y).abs() < 1e-9));
        let li = lower_inverse(&l, n);
        let id = matmul(&l, &li, n);
        assert!(id.iter().enumerate().all(|(e, v)| (v - if e / n == e % n { 1.0 } else { 0.0 }).abs() < 1e-9));
        // Uᵀ U · a = I, U upper.
        let u = upper_cholesky_of_inverse(&a, n).unwrap();
        assert!((0..n * n).all(|e| e / n <= e % n || u[e] == 0.0));
        let ut: Vec<f64> = (0..n * n).map(|e| u[e % n * n + e / n]).collect();
        let id = matmul(&matmul(&ut, &u, n), &a, n);
        assert!(id.iter().enumerate().all(|(e, v)| (v - if e / n == e % n { 1.0 } else { 0.0 }).abs() < 1e-8));
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_err(), "indefinite");
    }
}
