//! Prompt lookup decoding: propose what followed the latest earlier occurrence of the
//! sequence's last n tokens (in the prompt or the text generated so far). Costs no model; pays
//! where the output copies its input (edits, quotes, code rewrites).

/// Up to `k` tokens that followed the latest earlier occurrence of the last n tokens of
/// `tokens`, trying n = `max_n` down to `min_n`; empty when nothing matches. A short match
/// predicts less: with `per_match` > 0 at most `per_match` · n tokens are proposed, so that a
/// one-token match does not make the model verify a long guess.
pub fn propose(tokens: &[u32], min_n: usize, max_n: usize, per_match: usize, k: usize) -> Vec<u32> {
    let len = tokens.len();
    for n in (min_n.max(1)..=max_n).rev() {
        if n >= len {
            continue;
        }
        let suffix = &tokens[len - n..];
        // Latest start first; the match must end before the suffix itself starts.
        for start in (0..len - n).rev() {
            if &tokens[start..start + n] == suffix {
                let from = start + n;
                let k = if per_match > 0 { k.min(per_match * n) } else { k };
                return tokens[from..(from + k).min(len)].to_vec();
            }
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposes_the_continuation_of_the_latest_match() {
        // "1 2 3 4 5 ... 1 2 3" → 4 5 (the latest occurrence of the 3-gram)
        let t = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 6, 1, 2, 3];
        assert_eq!(propose(&t, 1, 3, 0, 2), vec![7, 8]);
        assert_eq!(propose(&t, 1, 3, 0, 10), vec![7, 8, 6, 1, 2, 3]);
        // No 3-gram match: falls back to shorter n.
        let t = [5, 6, 7, 1, 2, 8, 9, 3, 2];
        assert_eq!(propose(&t, 1, 3, 0, 3), vec![8, 9, 3]);
        assert_eq!(propose(&t, 2, 3, 0, 3), Vec::<u32>::new());
        assert_eq!(propose(&[1], 1, 3, 0, 4), Vec::<u32>::new());
        // A match right before the suffix proposes the suffix's own start (repetition).
        assert_eq!(propose(&[4, 4, 4, 4], 1, 2, 0, 3), vec![4]);
        // Capped at per_match · n: the 3-gram match proposes 6, a 1-gram match 2.
        let t = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3];
        assert_eq!(propose(&t, 1, 3, 2, 10), vec![4, 5, 6, 7, 8, 9]);
        assert_eq!(propose(&[7, 1, 2, 3, 4, 5, 7], 1, 3, 2, 10), vec![1, 2]);
    }
}
