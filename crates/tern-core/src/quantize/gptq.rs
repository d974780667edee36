//! GPTQ (Frantar et al. 2022): quantize a layer's weights column by column, each column's
//! rounding error spread over the columns not yet quantized through the inverse Hessian of
//! the layer's inputs (H = Σ x·xᵀ over calibration tokens), in blocks of 128 columns with lazy
//! updates of the rest. Damping adds `damp` · mean(diag H) to the diagonal; columns with no
//! signal (H_ii = 0) are zeroed. With `act_order` columns go in order of decreasing H_ii.
//! The group grids are fixed from the unmodified weights first ("static groups"): groups stay
//! contiguous in the stored layout whatever the order, and the compensation cannot widen a
//! later group's range (with grids taken from the updated weights, SmolLM2-135M lost
//! perplexity against plain round-to-nearest).

use super::int4::{Grid, Int4Matrix};
use super::linalg::upper_cholesky_of_inverse;
use anyhow::Result;

#[derive(Clone, Copy, Debug)]
pub struct GptqOptions {
    pub group: usize,
    pub damp: f64,
    pub act_order: bool,
}

const BLOCK: usize = 128;

/// GPTQ of `w` (rows × cols, row-major) given the input Hessian `h` (cols × cols).
pub fn gptq(w: &[f32], rows: usize, cols: usize, h: &[f64], o: GptqOptions) -> Result<Int4Matrix> {
    let mut h = h.to_vec();
    let mut w: Vec<f32> = w.to_vec();
    for i in 0..cols {
        if h[i * cols + i] == 0.0 {
            h[i * cols + i] = 1.0;
            (0..rows).for_each(|r| w[r * cols + i] = 0.0);
        }
    }
    let gpr = cols.div_ceil(o.group);
    let mut grids = vec![Grid { d: 0.0, m: 0.0 }; rows * gpr];
    let group_grids = |w: &[f32], grids: &mut [Grid], g: usize| {
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            grids[r * gpr + g] = Grid::for_values(&row[g * o.group..((g + 1) * o.group).min(cols)]);
        }
    };
    (0..gpr).for_each(|g| group_grids(&w, &mut grids, g));
    let mut perm: Vec<usize> = (0..cols).collect();
    if o.act_order {
        perm.sort_by(|&a, &b| h[b * cols + b].total_cmp(&h[a * cols + a]));
    }
    // Work in the permuted column order: wp[r][i] = w[r][perm[i]], hp[i][j] = h[perm[i]][perm[j]].
    let mut wp: Vec<f32> = (0..rows * cols).map(|e| w[e / cols * cols + perm[e % cols]]).collect();
    let mut hp: Vec<f64> = (0..cols * cols).map(|e| h[perm[e / cols] * cols + perm[e % cols]]).collect();
    let mean_diag = (0..cols).map(|i| hp[i * cols + i]).sum::<f64>() / cols as f64;
    (0..cols).for_each(|i| hp[i * cols + i] += o.damp * mean_diag);
    let u = upper_cholesky_of_inverse(&hp, cols)?;
    drop(hp);

    let mut codes = vec![0u8; rows * cols];
    let mut err = vec![0f32; rows * BLOCK];
    for i0 in (0..cols).step_by(BLOCK) {
        let i1 = (i0 + BLOCK).min(cols);
        let bw = i1 - i0;
        for i in i0..i1 {
            let c = perm[i];
            let uii = u[i * cols + i] as f32;
            let urow: Vec<f32> = u[i * cols + i + 1..i * cols + i1].iter().map(|&v| v as f32).collect();
            for r in 0..rows {
                let g = grids[r * gpr + c / o.group];
                let v = wp[r * cols + i];
                let q = g.code(v);
                codes[r * cols + c] = q;
                let e = (v - g.value(q)) / uii;
                err[r * BLOCK + (i - i0)] = e;
                for (x, &uu) in wp[r * cols + i + 1..r * cols + i1].iter_mut().zip(&urow) {
                    *x -= e * uu;
                }
            }
        }
        // The block's errors reach the remaining columns at once: W[:, i1..] -= E · U[i0..i1, i1..].
        if i1 < cols {
            let ub: Vec<f32> =
                (i0..i1).flat_map(|i| u[i * cols + i1..(i + 1) * cols].iter().map(|&v| v as f32)).collect();
            let rest = cols - i1;
            for r in 0..rows {
                let tail = &mut wp[r * cols + i1..(r + 1) * cols];
                for k in 0..bw {
                    let e = err[r * BLOCK + k];
                    if e != 0.0 {
                        for (x, &uu) in tail.iter_mut().zip(&ub[k * rest..(k + 1) * rest]) {
                            *x -= e * uu;
                        }
                    }
                }
            }
        }
    }
    Ok(Int4Matrix { rows, cols, group: o.group, codes, grids })
}
