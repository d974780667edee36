#!/usr/bin/env python3
"""Reference perplexity of the GGUF models on a text, with Hugging Face transformers (CPU, float32).

WHAT
  For each model key, writes into reference/data/perplexity.json the per-window sums of the
  negative log-likelihood of a text (default data/botchan-eval.txt), so that `tern eval perplexity`
  can be checked against it, also on a prefix of the windows.

  Models and tokenizers are loaded exactly as make_reference.py does (imported from it):
  AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32, attn_implementation="eager"),
  i.e. the float32 forward pass of the dequantized GGUF weights, and the transformers GGUF tokenizer
  with make_reference.py's TOKENIZER FIX-UPS, chosen by the GGUF's tokenizer.ggml.pre:
  "smollm" -> pre-tokenizer Sequence[Digits(individual_digits=True), ByteLevel], "qwen2" -> NFC
  normalizer. For the two keys make_reference.py knows, the fixed-up tokenizer is asserted to equal
  the one make_reference.load_tokenizer builds.

PROCEDURE (tern's Rust side implements the same)
  text      = the file's bytes decoded as UTF-8.
  tokens    = tokenizer encode of the WHOLE text, no special tokens.
  n_windows = floor(len(tokens) / ctx), capped by --max-windows; window w = tokens[w*ctx:(w+1)*ctx].
  BOS rule  = if the GGUF has tokenizer.ggml.add_bos_token = true and tokenizer.ggml.bos_token_id,
              the input is [bos] + window (ctx+1 tokens) and all ctx window tokens are scored;
              otherwise the input is the window and tokens 1..ctx-1 are scored (ctx-1 per window).
              Each window is an independent forward pass (no state carried between windows).
  nll       = -log_softmax(float32 logits cast to float64)[target] for every scored token.
  per window: n, sum_nll, sum_sq_nll (float64, written with full repr precision).
  totals    : tokens_scored = sum n; mean_nll = sum sum_nll / tokens_scored; ppl = exp(mean_nll);
              stderr_nll = sample std of the token nlls (ddof=1) / sqrt(tokens_scored);
              ppl_stderr = ppl * stderr_nll.

HOW TO RUN (venv as in make_reference.py / README.md)
  /tmp/refenv/bin/python reference/perplexity.py                       # all three models, all windows
  /tmp/refenv/bin/python reference/perplexity.py --keys smollm2-135m --max-windows 2 --out /tmp/p.json
  Options: --models-dir, --keys, --ctx 512, --max-windows N (applies to every key), --max-windows-for
  KEY=N (per key, repeatable), --text PATH, --threads 2, --out, --merge (keep the entries of other
  keys from an existing --out with the same text and ctx). The file is rewritten after every model,
  so a crash keeps the finished ones.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time
import unicodedata

os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF de-quantization progress bar

import numpy as np
import torch

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import make_reference as mr  # noqa: E402  (the shared helpers; its main() is not run)

# key -> (file name, sha256); the first two from make_reference.py, the third as in tern's registry
MODELS = dict(mr.MODELS)
MODELS["qwen2.5-1.5b"] = ("qwen2.5-1.5b.gguf", "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")

DEFAULT_KEYS = ["smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"]
LOGSOFTMAX_CHUNK = 128  # rows of the [ctx, vocab] logits converted to float64 at a time (memory)


def gguf_bos(path):
    """(add_bos_token, bos_token_id, tokenizer.ggml.pre) from the GGUF metadata."""
    import gguf

    r = gguf.GGUFReader(path)

    def field(name):
        f = r.fields.get(name)
        return None if f is None else f.contents()

    return field("tokenizer.ggml.add_bos_token"), field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.pre")


def load_tokenizer(models_dir, key, fname, pre):
    """make_reference.py's fixed-up GGUF tokenizer, for any key (fix-ups chosen by tokenizer.ggml.pre)."""
    from tokenizers import Tokenizer, normalizers

    tok = AutoTokenizer.from_pretrained(models_dir, gguf_file=fname)
    backend = tok.backend_tokenizer
    raw_backend = Tokenizer.from_str(backend.to_str())
    fixes = []
    if pre == "smollm":
        backend.pre_tokenizer = mr.smollm_pretokenizer()
        fixes.append("pre_tokenizer = Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, "
                     "use_regex=True)] (as make_reference.py for smollm2-135m)")
    elif pre == "qwen2":
        assert backend.normalizer is None, backend.normalizer
        backend.normalizer = normalizers.NFC()
        fixes.append("normalizer = NFC (as make_reference.py for qwen2.5-0.5b)")
    if key in mr.MODELS:
        ref_tok, _, _ = mr.load_tokenizer(models_dir, key)
        assert ref_tok.backend_tokenizer.to_str() == backend.to_str(), f"{key}: tokenizer differs from make_reference.py's"
    return tok, raw_backend, fixes


