//! The real GGUF models against the transformers reference data in reference/data/
//! (made by reference/make_reference.py): tokenization, chat templates, greedy continuations
//! and log-probabilities.
//!
//! Tolerances: tern, like llama.cpp, quantizes activations to 8 bits for its dot products with
//! quantized weights, while the reference runs float32 on dequantized weights. Greedy tokens
//! must therefore match exactly only up to the first step where the reference's top-2 logit
//! gap is a near-tie (< 0.25). Log-probabilities of the reference's top tokens are compared
//! with a bound of 1.0 per value and 0.3 on average: llama.cpp on these files stays within 0.9,
//! averaging 0.15-0.3.

mod common;
use common::*;
use serde_json::Value;
use std::sync::Mutex;
use tern_core::chat_template::{ChatMessage, ChatTemplate};
use tern_core::generation::{generate, GenerateRequest};
use tern_core::model::decoder::{Decoder, LogitsFor};
use tern_core::model::{self, LoadedModel, ModelSource};
use tern_core::sampling::SamplingParams;
use tern_core::tokenizer::Tokenizer;

const NEAR_TIE: f64 = 0.25;
const MAX_LOGPROB_ERR: f64 = 1.0;
const MEAN_LOGPROB_ERR: f64 = 0.3;

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
    let r = reference(key);
    let tok = load(key).tokenizer.unwrap();
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
    let mut model = Decoder::new(loaded.weights, 2);
    let vocab = model.config().vocab_size;
    let (mut worst, mut sum, mut n) = (0.0f64, 0.0f64, 0usize);
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

        // Teacher-forced over the reference continuation: logprobs at every generated step.
        let mut all = prompt.clone();
        all.extend(&expected);
        let mut cache = model.new_cache(all.len());
        let mut logits = Vec::new();
        model.forward(&all, &mut cache, LogitsFor::All, &mut logits).unwrap();
        for (s, step) in steps.iter().enumerate() {
            let row = &logits[(prompt.len() - 1 + s) * vocab..(prompt.len() + s) * vocab];
            let (m, total, count) = logprob_errors(row, &step["top"]);
            worst = worst.max(m);
            sum += total;
            n += count;
            if std::env::var("TERN_DEBUG_REF").is_ok() {
                eprintln!("{name} step {s}: max err {m:.3}");
            } else {
                assert!(m < MAX_LOGPROB_ERR, "{key}/{name} step {s}: logprob error {m:.3}");
            }
        }
    }
    for p in r["prompt_logprobs"].as_array().unwrap() {
        let prompt = ids(&p["prompt_ids"]);
        let mut cache = model.new_cache(prompt.len());
        let mut logits = Vec::new();
        model.forward(&prompt, &mut cache, LogitsFor::All, &mut logits).unwrap();
        for (i, pos) in p["positions"].as_array().unwrap().iter().enumerate() {
            let (m, total, count) = logprob_errors(&logits[i * vocab..(i + 1) * vocab], &pos["top"]);
            worst = worst.max(m);
            sum += total;
            n += count;
            assert!(m < MAX_LOGPROB_ERR, "{key}/{} position {i}: logprob error {m:.3}", p["name"]);
        }
    }
    let mean = sum / n as f64;
    eprintln!("{key}: logprob error vs transformers: max {worst:.3}, mean {mean:.3} over {n} values");
    assert!(mean < MEAN_LOGPROB_ERR, "{key}: mean logprob error {mean:.3}");
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
