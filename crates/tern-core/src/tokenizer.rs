//! Tokenizer: byte-level BPE built from GGUF metadata, or a Hugging Face `tokenizer.json`,
//! plus the special-token facts generation needs (BOS rule, end-of-generation tokens).

use crate::gguf::GgufFile;
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// GPT-2's split pattern (the byte-level default), written out for pre-tokenizer sequences.
const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Qwen2's split pattern (single digits, newline runs kept apart).
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama-3's split pattern (digits in groups of up to three).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Texts of tokens that end generation when they are control tokens (as llama.cpp decides).
const END_OF_GENERATION_TEXTS: &[&str] =
    &["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "</s>", "<end_of_turn>", "<|eom_id|>"];

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// Tokens that end generation (EOS, end-of-turn, ...).
    pub stop_tokens: Vec<u32>,
    pub chat_template: Option<String>,
}

impl Tokenizer {
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let model =
            f.get_str("tokenizer.ggml.model").context("GGUF has no tokenizer (tokenizer.ggml.model missing)")?;
        if model != "gpt2" {
            bail!("tokenizer model {model:?} is not supported yet (supported: gpt2 byte-level BPE)");
        }
        let tokens = f.get_str_array("tokenizer.ggml.tokens")?.context("tokenizer.ggml.tokens missing")?;
        let merges = f.get_str_array("tokenizer.ggml.merges")?.context("tokenizer.ggml.merges missing")?;
        let types: Vec<i64> = match f.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
            Some(a) => a.iter().map(|v| v.as_u64().map_or(1, |x| x as i64)).collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .with_context(|| format!("malformed merge {m:?}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| anyhow!("building BPE: {e}"))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);

        let pre = f.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let byte_level = |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, use_regex));
        let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
            Ok(PreTokenizerWrapper::Split(
                Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| anyhow!("{e}"))?,
            ))
        };
        let pre_tokenizer = match pre {
            // SmolLM2's tokenizer.json: single digits first, then GPT-2 byte-level splitting.
            "smollm" => Sequence::new(vec![PreTokenizerWrapper::Digits(Digits::new(true)), byte_level(true)]),
            "qwen2" | "deepseek-r1-qwen" => Sequence::new(vec![split(QWEN2_PATTERN)?, byte_level(false)]),
            "llama-bpe" | "llama3" => Sequence::new(vec![split(LLAMA3_PATTERN)?, byte_level(false)]),
            "default" | "gpt2" | "gpt-2" => Sequence::new(vec![split(GPT2_PATTERN)?, byte_level(false)]),
            other => bail!("pre-tokenizer {other:?} (tokenizer.ggml.pre) is not supported yet"),
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        if pre.starts_with("qwen2") {
            // Qwen2's tokenizer.json normalizes to NFC before splitting.
            inner.with_normalizer(Some(NFC));
        }
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        // Control (3) and user-defined (4) tokens are matched whole in the input text.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == 3 || ty == 4)
            .map(|(t, &ty)| AddedToken::from(t.to_string(), ty == 3))
            .collect();
        inner.add_special_tokens(&specials);

        let id = |key: &str| f.get_u64(key).map(|v| v as u32).filter(|&v| (v as usize) < tokens.len());
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let mut stop_tokens: Vec<u32> =
            [eos, id("tokenizer.ggml.eot_token_id"), id("tokenizer.ggml.eom_token_id")].into_iter().flatten().collect();
        for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
            if ty == 3 && END_OF_GENERATION_TEXTS.contains(t) && !stop_tokens.contains(&(i as u32)) {
                stop_tokens.push(i as u32);
            }
        }
        Ok(Tokenizer {
            inner,
            bos,
            eos,
            add_bos: f.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(false) && bos.is_some(),
            stop_tokens,
            chat_template: f.get_str("tokenizer.chat_template").map(str::to_string),
        })
    }

    /// Loads `tokenizer.json` (and `tokenizer_config.json` for BOS rule and chat template).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| anyhow!("cannot load {}: {e}", path.display()))?;
        let config: serde_json::Value = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(text) => serde_json::from_str(&text).context("tokenizer_config.json is not valid JSON")?,
            Err(_) => serde_json::Value::Null,
        };
        let token_id = |key: &str| -> Option<u32> {
            let v = &config[key];
            let text = v.as_str().or_else(|| v["content"].as_str())?;
            inner.token_to_id(text)
        };
        let (bos, eos) = (token_id("bos_token"), token_id("eos_token"));
        let mut stop_tokens: Vec<u32> = eos.into_iter().collect();
        for t in END_OF_GENERATION_TEXTS {
            if let Some(id) = inner.token_to_id(t).filter(|id| !stop_tokens.contains(id)) {
                stop_tokens.push(id);
            }
        }
        Ok(Tokenizer {
            bos,
            eos,
            add_bos: config["add_bos_token"].as_bool().unwrap_or(false) && bos.is_some(),
            stop_tokens,
            chat_template: config["chat_template"].as_str().map(str::to_string),
            inner,
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (BOS/EOS, BOS rule, chat template)
    /// into `dir`, so a model written in Hugging Face layout carries its tokenizer.
    pub fn save_hf_dir(&self, dir: &Path) -> Result<()> {
        let text = |id: Option<u32>| id.and_then(|i| self.token_text(i));
        let config = serde_json::json!({
            "bos_token": text(self.bos),
            "eos_token": text(self.eos),
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template,
        });
        self.inner
            .save(dir.join("tokenizer.json"), false)
            .map_err(|e| anyhow!("cannot write {}: {e}", dir.join("tokenizer.json").display()))?;
        std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?)
            .with_context(|| format!("cannot write tokenizer_config.json in {}", dir.display()))
    }

    /// Token ids of `text`; with `add_special`, BOS is prepended when the model asks for it.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| anyhow!("detokenizing: {e}"))
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn is_stop_token(&self, id: u32) -> bool {
        self.stop_tokens.contains(&id)
    }

    /// Whether both map every token text to the same id (added tokens included): a draft
    /// model's proposals mean the same to the target only then.
    pub fn same_vocabulary(&self, other: &Tokenizer) -> bool {
        self.inner.get_vocab(true) == other.inner.get_vocab(true)
    }
}

/// Turns a token stream into text deltas that never split a UTF-8 character: text is held
/// back while the decoded tail is an incomplete byte sequence (decoded as U+FFFD).
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special: bool,
}

impl StreamDecoder {
    pub fn new(skip_special: bool) -> Self {
        StreamDecoder { ids: Vec::new(), prefix_offset: 0, read_offset: 0, skip_special }
    }

    /// Adds a token; returns the new text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(full[prefix.len()..].to_string());
        }
        Ok(String::new())
    }

    /// Whatever is still held back (an incomplete character becomes U+FFFD).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or("").to_string())
    }
}