def window_nll(model, inp, targets, first):
    """Float64 nll of targets[j] predicted from logits row first+j, for one forward over inp."""
    logits = model(torch.tensor([inp])).logits[0].float()
    tgt = torch.tensor(targets)
    out = []
    for s in range(0, len(targets), LOGSOFTMAX_CHUNK):
        rows = logits[first + s: first + s + LOGSOFTMAX_CHUNK][: len(targets) - s]
        lp = torch.log_softmax(rows.double(), dim=-1)
        out.append(-lp.gather(1, tgt[s: s + len(rows)].unsqueeze(1)).squeeze(1))
    return torch.cat(out).numpy()


def ids_sha256(ids):
    return hashlib.sha256(np.asarray(ids, dtype="<u4").tobytes()).hexdigest()


def run_model(key, args, text, max_windows):
    fname, sha = MODELS[key]
    path = os.path.join(args.models_dir, fname)
    if not os.path.exists(path):
        sys.exit(f"missing {path}: `tern pull {key}`")
    digest = mr.sha256_file(path)
    if digest != sha:
        sys.exit(f"sha256 mismatch for {path}: {digest}")
    add_bos_meta, bos_id, pre = gguf_bos(path)
    add_bos = bool(add_bos_meta is True and bos_id is not None)

    tok, raw_backend, fixes = load_tokenizer(args.models_dir, key, fname, pre)
    tokens = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.backend_tokenizer.encode(text, add_special_tokens=False).ids == tokens
    raw_tokens = raw_backend.encode(text, add_special_tokens=False).ids

    ctx = args.ctx
    n_avail = len(tokens) // ctx
    n_win = n_avail if max_windows is None else min(n_avail, max_windows)

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        args.models_dir, gguf_file=fname, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    load_s = time.time() - t0
    print(f"[{key}] {len(tokens)} tokens, {n_win}/{n_avail} windows of {ctx}, add_bos={add_bos} "
          f"(loaded in {load_s:.1f}s)", flush=True)

    windows, all_nll = [], []
    t0 = time.time()
    with torch.inference_mode():
        for w in range(n_win):
            win = tokens[w * ctx:(w + 1) * ctx]
            if add_bos:
                nll = window_nll(model, [bos_id] + win, win, 0)
            else:
                nll = window_nll(model, win, win[1:], 0)
            all_nll.append(nll)
            windows.append({"n": int(len(nll)), "sum_nll": float(nll.sum()), "sum_sq_nll": float((nll * nll).sum())})
            if w == 0 or (w + 1) % 10 == 0 or w + 1 == n_win:
                el = time.time() - t0
                run = sum(x["sum_nll"] for x in windows) / sum(x["n"] for x in windows)
                print(f"  window {w + 1}/{n_win}: {el:.0f}s ({el / (w + 1):.1f}s/window), running ppl "
                      f"{math.exp(run):.4f}", flush=True)
    seconds = time.time() - t0
    del model

    nll = np.concatenate(all_nll) if all_nll else np.zeros(0)
    n = int(nll.size)
    mean = float(sum(x["sum_nll"] for x in windows) / n) if n else float("nan")
    stderr = float(np.std(nll, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    ppl = math.exp(mean)
    entry = {
        "gguf_file": fname,
        "gguf_sha256": digest,
        "gguf_bytes": os.path.getsize(path),
        "add_bos_token_meta": add_bos_meta,
        "add_bos": add_bos,
        "bos_id": bos_id,
        "tokenizer_pre": pre,
        "tokenizer_fixes": fixes,
        "tokens_unpatched_transformers_differ": raw_tokens != tokens,
        "n_text_tokens": len(tokens),
        "tokens_sha256": ids_sha256(tokens),
        "first_tokens": tokens[:32],
        "n_windows_available": n_avail,
        "max_windows": max_windows,
        "n_windows": n_win,
        "tokens_scored": n,
        "mean_nll": mean,
        "stderr_nll": stderr,
        "ppl": ppl,
        "ppl_stderr": ppl * stderr,
        "seconds": round(seconds, 1),
        "load_seconds": round(load_s, 1),
        "seconds_per_window": round(seconds / n_win, 2) if n_win else None,
        "windows": windows,
    }
    print(f"{key}: {n} tokens scored in {n_win} windows, ppl {ppl:.4f} +/- {ppl * stderr:.4f} "
          f"(mean nll {mean:.6f}), add_bos={add_bos}, {len(tokens)} text tokens, {seconds:.0f}s", flush=True)
    return entry


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", default=os.path.expanduser("~/.cache/tern/models"))
    ap.add_argument("--keys", nargs="+", default=DEFAULT_KEYS, choices=sorted(MODELS))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None, help="cap on windows per model (default: all)")
    ap.add_argument("--max-windows-for", action="append", default=[], metavar="KEY=N",
                    help="per-key cap, overrides --max-windows for that key")
    ap.add_argument("--text", default=os.path.join(ROOT, "data", "botchan-eval.txt"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "data", "perplexity.json"))
    ap.add_argument("--merge", action="store_true", help="keep other keys' entries of an existing --out")
    args = ap.parse_args()

    caps = {k: args.max_windows for k in args.keys}
    for kv in args.max_windows_for:
        k, v = kv.split("=", 1)
        if k not in caps:
            sys.exit(f"--max-windows-for {kv}: {k} is not in --keys")
        caps[k] = int(v)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass

    with open(args.text, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    tpath = os.path.abspath(args.text)
    rel = os.path.relpath(tpath, ROOT)
    doc = {
        "versions": mr.versions(),
        "text": {
            "path": rel if not rel.startswith("..") else tpath,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "bytes": len(raw),
            "is_nfc": unicodedata.normalize("NFC", text) == text,
        },
        "ctx": args.ctx,
        "threads": args.threads,
        "procedure": (
            "tokens = encode(whole text, no special tokens); window w = tokens[w*ctx:(w+1)*ctx] for "
            "w < floor(len/ctx) (capped by max_windows); if add_bos: input [bos]+window, all ctx tokens "
            "scored, else input = window, tokens 1..ctx-1 scored; nll = -log_softmax(float64(float32 logits))"
            "[target]; ppl = exp(sum sum_nll / sum n); stderr_nll = std(nll, ddof=1)/sqrt(n); ppl_stderr = "
            "ppl*stderr_nll. Model: transformers GGUF loader, weights dequantized to float32, eager attention, CPU."
        ),
        "models": {},
    }
    print("versions:", doc["versions"])
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        if old.get("text", {}).get("sha256") != doc["text"]["sha256"] or old.get("ctx") != args.ctx:
            sys.exit(f"--merge: {args.out} was made with another text or ctx")
        if old.get("versions") != doc["versions"]:
            print("warning: --merge with an output made with other versions", old.get("versions"))
        doc["models"] = {k: v for k, v in old["models"].items() if k not in args.keys}

    for key in args.keys:
        doc["models"][key] = run_model(key, args, text, caps[key])
        doc["models"] = {k: doc["models"][k] for k in DEFAULT_KEYS + sorted(MODELS) if k in doc["models"]}
        mr.dump_json(doc, args.out)


if __name__ == "__main__":
    main()
