//! The `tern` command line on the real default model: output shapes, determinism, errors.

mod common;
use common::*;

fn generate_json(extra: &[&str], prompt: &str) -> serde_json::Value {
    let mut args = vec!["generate", "--model", "smollm2-135m", "--max-tokens", "12", "--json"];
    args.extend(extra);
    args.extend(["--", prompt]);
    serde_json::from_str(&tern_ok(&args)).expect("generate --json prints JSON")
}

#[test]
fn generate_json_has_ids_text_reason_and_logprobs() {
    let v = generate_json(&["--temperature", "0", "--logprobs", "3"], "The capital of France is");
    let output_ids = v["output_ids"].as_array().unwrap();
    assert!(!v["prompt_ids"].as_array().unwrap().is_empty());
    assert!(!output_ids.is_empty() && output_ids.len() <= 12);
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{v}");
    assert!(["stop", "length"].contains(&v["finish_reason"].as_str().unwrap()));
    let lps = v["logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), output_ids.len());
    for (lp, id) in lps.iter().zip(output_ids) {
        assert_eq!(&lp["token"], id);
        let top = lp["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(&top[0][0], id);
        assert!(lp["logprob"].as_f64().unwrap() <= 0.0);
    }
}

#[test]
fn same_seed_same_output_and_stop_strings_cut() {
    let sample = ["--temperature", "1.0", "--top-k", "40", "--seed", "7"];
    let a = generate_json(&sample, "Once upon a time");
    let b = generate_json(&sample, "Once upon a time");
    assert_eq!(a["output_ids"], b["output_ids"]);

    let full = generate_json(&["--temperature", "0"], "The capital of France is");
    let text = full["text"].as_str().unwrap();
    let stop = &text[text.len() / 2..text.len() / 2 + 2];
    let cut = generate_json(&["--temperature", "0", "--stop", stop], "The capital of France is");
    assert_eq!(cut["finish_reason"], "stop");
    assert_eq!(cut["text"].as_str().unwrap(), &text[..text.find(stop).unwrap()]);
}

#[test]
fn tokenize_prints_ids() {
    let ids: Vec<u32> = serde_json::from_str(&tern_ok(&["tokenize", "--", "Hello world"])).unwrap();
    assert_eq!(ids, vec![19556, 905]);
}

#[test]
fn models_lists_known_keys() {
    let out = tern_ok(&["models"]);
    for key in ["smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"] {
        assert!(out.contains(key), "{out}");
    }
}

#[test]
fn bad_input_gets_clear_errors() {
    let path = model_path("smollm2-135m");
    let dir = std::env::temp_dir().join(format!("tern-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // Truncated and corrupted GGUF files.
    let bytes = std::fs::read(&path).unwrap();
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = tern_err(&["generate", "--model", truncated.to_str().unwrap(), "--", "hi"]);
    assert!(err.contains("truncated"), "{err}");
    let corrupt = dir.join("corrupt.gguf");
    let mut c = bytes[..4096].to_vec();
    c[0..4].copy_from_slice(b"XXXX");
    std::fs::write(&corrupt, &c).unwrap();
    let err = tern_err(&["tokenize", "--model", corrupt.to_str().unwrap(), "--", "hi"]);
    assert!(err.contains("not a GGUF file"), "{err}");

    let err = tern_err(&["generate", "--model", "no-such-model", "--", "hi"]);
    assert!(err.contains("unknown model \"no-such-model\""), "{err}");
    let err = tern_err(&["generate", "--temperature", "-1", "--", "hi"]);
    assert!(err.contains("temperature"), "{err}");
    let err = tern_err(&["generate", "--top-p", "1.5", "--", "hi"]);
    assert!(err.contains("top_p"), "{err}");
    let err = tern_err(&["generate", "--max-tokens", "100000", "--", "hi"]);
    assert!(err.contains("maximum context length is 8192 tokens"), "{err}");
    let long_prompt = "word ".repeat(9000);
    let err = tern_err(&["generate", "--max-tokens", "1", "--", &long_prompt]);
    assert!(err.contains("maximum context length is 8192 tokens"), "{err}");
    let err = tern_err(&["generate", "--logprobs", "21", "--", "hi"]);
    assert!(err.contains("--logprobs must be at most 20"), "{err}");
    let err = tern_err(&["pull", "gpt-5"]);
    assert!(err.contains("unknown model key"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hf_directories_and_dummy_weights_run() {
    let tiny = repo_root().join("reference/tiny/qwen2");
    // No tokenizer.json: benchmarking works, text generation says why it cannot.
    let out = tern_ok(&["bench", "--model", tiny.to_str().unwrap(), "-p", "16", "-n", "4", "-r", "1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["arch"], "qwen2");
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    let err = tern_err(&["generate", "--model", tiny.to_str().unwrap(), "--", "hi"]);
    assert!(err.contains("no tokenizer"), "{err}");
    let out =
        tern_ok(&["bench", "--model", tiny.to_str().unwrap(), "-p", "4", "-n", "4", "-d", "8", "-r", "1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["results"][1]["test"], "tg4 @ d8");
    let err = tern_err(&["bench", "--model", tiny.to_str().unwrap(), "-d", "250", "-p", "8", "-n", "0"]);
    assert!(err.contains("exceed the model's context length"), "{err}");

    let config = format!("dummy:{}", tiny.join("config.json").display());
    for dtype in ["q4_0", "q8_0", "bf16"] {
        let out = tern_ok(&["bench", "--model", &config, "--dummy-dtype", dtype, "-p", "8", "-n", "4", "-r", "1"]);
        assert!(out.contains("tg4"), "{out}");
    }
    let err = tern_err(&["bench", "--model", &config, "--dummy-dtype", "q9_9"]);
    assert!(err.contains("unknown weight type"), "{err}");
}
