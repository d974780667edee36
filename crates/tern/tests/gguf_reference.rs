//! The real GGUF models against the transformers reference data in reference/data/
//! (made by reference/make_reference.py): tokenization, chat templates, greedy continuations
//! and log-probabilities.
//!
//! Tolerances: tern, like llama.cpp, quantizes activations to 8 bits for its dot products with
//! quantized weights, while the reference runs float32 on dequantized weights. Greedy tokens
//! must therefore match exactly only up to the first step where the reference's top-2 logit
//! gap is a near-tie (< 0.25). Log-probabilities of the reference's top-10 tokens (teacher-
//! forced, every step) must average under 0.2 — below llama.cpp's 0.15-0.3 on these files —
//! with no value off by 1.5 or more. Measured: smollm2-135m mean 0.110 / max 1.21 (the max is
//! a rank-10 token of a low-confidence continuation), qwen2.5-0.5b mean 0.063 / max
//! 0.55. The float32 path (dequantized weights) isolates the model code from the kernels and
//! must agree to 1e-3 (measured 6.6e-5 for both models).

mod common;
use common::*;
use serde_json::Value;
use std::sync::Mutex;
use tern_core::chat_template::{ChatMessage, ChatTemplate};
use tern_core::generation::{generate, GenerateRequest};
use tern_core::model::decoder::{Decoder, LogitsFor};
use tern_core::model::{self, LoadedModel, ModelSource};
use tern_core::sampling::SamplingParams;
use tern_core::tokenizer::{StreamDecoder, Tokenizer};

const NEAR_TIE: f64 = 0.25;
const MAX_LOGPROB_ERR: f64 = 1.5;
const MEAN_LOGPROB_ERR: f64 = 0.2;

/// Tests share the 2 cores: one model at a time keeps the thread pool from thrashing.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn reference(key: &str) -> Value {
    let path = repo_root().join(format!("reference/data/{key}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn load(key: &str) -> LoadedModel {
    model::load(&ModelSource::Gguf(model_path(key))).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn check_tokenization(key: &str) {
    // The tokenizer built from GGUF metadata, and the same saved as tokenizer.json and loaded
    // back through the Hugging Face path.
    let tok = load(key).tokenizer.unwrap();
    check_tokenizer(key, &tok);
    let dir = std::env::temp_dir().join(format!("tern-tok-{key}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    tok.save_hf_dir(&dir).unwrap();
    let hf = Tokenizer::from_hf_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        (hf.bos, hf.eos, hf.add_bos),
        (tok.bos, tok.eos, tok.add_bos),
        "{key}: special tokens via tokenizer.json"
    );
    assert_eq!(hf.chat_template, tok.chat_template);
    check_tokenizer(key, &hf);
}

fn check_tokenizer(key: &str, tok: &Tokenizer) {
    let r = reference(key);
    let mut failures = Vec::new();
    for case in r["tokenization"]["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        for (field, special) in [("ids", false), ("ids_with_special", true)] {
            let ours = tok.encode(text, special).unwrap();
            if ours != ids(&case[field]) {
                failures.push(format!("{text:?} ({field}): ours {ours:?}, reference {}", case[field]));
            }
        }
    }
    assert!(failures.is_empty(), "{key}: {} tokenization mismatches:\n{}", failures.len(), failures.join("\n"));

    // Streaming detokenization: token by token, the deltas never hold a broken character
    // (U+FFFD) and add up to the text.
    for case in r["tokenization"]["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        if text.contains('\u{FFFD}') || text.contains("<|") {
            continue;
        }
        let mut stream = StreamDecoder::new(true);
        let mut joined = String::new();
        for id in tok.encode(text, false).unwrap() {
            let delta = stream.push(tok, id).unwrap();
            assert!(!delta.contains('\u{FFFD}'), "{key}: broken character streaming {text:?}");
            joined += &delta;
        }
        joined += &stream.flush(tok).unwrap();
        assert_eq!(joined, tok.decode(&tok.encode(text, false).unwrap(), true).unwrap(), "{key}: streamed {text:?}");
    }
}

fn check_chat_template(key: &str) {
    let r = reference(key);
    let tok = load(key).tokenizer.unwrap();
    let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or_default();
    let tmpl = ChatTemplate::new(tok.chat_template.as_deref().unwrap(), &text(tok.bos), &text(tok.eos)).unwrap();
    for render in r["chat_template"]["renders"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = serde_json::from_value(render["messages"].clone()).unwrap();
        let ours = tmpl.render(&messages, render["add_generation_prompt"].as_bool().unwrap()).unwrap();
        assert_eq!(ours, render["text"].as_str().unwrap(), "{key} render {}", render["name"]);
        assert_eq!(tok.encode(&ours, false).unwrap(), ids(&render["ids"]), "{key} render ids {}", render["name"]);
    }
}

/// Compares log-probabilities of the reference's top tokens; returns (max, sum, count) of errors.
fn logprob_errors(ours: &[f32], top: &Value) -> (f64, f64, usize) {
    let max = ours.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = ours.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() + max as f64;
    let mut acc = (0.0f64, 0.0f64, 0usize);
    for pair in top.as_array().unwrap() {
        let (id, lp) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap());
        let err = (ours[id] as f64 - lse - lp).abs();
        acc = (acc.0.max(err), acc.1 + err, acc.2 + 1);
    }
    acc
}

