//! Log-probabilities in OpenAI's two shapes: completions (`tokens`, `token_logprobs`,
//! `top_logprobs`, `text_offset`) and chat (`content: [{token, logprob, bytes, top_logprobs}]`).

use serde_json::{json, Map, Value};
use tern_core::sampling::TokenLogprob;
use tern_core::tokenizer::Tokenizer;

/// The bytes a token stands for. Byte-level BPE vocabularies spell each byte as one
/// printable character (GPT-2's table); a token that is not spelled that way (an added
/// token with other characters) is decoded instead.
pub fn token_bytes(tok: &Tokenizer, id: u32) -> Vec<u8> {
    if let Some(text) = tok.token_text(id) {
        if let Some(bytes) = text.chars().map(byte_level_byte).collect::<Option<Vec<u8>>>() {
            return bytes;
        }
    }
    tok.decode(&[id], false).unwrap_or_default().into_bytes()
}

/// Inverse of GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the
/// other 68 bytes, in order, for U+0100 onwards.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let cp = c as u32;
    if printable(cp) {
        return Some(cp as u8);
    }
    let k = cp.checked_sub(0x100)?;
    (0u32..=0xff).filter(|&b| !printable(b)).nth(k as usize).map(|b| b as u8)
}

/// -inf (or NaN) is not JSON: clamp as vLLM does.
fn finite(lp: f32) -> f32 {
    if lp.is_finite() {
        lp
    } else {
        -9999.0
    }
}

fn token_string(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = token_bytes(tok, id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// Completions: each token's text, logprob, top alternatives (as `{text: logprob}`, with the
/// sampled token always present) and its character offset in the completion text.
pub fn completion(tok: &Tokenizer, entries: &[(TokenLogprob, usize)]) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let mut text_offset = Vec::new();
    for (lp, offset) in entries {
        let (text, _) = token_string(tok, lp.token);
        let mut top = Map::new();
        for &(id, l) in &lp.top {
            top.entry(token_string(tok, id).0).or_insert(json!(finite(l)));
        }
        top.entry(text.clone()).or_insert(json!(finite(lp.logprob)));
        tokens.push(json!(text));
        token_logprobs.push(json!(finite(lp.logprob)));
        top_logprobs.push(Value::Object(top));
        text_offset.push(json!(offset));
    }
    json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    })
}

/// Chat: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.
pub fn chat(tok: &Tokenizer, entries: &[TokenLogprob]) -> Value {
    let entry = |id: u32, l: f32| {
        let (text, bytes) = token_string(tok, id);
        json!({ "token": text, "logprob": finite(l), "bytes": bytes })
    };
    let content: Vec<Value> = entries
        .iter()
        .map(|lp| {
            let mut e = entry(lp.token, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|&(id, l)| entry(id, l)).collect();
            e
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

#[cfg(test)]
mod tests {
    use super::byte_level_byte;

    #[test]
    fn byte_level_table_inverts_gpt2() {
        assert_eq!(byte_level_byte('a'), Some(b'a'));
        assert_eq!(byte_level_byte('Ġ'), Some(b' ')); // U+0120
        assert_eq!(byte_level_byte('Ċ'), Some(b'\n')); // U+010A
        assert_eq!(byte_level_byte('\u{100}'), Some(0));
        assert_eq!(byte_level_byte('\u{143}'), Some(0xad));
        assert_eq!(byte_level_byte('\u{144}'), None);
        assert_eq!(byte_level_byte(' '), None);
    }
}
