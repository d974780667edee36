//! Stop strings over streamed text: text that could still become a stop string is held back,
//! and the output ends right before the first stop string.

pub struct StopChecker {
    stops: Vec<String>,
    pending: String,
    matched: bool,
}

impl StopChecker {
    pub fn new(stops: &[String]) -> Self {
        StopChecker {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
            matched: false,
        }
    }

    /// No stop strings: streamed text never ends the output.
    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    pub fn matched(&self) -> bool {
        self.matched
    }

    /// Adds streamed text; returns (text safe to emit, whether a stop string was hit).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        if self.matched {
            return (String::new(), true);
        }
        self.pending.push_str(delta);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            self.matched = true;
            let emit = self.pending[..at].to_string();
            self.pending.clear();
            return (emit, true);
        }
        // Hold back the longest tail that is a prefix of some stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
            .filter(|prefix| self.pending.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let emit = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (emit, false)
    }

    /// End of generation: whatever is held back (after a final check) is emitted.
    pub fn finish(&mut self, tail: &str) -> String {
        let (mut emit, hit) = self.push(tail);
        if !hit {
            emit.push_str(&std::mem::take(&mut self.pending));
        }
        emit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut c = StopChecker::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let mut out = String::new();
        for d in deltas {
            let (e, hit) = c.push(d);
            out += &e;
            if hit {
                return (out, true);
            }
        }
        out += &c.finish("");
        (out, false)
    }

    #[test]
    fn stops_across_deltas_and_holds_partial_matches() {
        assert_eq!(run(&["END"], &["abc E", "N", "D tail"]), ("abc ".into(), true));
        assert_eq!(run(&["END"], &["abc E", "N", "x"]), ("abc ENx".into(), false));
        assert_eq!(run(&["\n\n", "stop"], &["a\n", "\nb"]), ("a".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
    }
}
