//! The acceptance rule of speculative sampling (Leviathan et al. 2023; Chen et al. 2023): a
//! proposed token d drawn from the proposer's distribution q is kept with probability
//! min(1, p(d) / q(d)) under the target's distribution p; otherwise the token is drawn from the
//! residual max(0, p − q), normalized. The kept-or-replaced token then has exactly the
//! distribution p. A deterministic proposal is q = a point mass at d (accept with probability
//! p(d), else draw from p without d); a greedy target is p = a point mass at its argmax, so the
//! rule keeps d exactly when it is the argmax and otherwise emits the argmax.

use std::collections::HashMap;

/// A distribution over tokens as (token, probability) pairs.
pub type Dist = [(u32, f64)];

fn prob(d: &Dist, token: u32) -> f64 {
    d.iter().find(|x| x.0 == token).map_or(0.0, |x| x.1)
}

/// The acceptance test for proposal `d` at one position. `q` is the distribution d was drawn
/// from (None: a point mass at d). `u_accept` and `u_resample` are uniform in [0, 1). Returns
/// None when d is accepted, else the token to emit instead.
pub fn check(p: &Dist, q: Option<&Dist>, d: u32, u_accept: f64, u_resample: f64) -> Option<u32> {
    let pd = prob(p, d);
    let qd = q.map_or(1.0, |q| prob(q, d));
    if qd > 0.0 && u_accept < (pd / qd).min(1.0) {
        return None;
    }
    Some(draw_residual(p, q, d, u_resample))
}

/// A draw from max(0, p − q) normalized (q None: a point mass at d).
fn draw_residual(p: &Dist, q: Option<&Dist>, d: u32, u: f64) -> u32 {
    let q_of: Box<dyn Fn(u32) -> f64> = match q {
        None => Box::new(move |t| if t == d { 1.0 } else { 0.0 }),
        // A map for long distributions; scanning is faster for short ones.
        Some(q) if q.len() > 32 => {
            let m: HashMap<u32, f64> = q.iter().copied().collect();
            Box::new(move |t| m.get(&t).copied().unwrap_or(0.0))
        }
        Some(q) => Box::new(move |t| prob(q, t)),
    };
    let residual: Vec<(u32, f64)> =
        p.iter().map(|&(t, pt)| (t, (pt - q_of(t)).max(0.0))).filter(|x| x.1 > 0.0).collect();
    let total: f64 = residual.iter().map(|x| x.1).sum();
    if total <= 0.0 {
        // p ≤ q everywhere means p = q: rejection had probability 0 (rounding got here).
        return crate::sampling::draw(p, u);
    }
    crate::sampling::draw(&residual, u * total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Proposals drawn from q, checked against p with `rule`: the emitted tokens' counts.
    fn emitted(p: &Dist, q: &Dist, n: usize, rule: impl Fn(&Dist, &Dist, u32, f64, f64) -> u32) -> Vec<usize> {
        let mut rng = Rng::new(11);
        let mut counts = vec![0usize; p.len()];
        for _ in 0..n {
            let d = crate::sampling::draw(q, rng.next_f32() as f64);
            let t = rule(p, q, d, rng.next_f32() as f64, rng.next_f32() as f64);
            counts[t as usize] += 1;
        }
        counts
    }

    /// Pearson's chi-square statistic of `counts` against probabilities `p`.
    fn chi_square(counts: &[usize], p: &Dist) -> f64 {
        let n: usize = counts.iter().sum();
        counts.iter().zip(p).map(|(&c, &(_, pt))| (c as f64 - n as f64 * pt).powi(2) / (n as f64 * pt)).sum()
    }

    // 4 degrees of freedom (5 tokens): P(χ² > 18.47) = 0.001.
    const CHI2_4_P001: f64 = 18.47;

    #[test]
    fn accepted_or_resampled_tokens_follow_the_target() {
        let p: Vec<(u32, f64)> = vec![(0, 0.5), (1, 0.2), (2, 0.15), (3, 0.1), (4, 0.05)];
        let q: Vec<(u32, f64)> = vec![(0, 0.1), (1, 0.1), (2, 0.2), (3, 0.3), (4, 0.3)];
        let exact = |p: &Dist, q: &Dist, d, u, v| check(p, Some(q), d, u, v).unwrap_or(d);
        let counts = emitted(&p, &q, 200_000, exact);
        let chi = chi_square(&counts, &p);
        eprintln!("exact rule: counts {counts:?}, chi-square {chi:.2}");
        assert!(chi < CHI2_4_P001, "chi-square {chi} against p");
        // Wrong rules fail the same test: always keeping the proposal (the output is q), and
        // resampling from p instead of the residual (the output leans towards q).
        let keep = |_: &Dist, _: &Dist, d, _, _| d;
        let wrong_residual = |p: &Dist, q: &Dist, d, u, v| {
            if u < (prob(p, d) / prob(q, d)).min(1.0) {
                d
            } else {
                crate::sampling::draw(p, v)
            }
        };
        for (name, counts) in
            [("keep", emitted(&p, &q, 200_000, keep)), ("resample p", emitted(&p, &q, 200_000, wrong_residual))]
        {
            let chi = chi_square(&counts, &p);
            eprintln!("{name}: counts {counts:?}, chi-square {chi:.2}");
            assert!(chi > 10.0 * CHI2_4_P001, "the wrong rule {name} passed (chi-square {chi})");
        }
    }

    #[test]
    fn point_masses_give_greedy_and_lookup_semantics() {
        let p = [(3u32, 1.0)];
        assert_eq!(check(&p, None, 3, 0.99, 0.5), None, "the argmax is kept");
        assert_eq!(check(&p, None, 5, 0.0, 0.5), Some(3), "anything else becomes the argmax");
        // A deterministic proposal under a sampled target: kept with probability p(d).
        let p = [(0u32, 0.7), (1, 0.3)];
        assert_eq!(check(&p, None, 1, 0.29, 0.0), None);
        assert_eq!(check(&p, None, 1, 0.31, 0.99), Some(0), "rejected: drawn from p without d");
    }
}