fn check_generation(key: &str) {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let r = reference(key);
    let loaded = load(key);
    let tok: Tokenizer = loaded.tokenizer.unwrap();
    let mut model = Decoder::new(loaded.weights, 2).unwrap();
    for g in r["greedy"].as_array().unwrap() {
        let name = g["name"].as_str().unwrap();
        let prompt = ids(&g["prompt_ids"]);
        let expected = ids(&g["output_ids"]);
        let steps = g["steps"].as_array().unwrap();
        // The prompt ids are what our tokenizer makes of the same text.
        let ours_prompt = tok.encode(g["prompt_text"].as_str().unwrap(), g["kind"] == "plain").unwrap();
        assert_eq!(ours_prompt, prompt, "{key}/{name}: prompt tokenization");

        let req = GenerateRequest {
            ignore_eos: true,
            ..GenerateRequest::new(prompt.clone(), expected.len(), SamplingParams::greedy())
        };
        let out = generate(&mut model, &tok, &req, |_| {}).unwrap();
        let first_tie = steps.iter().position(|s| s["top2_gap"].as_f64().unwrap() < NEAR_TIE).unwrap_or(steps.len());
        let agree = out.output_ids.iter().zip(&expected).take_while(|(a, b)| a == b).count();
        assert!(
            agree >= first_tie.min(expected.len()),
            "{key}/{name}: greedy tokens diverge at step {agree}, before the first near-tie at step {first_tie}\nours: {:?}\nref:  {:?}",
            out.output_ids,
            expected
        );
    }
    let (worst, mean) = logprob_errors_over_reference(&mut model, &r);
    eprintln!("{key}: logprob error vs transformers: max {worst:.3}, mean {mean:.4}");
    assert!(worst < MAX_LOGPROB_ERR && mean < MEAN_LOGPROB_ERR, "{key}: logprob error max {worst:.3}, mean {mean:.3}");
}

/// Teacher-forced over each reference continuation and prompt: (max, mean) error of the
/// log-probabilities of the reference's top tokens at every step.
fn logprob_errors_over_reference(model: &mut Decoder, r: &Value) -> (f64, f64) {
    let vocab = model.config().vocab_size;
    let (mut worst, mut sum, mut n) = (0.0f64, 0.0f64, 0usize);
    let mut add = |(m, total, count): (f64, f64, usize)| {
        worst = worst.max(m);
        sum += total;
        n += count;
    };
    let mut logits = Vec::new();
    for g in r["greedy"].as_array().unwrap() {
        let prompt = ids(&g["prompt_ids"]);
        let mut all = prompt.clone();
        all.extend(ids(&g["output_ids"]));
        let mut cache = model.new_cache(all.len());
        model.forward(&all, &mut cache, LogitsFor::All, &mut logits).unwrap();
        for (s, step) in g["steps"].as_array().unwrap().iter().enumerate() {
            add(logprob_errors(&logits[(prompt.len() - 1 + s) * vocab..(prompt.len() + s) * vocab], &step["top"]));
        }
    }
    for p in r["prompt_logprobs"].as_array().unwrap() {
        let prompt = ids(&p["prompt_ids"]);
        let mut cache = model.new_cache(prompt.len());
        model.forward(&prompt, &mut cache, LogitsFor::All, &mut logits).unwrap();
        for (i, pos) in p["positions"].as_array().unwrap().iter().enumerate() {
            add(logprob_errors(&logits[i * vocab..(i + 1) * vocab], &pos["top"]));
        }
    }
    (worst, sum / n as f64)
}

/// The float32 path (weights dequantized, no activation quantization) must reproduce
/// transformers' float32 numbers almost exactly: this isolates the model code from the
/// quantized kernels.
fn check_float_path(key: &str) {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let r = reference(key);
    let weights = load(key).weights.dequantized().unwrap();
    let mut model = Decoder::new(weights, 2).unwrap();
    let (worst, mean) = logprob_errors_over_reference(&mut model, &r);
    eprintln!("{key} float32 path: logprob error vs transformers: max {worst:.2e}, mean {mean:.2e}");
    assert!(worst < 1e-3, "{key} float32 path: logprob error max {worst:.2e}");
}

#[test]
fn smollm2_tokenization_matches_reference() {
    check_tokenization("smollm2-135m");
}

#[test]
fn qwen_tokenization_matches_reference() {
    check_tokenization("qwen2.5-0.5b");
}

#[test]
fn smollm2_chat_template_matches_reference() {
    check_chat_template("smollm2-135m");
}

#[test]
fn qwen_chat_template_matches_reference() {
    check_chat_template("qwen2.5-0.5b");
}

#[test]
fn smollm2_generation_matches_reference() {
    check_generation("smollm2-135m");
}

#[test]
fn qwen_generation_matches_reference() {
    check_generation("qwen2.5-0.5b");
}

#[test]
fn smollm2_float_path_matches_reference_exactly() {
    check_float_path("smollm2-135m");
}

#[test]
fn qwen_float_path_matches_reference_exactly() {
    check_float_path("qwen2.5-0.5b");
}
