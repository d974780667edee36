//! `tern eval perplexity` against transformers running the same procedure
//! (reference/perplexity.py → reference/data/perplexity.json, float32 dequantized weights):
//! the quantized kernels within 0.5% of the reference, the dequantized f32 path closer still.

mod common;
use common::{repo_root, tern_err, tern_ok};
use serde_json::Value;
use tern_core::perplexity::{Perplexity, WindowScore};

fn reference(key: &str) -> Value {
    let path = repo_root().join("reference/data/perplexity.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    all["models"][key].clone()
}

fn window_scores(v: &Value) -> Vec<WindowScore> {
    let f = |w: &Value, k: &str| w[k].as_f64().unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|w| WindowScore { n: f(w, "n") as usize, sum_nll: f(w, "sum_nll"), sum_sq_nll: f(w, "sum_sq_nll") })
        .collect()
}

fn check(key: &str, windows: usize, dequantized_tolerance: f64) {
    let r = reference(key);
    let want = Perplexity::from_windows(&window_scores(&r["windows"])[..windows]).unwrap();
    let text = repo_root().join("data/botchan-eval.txt");
    let n = windows.to_string();
    for (dequantize, tol) in [(false, 0.005), (true, dequantized_tolerance)] {
        let mut args =
            vec!["eval", "perplexity", "-m", key, "--text", text.to_str().unwrap(), "--max-windows", &n, "--json"];
        if dequantize {
            args.push("--dequantize");
        }
        let got: Value = serde_json::from_str(tern_ok(&args).trim()).unwrap();
        assert_eq!(got["text_tokens"], r["n_text_tokens"], "{key}: tokenization of the text");
        assert_eq!(got["tokens_scored"].as_u64().unwrap() as usize, want.tokens_scored, "{key}");
        let ppl = got["ppl"].as_f64().unwrap();
        let rel = (ppl / want.ppl - 1.0).abs();
        eprintln!(
            "{key} ({} windows{}): tern {ppl:.4}, transformers {:.4}, {:.3}% apart",
            windows,
            if dequantize { ", dequantized" } else { "" },
            want.ppl,
            100.0 * rel
        );
        assert!(rel < tol, "{key}: perplexity {ppl} vs reference {} ({:.3}% apart)", want.ppl, 100.0 * rel);
    }
}

#[test]
fn smollm2_matches_transformers() {
    check("smollm2-135m", 4, 2e-4);
}

#[test]
fn qwen_matches_transformers() {
    check("qwen2.5-0.5b", 2, 2e-4);
}

#[test]
fn bad_inputs_fail_cleanly() {
    let text = repo_root().join("data/botchan-eval.txt");
    let t = text.to_str().unwrap();
    let e = tern_err(&["eval", "perplexity", "--text", "/nonexistent/file.txt"]);
    assert!(e.contains("cannot read"), "{e}");
    let e = tern_err(&["eval", "perplexity", "--text", t, "--ctx", "100000"]);
    assert!(e.contains("exceeds the model's context"), "{e}");
    let e = tern_err(&["eval", "perplexity", "--text", t, "--ctx", "1"]);
    assert!(e.contains("at least 2"), "{e}");
    let short = std::env::temp_dir().join("tern-ppl-short.txt");
    std::fs::write(&short, "Too short.").unwrap();
    let e = tern_err(&["eval", "perplexity", "--text", short.to_str().unwrap()]);
    assert!(e.contains("fewer than one window"), "{e}");
    std::fs::write(&short, [0xffu8, 0xfe, 0x00]).unwrap();
    let e = tern_err(&["eval", "perplexity", "--text", short.to_str().unwrap()]);
    assert!(e.contains("not UTF-8"), "{e}");
}

#[test]
fn quantized_kv_caches_stay_close() {
    let text = repo_root().join("data/botchan-eval.txt");
    let run = |kv: &str| -> Value {
        let args = [
            "eval",
            "perplexity",
            "-m",
            "smollm2-135m",
            "--text",
            text.to_str().unwrap(),
            "--max-windows",
            "2",
            "--kv-cache-dtype",
            kv,
            // f32 weights and activations: with 8-bit activations any change in the last bits
            // (another kernel's rounding) can flip a quantization step, and that noise alone
            // moves this perplexity by ~0.2%, more than an f16 cache does.
            "--dequantize",
            "--json",
        ];
        serde_json::from_str(tern_ok(&args).trim()).unwrap()
    };
    let f = run("f32");
    let fb = f["kv_bytes_per_token"].as_u64().unwrap();
    // (dtype, largest relative perplexity change, at most this fraction of f32's bytes)
    for (kv, tol, size) in [("f16", 0.001, 0.5), ("bf16", 0.005, 0.5), ("int8", 0.01, 0.3), ("fp8", 0.03, 0.3)] {
        let q = run(kv);
        let rel = q["ppl"].as_f64().unwrap() / f["ppl"].as_f64().unwrap() - 1.0;
        eprintln!("{kv} KV: perplexity {} vs {} ({:+.3}%)", q["ppl"], f["ppl"], 100.0 * rel);
        assert!(rel.abs() < tol, "{kv} KV moves perplexity by {:.3}%", 100.0 * rel);
        let qb = q["kv_bytes_per_token"].as_u64().unwrap();
        assert!(qb as f64 <= size * fb as f64, "{kv} KV takes {qb} bytes per token against {fb}");
    }
    let e = tern_err(&["eval", "perplexity", "--text", text.to_str().unwrap(), "--kv-cache-dtype", "fp4"]);
    assert!(e.contains("unknown KV cache dtype"), "{e}");
}
