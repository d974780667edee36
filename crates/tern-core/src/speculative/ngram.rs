//! Prompt lookup decoding: propose what followed the latest earlier occurrence of the
//! sequence's last n tokens (in the prompt or the text generated so far). Costs no model; pays
//! where the output copies its input (edits, quotes, code rewrites).

/// Up to `k` tokens that followed the latest earlier occurrence of the last n tokens of
/// `tokens`, trying n = `max_n` down to `min_n`; empty when nothing matches.
pub fn propose(tokens: &[u32], min_n: usize, max_n: usize, k: usize) -> Vec<u32> {
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
        assert_eq!(propose(&t, 1, 3, 2), vec![7, 8]);
        assert_eq!(propose(&t, 1, 3, 10), vec![7, 8, 6, 1, 2, 3]);
        // No 3-gram match: falls back to shorter n.
        let t = [5, 6, 7, 1, 2, 8, 9, 3, 2];
        assert_eq!(propose(&t, 1, 3, 3), vec![8, 9, 3]);
        assert_eq!(propose(&t, 2, 3, 3), Vec::<u32>::new());
        assert_eq!(propose(&[1], 1, 3, 4), Vec::<u32>::new());
        // A match right before the suffix proposes the suffix's own start (repetition).
        assert_eq!(propose(&[4, 4, 4, 4], 1, 2, 3), vec![4]);
    }
}
