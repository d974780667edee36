#!/usr/bin/env python3
"""Independent correctness reference for tern, produced with Hugging Face transformers.

WHAT
  A. For each real GGUF model in ~/.cache/tern/models/ (smollm2-135m, qwen2.5-0.5b; see
     shared/models.md for how they are fetched and assembled), writes reference/data/<key>.json:
       - tokenization   ~45 hard strings -> ids (without / with special tokens), decode round trip
       - chat_template  raw template from the GGUF metadata + renders of 5 conversations
       - greedy         8 prompts, 48 greedy tokens each, per-step top-10 logprobs and top1-top2 gap
       - prompt_logprobs  top-5 logprobs at every prompt position for 2 prompts (checks prefill)
       - model          hyper-parameters and the GGUF tensor-type histogram (read with `gguf`)
     The models are loaded with AutoModelForCausalLM.from_pretrained(dir, gguf_file=...,
     dtype=float32, attn_implementation="eager"): transformers dequantizes every tensor to float32,
     so this is the float32 forward pass of the *dequantized* weights (no quantized matmuls).
  B. Tiny random HF models (llama tied, qwen2 with q/k/v bias untied, mistral sliding_window=16
     untied; plus bf16 and f16 copies of llama), saved with save_pretrained (safetensors) under
     reference/tiny/<name>/ with a reference.json: per-position float32 logits for 3 prompts of
     token ids (lengths 5, 20, 40) and 32 greedy tokens each.

TOKENIZER FIX-UPS (read this before trusting tokenization ids)
  transformers builds the tokenizer from GGUF metadata (transformers/integrations/gguf/
  gguf_tokenizer_mapping.py). Compared with each model's original tokenizer.json it deviates:
    * smollm2-135m (tokenizer.ggml.pre = "smollm"): "smollm" is not in transformers'
      GGUF_PRE_TOKENIZER_SPLITS, so it falls back to plain GPT-2 ByteLevel (regex split without the
      digit split). SmolLM2's tokenizer.json has pre_tokenizer = Sequence[Digits(individual_digits=
      True), ByteLevel(add_prefix_space=False, use_regex=True)], and llama.cpp's SMOLLM pre-type
      reproduces it with regexes ["\\p{N}", gpt2-regex]. We set that pre-tokenizer explicitly.
      (Differs e.g. for "  12": runs of >=2 spaces directly before a digit.)
    * qwen2.5-0.5b (tokenizer.ggml.pre = "qwen2"): the split regex is honoured, but the NFC
      normalizer of Qwen2's tokenizer.json (also set by transformers' own Qwen2Tokenizer) is lost.
      We set normalizers.NFC() explicitly. NOTE: llama.cpp does NOT apply NFC either, so for text
      that NFC changes (decomposed accents, U+212B, conjoining Hangul jamo) llama.cpp and the
      original tokenizer disagree; those cases carry an extra "ids_without_nfc" field.
  Every tokenization case where the unpatched transformers conversion gives different ids carries
  "ids_unpatched_transformers" so the deviation is visible, never silently recorded.

HOW TO RUN
  python3 -m venv /tmp/refenv
  /tmp/refenv/bin/pip install torch==2.15.0 transformers==5.23.0 tokenizers==0.23.3 gguf==0.19.0 \
      numpy==2.4.6 safetensors==0.8.0 accelerate==1.15.0 jinja2==3.1.6
  /tmp/refenv/bin/python reference/make_reference.py            # everything (~3-5 min on 2 cores)
  /tmp/refenv/bin/python reference/make_reference.py --only tiny   # or --only gguf
  Options: --models-dir DIR (default ~/.cache/tern/models), --threads N (default 2).

  (The PyPI Linux torch wheel pulls CUDA libraries; only the CPU is used. The versions actually
  used are recorded in every output file under "versions".)

DETERMINISM
  Fixed seeds, 2 torch threads. Floats are written rounded to
  6 significant digits. Re-running on another CPU may change the last digit of some floats; ids
  should not change except possibly at near-ties (listed in each greedy entry as near_tie_steps).
"""

import argparse
import collections
import hashlib
import json
import math
import os
import platform
import sys
import unicodedata

import numpy as np
import torch

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, "data")
TINY_DIR = os.path.join(HERE, "tiny")

MODELS = {
    # key: (file name, sha256 from shared/models.md)
    "smollm2-135m": ("smollm2-135m.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "qwen2.5-0.5b": ("qwen2.5-0.5b.gguf", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}

N_GREEDY = 48
TOPK_GREEDY = 10
TOPK_PROMPT = 5
NEAR_TIE = 0.25


# ----------------------------------------------------------------------------- helpers

def versions():
    import gguf
    import safetensors
    import tokenizers
    import jinja2
    try:
        import accelerate
        acc = accelerate.__version__
    except Exception:  # pragma: no cover
        acc = None
    try:
        gguf_v = gguf.__version__
    except AttributeError:
        from importlib.metadata import version
        gguf_v = version("gguf")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "gguf": gguf_v,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "accelerate": acc,
        "jinja2": jinja2.__version__,
    }


def sig(x, digits=6):
    """Round a float to `digits` significant digits (keeps JSON small)."""
    x = float(x)
    if x == 0.0 or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def sigs(arr, digits=6):
    return [sig(v, digits) for v in np.asarray(arr, dtype=np.float64).ravel().tolist()]


def dump_json(obj, path):
    """JSON with scalar-only lists kept on one line; ASCII-escaped so no editor can re-normalize
    the unicode test strings."""

    def enc(o, ind):
        pad = " " * ind
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f'{pad} {json.dumps(k)}: {enc(v, ind + 1)}' for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, (list, tuple)):
            if all(not isinstance(v, (dict, list, tuple)) for v in o) or (
                all(isinstance(v, (list, tuple)) and all(not isinstance(w, (dict, list, tuple)) for w in v) for v in o)
                and sum(len(v) for v in o) <= 40
            ):
                return json.dumps(o, separators=(",", ":"))
            items = [f"{pad} {enc(v, ind + 1)}" for v in o]
            return "[\n" + ",\n".join(items) + "\n" + pad + "]"
        return json.dumps(o)

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="ascii") as f:
        f.write(enc(obj, 0) + "\n")
    print(f"  wrote {os.path.relpath(path, os.path.dirname(HERE))} ({os.path.getsize(path):,} B)")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def topk_pairs(logits_f32, k):
    """[(id, logprob)] of the top-k, log_softmax taken in float64 of the float32 logits."""
    lp = torch.log_softmax(logits_f32.double(), dim=-1)
    vals, idx = torch.topk(logits_f32, k + 1)
    pairs = [[int(i), sig(lp[i].item())] for i in idx[:k].tolist()]
    gap = float(vals[0].item() - vals[1].item())
    return pairs, gap, float(vals[0].item()), lp


# ----------------------------------------------------------------------------- tokenizers

TOKENIZATION_CASES = [
    "",
    " ",
    "  ",
    "Hello world",
    " Hello world",
    "Hello world ",
    "Hello   world",
    "   leading and trailing   ",
    "\n",
    "\n\n\n",
    "\r\n",
    "line one\r\nline two\n\nline three\n",
    "\ttab\t\tdouble tab\t",
    "a   b\t\tc\n\n d",
    "   \n   \n",
    "1234567",
    "3.14159",
    "1,000,000",
    "2024-11-24",
    "  12  ",
    "x  =  42;\n\t7 apples\n  3",
    "abc123def 4th 1st",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n    let v: Vec<u32> = (1..=10).collect();\n    println!(\"{:?}\", v);\n}\n",
    "I love \U0001F355 and \U0001F389!",
    "\U0001F44D\U0001F3FD \U0001F44B\U0001F3FF",
    "\U0001F1EB\U0001F1F7\U0001F1EF\U0001F1F5\U0001F1FA\U0001F1F8",
    "\U0001F468\u200D\U0001F469\u200D\U0001F467\u200D\U0001F466 \U0001F469\U0001F3FD\u200D\U0001F4BB",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3067\u3059\u3002\u6771\u4eac\u306f\u5927\u304d\u3044\u3002",
    "\u4e2d\u534e\u4eba\u6c11\u5171\u548c\u56fd\u6210\u7acb\u4e8e1949\u5e74\u3002",
    "\uc548\ub155\ud558\uc138\uc694, \uc138\uacc4!",
    "Cr\u00e8me br\u00fbl\u00e9e, na\u00efve caf\u00e9, \u00c5ngstr\u00f6m, S\u00e3o Paulo, \u0141\u00f3d\u017a",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
    "Cafe\u0301 e\u0301 a\u0308 n\u0303",
    "\u212b \u1100\u1161 \uff21\uff22\uff23 \ufb01",
    "a\u200bb \ufeffhello a\u00a0b",
    "don't I'm he'll WE'VE",
    "https://example.com/path/to?query=1&x=y#frag",
    "!!! ??? ... --- *** ->",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>",
    "Hello<|endoftext|>World<|im_end|>",
    "<tool_call>{\"a\": 1}</tool_call> <file_sep> <jupyter_code>",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "a" * 100,
    "hello " * 30,
]


def smollm_pretokenizer():
    from tokenizers import pre_tokenizers

    # SmolLM2's original tokenizer.json: pre_tokenizer = Sequence[Digits(individual_digits=true),
    # ByteLevel(add_prefix_space=false, trim_offsets=true, use_regex=true)]. llama.cpp's "smollm"
    # pre-type does the same with regexes ["\p{N}", gpt2 regex]. transformers 5.23 does not know
    # "smollm" and leaves only the ByteLevel part, so digits preceded by >=2 whitespace chars
    # tokenize differently. Set the original pre-tokenizer explicitly.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


def load_tokenizer(models_dir, key):
    """The transformers GGUF tokenizer with the fix-ups above, plus an untouched copy of its backend
    (tokenizers.Tokenizer) as transformers built it, for recording deviations."""
    from tokenizers import Tokenizer

    fname = MODELS[key][0]
    tok = AutoTokenizer.from_pretrained(models_dir, gguf_file=fname)
    backend = tok.backend_tokenizer
    raw_backend = Tokenizer.from_str(backend.to_str())
    fixes = []
    if key == "smollm2-135m":
        backend.pre_tokenizer = smollm_pretokenizer()
        fixes.append(
            "pre_tokenizer set to Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, "
            "use_regex=True)] as in SmolLM2's tokenizer.json / llama.cpp pre-type 'smollm'; transformers' GGUF "
            "conversion only had ByteLevel (no per-digit split)"
        )
    elif key == "qwen2.5-0.5b":
        from tokenizers import normalizers

        # Qwen2's tokenizer.json has "normalizer": {"type": "NFC"} (transformers' Qwen2Tokenizer sets it too),
        # but the GGUF conversion leaves the normalizer empty. llama.cpp does not NFC-normalize either.
        assert backend.normalizer is None, backend.normalizer
        backend.normalizer = normalizers.NFC()
        fixes.append(
            "normalizer set to NFC as in Qwen2's tokenizer.json; transformers' GGUF conversion had none "
            "(llama.cpp applies no NFC either: see ids_without_nfc)"
        )
    return tok, raw_backend, fixes


def tokenization_section(key, tok, raw_backend, fixes):
    # for Qwen the unpatched tokenizer differs exactly by the missing NFC normalizer
    no_nfc = key == "qwen2.5-0.5b"
    cases = []
    n_diff_unpatched = 0
    for text in TOKENIZATION_CASES:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ids_sp = tok(text, add_special_tokens=True)["input_ids"]
        case = {"text": text, "ids": ids, "ids_with_special": ids_sp}
        dec = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if dec != text:
            case["decoded"] = dec
            case["decoded_note"] = "decode(ids) != text" + (
                " (NFC-normalized)" if dec == unicodedata.normalize("NFC", text) else ""
            )
        # sanity: the wrapper and its (patched) backend agree, so the raw-backend comparison is like for like
        assert tok.backend_tokenizer.encode(text, add_special_tokens=False).ids == ids, text
        raw_ids = raw_backend.encode(text, add_special_tokens=False).ids
        if raw_ids != ids:
            n_diff_unpatched += 1
            case["ids_unpatched_transformers"] = raw_ids
            if no_nfc:
                case["ids_without_nfc"] = raw_ids
        cases.append(case)

    specials = {}
    for name in ["bos_token", "eos_token", "unk_token", "pad_token"]:
        t = getattr(tok, name, None)
        specials[name] = None if t is None else {"text": str(t), "id": tok.convert_tokens_to_ids(str(t))}
    added = tok.backend_tokenizer.get_added_tokens_decoder()
    added_list = [
        {"id": int(i), "text": a.content, "special": bool(a.special)} for i, a in sorted(added.items())
    ]
    probe = tok("x", add_special_tokens=True)["input_ids"]
    return {
        "how": "tokenizer(text, add_special_tokens=False).input_ids -> ids; add_special_tokens=True -> "
        "ids_with_special. Special-token text in the input is matched as the special token (parse_special).",
        "fixes_applied_to_transformers_gguf_tokenizer": fixes,
        "n_cases_where_unpatched_transformers_differs": n_diff_unpatched,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "unk_token_id": tok.unk_token_id,
        "special_tokens": specials,
        "adds_bos": bool(tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id),
        "adds_eos": bool(tok.eos_token_id is not None and probe and probe[-1] == tok.eos_token_id),
        "added_tokens": added_list,
        "backend": {
            "normalizer": json.loads(tok.backend_tokenizer.to_str())["normalizer"],
            "pre_tokenizer": json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"],
        },
        "cases": cases,
    }


# ----------------------------------------------------------------------------- chat template

CONVERSATIONS = [
    ("single_user", [{"role": "user", "content": "What is 2+2?"}]),
    (
        "system_user",
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name a prime number."},
        ],
    ),
    (
        "multi_turn",
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ],
    ),
    (
        "system_multi_turn",
        [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Good morning"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": "Thanks"},
        ],
    ),
    (
        "unicode_newlines",
        [
            {
                "role": "user",
                "content": "Translate:\n\n  \u65e5\u672c\u8a9e \u2014 caf\u00e9 \U0001F600\n\tline\twith tabs\n",
            }
        ],
    ),
]


def chat_section(tok, raw_template):
    renders = []
    for name, msgs in CONVERSATIONS:
        for agp in (False, True):
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
            renders.append(
                {
                    "name": name,
                    "add_generation_prompt": agp,
                    "messages": msgs,
                    "text": text,
                    "ids": tok(text, add_special_tokens=False)["input_ids"],
                }
            )
    return {
        "how": "tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...); ids = "
        "tokenizer(text, add_special_tokens=False)",
        "template": raw_template,
        "template_equals_tokenizer_chat_template": raw_template == tok.chat_template,
        "renders": renders,
    }


# ----------------------------------------------------------------------------- greedy + prefill

def greedy_prompts(tok):
    chat_q = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    code_edit = tok.apply_chat_template(
        [
            {
                "role": "user",
                "content": "Rewrite this function to use a list comprehension:\n\n"
                "def squares(n):\n    out = []\n    for i in range(n):\n        out.append(i * i)\n    return out\n",
            }
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    return [
        ("plain_capital", "The capital of France is", "plain"),
        ("code_fib", "def fib(n):", "plain"),
        ("story", "Once upon a time", "plain"),
        ("count", "1, 2, 3, 4,", "plain"),
        ("chinese", "\u4e2d\u56fd\u7684\u9996\u90fd\u662f\u5317\u4eac\uff0c\u5b83\u662f", "plain"),
        ("chat_capital", chat_q, "chat"),
        ("chat_code_edit", code_edit, "chat"),
        ("list_start", "Here is a list of fruits:\n1.", "plain"),
    ]


def encode_prompt(tok, text, kind):
    # plain text: what transformers does by default (add_special_tokens=True; for both GGUF models
    # this adds nothing since add_bos_token is False). Chat renders already contain their special
    # tokens, so they are encoded with add_special_tokens=False (as apply_chat_template(tokenize=True)).
    return tok(text, add_special_tokens=(kind == "plain"))["input_ids"]


@torch.no_grad()
def greedy_real(model, ids, stop_ids):
    out = model(torch.tensor([ids]), use_cache=True)
    past = out.past_key_values
    logits = out.logits[0, -1].float()
    prefill_logits = out.logits[0].float()
    generated, steps = [], []
    for step in range(N_GREEDY):
        pairs, gap, top1_logit, _ = topk_pairs(logits, TOPK_GREEDY)
        nxt = pairs[0][0]
        steps.append({"top": pairs, "top2_gap": sig(gap), "top1_logit": sig(top1_logit)})
        generated.append(nxt)
        if step + 1 == N_GREEDY:
            break
        out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float()
    eos_steps = [i for i, t in enumerate(generated) if t in stop_ids]
    return generated, steps, eos_steps, prefill_logits


def prompt_logprobs_entry(name, ids, prefill_logits):
    positions = []
    for i in range(len(ids)):
        pairs, gap, _, lp = topk_pairs(prefill_logits[i], TOPK_PROMPT)
        e = {"top": pairs, "top2_gap": sig(gap)}
        if i + 1 < len(ids):
            e["next_prompt_token"] = ids[i + 1]
            e["next_prompt_token_logprob"] = sig(lp[ids[i + 1]].item())
        positions.append(e)
    return {
        "name": name,
        "prompt_ids": ids,
        "how": "one prefill forward over prompt_ids; positions[i] = distribution of the token after "
        "prompt_ids[i] (log_softmax in float64 of the float32 logits)",
        "positions": positions,
    }


# ----------------------------------------------------------------------------- gguf metadata

def gguf_metadata(path):
    import gguf

    r = gguf.GGUFReader(path)

    def field(name):
        f = r.fields.get(name)
        if f is None:
            return None
        v = f.contents()
        return v

    arch = field("general.architecture")
    by_type = collections.Counter(t.tensor_type.name for t in r.tensors)
    by_role = collections.Counter()
    for t in r.tensors:
        role = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
        by_role[f"{role}:{t.tensor_type.name}"] += 1
    n_elems = collections.Counter()
    for t in r.tensors:
        n_elems[t.tensor_type.name] += int(t.n_elements)
    tensor_names = {t.name for t in r.tensors}
    return {
        "general.name": field("general.name"),
        "architecture": arch,
        "n_layers": field(f"{arch}.block_count"),
        "hidden": field(f"{arch}.embedding_length"),
        "ffn": field(f"{arch}.feed_forward_length"),
        "n_heads": field(f"{arch}.attention.head_count"),
        "n_kv_heads": field(f"{arch}.attention.head_count_kv"),
        "head_dim": field(f"{arch}.embedding_length") // field(f"{arch}.attention.head_count"),
        "rope_dimension_count": field(f"{arch}.rope.dimension_count"),
        "vocab": len(r.fields["tokenizer.ggml.tokens"].data),
        "rope_theta": field(f"{arch}.rope.freq_base"),
        "rms_norm_eps": field(f"{arch}.attention.layer_norm_rms_epsilon"),
        "context_length": field(f"{arch}.context_length"),
        "file_type": field("general.file_type"),
        "tokenizer.ggml.model": field("tokenizer.ggml.model"),
        "tokenizer.ggml.pre": field("tokenizer.ggml.pre"),
        "tokenizer.ggml.add_bos_token": field("tokenizer.ggml.add_bos_token"),
        "tokenizer.ggml.add_eos_token": field("tokenizer.ggml.add_eos_token"),
        "tokenizer.ggml.bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "tokenizer.ggml.eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "tokenizer.ggml.padding_token_id": field("tokenizer.ggml.padding_token_id"),
        "tokenizer.ggml.unknown_token_id": field("tokenizer.ggml.unknown_token_id"),
        "has_output_weight": "output.weight" in tensor_names,
        "tied_embeddings_in_gguf": "output.weight" not in tensor_names,
        "n_tensors": len(r.tensors),
        "tensor_types": dict(sorted(by_type.items())),
        "tensor_types_elements": dict(sorted(n_elems.items())),
        "tensor_types_by_role": dict(sorted(by_role.items())),
    }, field("tokenizer.chat_template")


# ----------------------------------------------------------------------------- part A

def make_gguf_reference(models_dir, ver):
    for key, (fname, sha) in MODELS.items():
        path = os.path.join(models_dir, fname)
        print(f"[{key}] {path}")
        if not os.path.exists(path):
            sys.exit(f"missing {path}: fetch it as shared/models.md says")
        digest = sha256_file(path)
        if digest != sha:
            sys.exit(f"sha256 mismatch for {path}: {digest}")
        meta, raw_template = gguf_metadata(path)

        tok, raw_backend, fixes = load_tokenizer(models_dir, key)
        tokenization = tokenization_section(key, tok, raw_backend, fixes)
        chat = chat_section(tok, raw_template)

        model = AutoModelForCausalLM.from_pretrained(
            models_dir, gguf_file=fname, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        cfg = model.config
        meta["transformers_config"] = {
            "model_class": type(model).__name__,
            "tie_word_embeddings": bool(cfg.tie_word_embeddings),
            "rope_parameters": getattr(cfg, "rope_parameters", None),
            "rms_norm_eps": cfg.rms_norm_eps,
            "num_hidden_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size,
        }

        stop_ids = sorted(
            {
                i
                for i in [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
                if i is not None and i >= 0
            }
        )
        greedy, prompt_lp = [], []
        for name, text, kind in greedy_prompts(tok):
            ids = encode_prompt(tok, text, kind)
            out_ids, steps, eos_steps, prefill = greedy_real(model, ids, stop_ids)
            near = [i for i, s in enumerate(steps) if s["top2_gap"] < NEAR_TIE]
            greedy.append(
                {
                    "name": name,
                    "kind": kind,
                    "prompt_text": text,
                    "prompt_ids": ids,
                    "output_ids": out_ids,
                    "output_text": tok.decode(out_ids, skip_special_tokens=False),
                    "eos_steps": eos_steps,
                    "near_tie_steps": near,
                    "steps": steps,
                }
            )
            print(f"  greedy {name}: {len(ids)} prompt tokens, near ties at {near}, eos at {eos_steps}")
            if name in ("plain_capital", "chat_capital"):
                prompt_lp.append(prompt_logprobs_entry(name, ids, prefill))

        doc = {
            "key": key,
            "gguf_file": fname,
            "gguf_sha256": digest,
            "versions": ver,
            "notes": [
                "Weights: transformers dequantizes every GGUF tensor to float32; the forward pass is float32 "
                "eager attention on CPU. An engine running quantized matmuls (e.g. q8 activations) will not "
                "match logits exactly; compare ids up to the first near tie and logprobs with a tolerance.",
                "Greedy: argmax of the float32 logits, no sampling, no repetition penalty, KV-cached "
                f"incremental decoding, EOS ignored: always {N_GREEDY} tokens (eos_steps lists the steps "
                f"that produced one of stop_ids). near_tie_steps: steps with top1-top2 logit gap < {NEAR_TIE}; "
                "tokens after the first near tie may legitimately differ.",
                "steps[i].top: top-10 [token_id, logprob] with logprob = log_softmax (float64) of the float32 "
                "logits; top2_gap = logit(top1) - logit(top2); top1_logit is the raw logit.",
            ],
            "stop_ids": stop_ids,
            "model": meta,
            "tokenization": tokenization,
            "chat_template": chat,
            "greedy": greedy,
            "prompt_logprobs": prompt_lp,
        }
        dump_json(doc, os.path.join(DATA_DIR, f"{key}.json"))
        del model


# ----------------------------------------------------------------------------- part B

TINY_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    attn_implementation="eager",
)

# std of the random init per parameter kind (normal 0.02 makes all logits near-equal)
# (final_norm_mean: the final RMSNorm weight is drawn around 3.0 so that, with the tied llama, the logits
# are spread enough for a non-degenerate greedy run without letting the embedding dominate the residual)
STD = {"embed": 0.3, "proj": 0.25, "lm_head": 0.5, "bias": 0.2, "norm": 0.1, "final_norm_mean": 3.0}

TINY_PROMPT_LENS = [5, 20, 40]
TINY_GREEDY = 32


def tiny_specs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    return [
        ("llama", LlamaForCausalLM, LlamaConfig(**TINY_COMMON, tie_word_embeddings=True,
                                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), 1001),
        ("qwen2", Qwen2ForCausalLM, Qwen2Config(**TINY_COMMON, tie_word_embeddings=False, use_sliding_window=False,
                                                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), 1002),
        ("mistral", MistralForCausalLM, MistralConfig(**TINY_COMMON, tie_word_embeddings=False, sliding_window=16,
                                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), 1003),
    ]


def init_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head is not listed separately
            if "embed_tokens" in name:
                std, mean = STD["embed"], 0.0
            elif name.startswith("lm_head"):
                std, mean = STD["lm_head"], 0.0
            elif name == "model.norm.weight":
                std, mean = STD["norm"] * STD["final_norm_mean"], STD["final_norm_mean"]
            elif "norm" in name:
                std, mean = STD["norm"], 1.0
            elif name.endswith(".bias"):
                std, mean = STD["bias"], 0.0
            else:
                std, mean = STD["proj"], 0.0
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std + mean)


def tiny_prompts(seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in TINY_PROMPT_LENS]


@torch.no_grad()
def tiny_forward_logits(model, ids):
    return model(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def tiny_greedy(model, ids):
    # full recompute each step (no KV cache): the mask semantics are applied exactly, no cache involved
    seq = list(ids)
    gaps = []
    for _ in range(TINY_GREEDY):
        logits = tiny_forward_logits(model, seq)[-1]
        v, i = torch.topk(logits, 2)
        gaps.append(float(v[0] - v[1]))
        seq.append(int(i[0]))
    return seq[len(ids):], gaps


def tiny_reference(model, note, ver, extra=None):
    prompts = []
    for ids in tiny_prompts():
        logits = tiny_forward_logits(model, ids)
        out, gaps = tiny_greedy(model, ids)
        prompts.append(
            {
                "prompt_ids": ids,
                "output_ids": out,
                "greedy_near_tie_steps": [i for i, g in enumerate(gaps) if g < NEAR_TIE],
                "greedy_min_gap": sig(min(gaps)),
                "logits_shape": list(logits.shape),
                "logits": [sigs(row) for row in logits.numpy()],
            }
        )
    doc = {"versions": ver, "note": note, "prompts": prompts}
    if extra:
        doc.update(extra)
    return doc


def sliding_window_check(model_cls, config, state_dict, ids):
    """Compare logits with sliding_window=16 vs None, and read the attention pattern."""
    import copy

    with torch.no_grad():
        m_sw = model_cls(config).eval()
        m_sw.load_state_dict(state_dict)
        out = m_sw(torch.tensor([ids]), output_attentions=True)
        att = out.attentions[0][0, 0]  # layer 0, head 0: [q, k]
        ranges = []
        for q in range(att.shape[0]):
            nz = (att[q] > 0).nonzero().flatten().tolist()
            ranges.append([min(nz), max(nz)])
        cfg2 = copy.deepcopy(config)
        cfg2.sliding_window = None
        m_full = model_cls(cfg2).eval()
        m_full.load_state_dict(state_dict)
        full = m_full(torch.tensor([ids])).logits[0]
        diff = (out.logits[0] - full).abs().max(dim=-1).values
    first = next((i for i, d in enumerate(diff.tolist()) if d > 0), None)
    return {
        "sliding_window": config.sliding_window,
        "attended_key_range_per_query_layer0": ranges,
        "semantics": f"query position i attends key positions max(0, i-{config.sliding_window - 1})..i "
        f"({config.sliding_window} keys including itself); i.e. a key is masked when i - j >= "
        f"{config.sliding_window}",
        "prompt_len": len(ids),
        "max_abs_logit_diff_vs_no_window": sig(diff.max().item()),
        "first_position_differing_from_no_window": first,
        "per_position_max_abs_diff_vs_no_window": sigs(diff.numpy(), 4),
    }


def legacy_config_layout(out_dir, config):
    """Rewrite config.json in the transformers-4 layout most checkpoints in the wild use: top-level
    "rope_theta" and "torch_dtype" instead of v5's "rope_parameters" and "dtype". transformers 5 reads
    both; the other tiny models keep the v5 layout, so a loader is tested on both."""
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    rp = cfg.pop("rope_parameters")
    assert rp.get("rope_type", "default") == "default", rp
    cfg["rope_theta"] = rp["rope_theta"]
    cfg["torch_dtype"] = cfg.pop("dtype")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def make_tiny_reference(ver):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    for name, cls, config, seed in tiny_specs():
        print(f"[tiny/{name}]")
        model = cls(config).eval()
        init_weights(model, seed)
        out_dir = os.path.join(TINY_DIR, name)
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        if name == "qwen2":
            legacy_config_layout(out_dir, model.config)
        # re-load from disk so the reference is computed on exactly the saved tensors and config
        model = cls.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
        assert model.config.rope_parameters["rope_theta"] == config.rope_parameters["rope_theta"]
        assert model.config.tie_word_embeddings == config.tie_word_embeddings
        note = (
            f"Random {cls.__name__} (seed {seed}; init std: {STD}), float32, eager attention. logits[p] = "
            "float32 logits at every prompt position p (6 significant digits) from one forward over prompt_ids; "
            f"output_ids = {TINY_GREEDY} greedy tokens (argmax, full recompute each step, no KV cache)."
        )
        extra = {
            "arch": name,
            "tie_word_embeddings": bool(config.tie_word_embeddings),
            "weights_dtype_on_disk": "float32",
            "config_layout": "transformers-4 style (top-level rope_theta, torch_dtype)" if name == "qwen2"
            else "transformers-5 style (rope_parameters.rope_theta, dtype)",
        }
        if config.tie_word_embeddings:
            extra["tied_note"] = "model.safetensors has no lm_head.weight: lm_head = model.embed_tokens.weight"
        if name == "mistral":
            sd = {k: v.clone() for k, v in model.state_dict().items()}
            ids40 = tiny_prompts()[2]
            extra["sliding_window_check"] = sliding_window_check(cls, model.config, sd, ids40)
            print(f"  sliding window: first differing position {extra['sliding_window_check']['first_position_differing_from_no_window']}, "
                  f"max diff {extra['sliding_window_check']['max_abs_logit_diff_vs_no_window']}")
        doc = tiny_reference(model, note, ver, extra)
        dump_json(doc, os.path.join(out_dir, "reference.json"))
        for p in doc["prompts"]:
            print(f"  len {len(p['prompt_ids'])}: greedy {p['output_ids'][:12]}... distinct={len(set(p['output_ids']))} "
                  f"near ties {p['greedy_near_tie_steps']}")

        if name == "llama":
            for tag, dt in (("llama-bf16", torch.bfloat16), ("llama-f16", torch.float16)):
                print(f"[tiny/{tag}]")
                low = cls.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager")
                low = low.to(dt)
                low_dir = os.path.join(TINY_DIR, tag)
                os.makedirs(low_dir, exist_ok=True)
                low.save_pretrained(low_dir, safe_serialization=True)
                # reference: float32 forward on the bf16/f16-rounded weights read back from disk
                sd = load_file(os.path.join(low_dir, "model.safetensors"))
                assert all(v.dtype == dt for v in sd.values()), {k: v.dtype for k, v in sd.items()}
                ref = cls.from_pretrained(low_dir, dtype=torch.float32, attn_implementation="eager").eval()
                for k, v in ref.state_dict().items():
                    if k in sd:
                        assert torch.equal(v, sd[k].float()), k
                note2 = (
                    f"Same weights as tiny/llama, rounded to {str(dt).replace('torch.', '')} on disk. The reference "
                    "is computed in FLOAT32 on the rounded weights (weights upcast exactly to f32, all activations "
                    "f32). An engine computing in bf16/f16 will differ by activation rounding; compare with a "
                    "tolerance. " + note
                )
                ex2 = dict(extra)
                ex2["weights_dtype_on_disk"] = str(dt).replace("torch.", "")
                ex2["compute_dtype_of_reference"] = "float32"
                doc2 = tiny_reference(ref, note2, ver, ex2)
                dump_json(doc2, os.path.join(low_dir, "reference.json"))
                for p in doc2["prompts"]:
                    print(f"  len {len(p['prompt_ids'])}: greedy {p['output_ids'][:12]}... near ties {p['greedy_near_tie_steps']}")


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", default=os.path.expanduser("~/.cache/tern/models"))
    ap.add_argument("--only", choices=["gguf", "tiny"], default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (results do not depend on it "
                    "beyond float rounding; use 1 on a busy machine)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass
    ver = versions()
    print("versions:", ver)
    if args.only in (None, "tiny"):
        make_tiny_reference(ver)
    if args.only in (None, "gguf"):
        make_gguf_reference(args.models_dir, ver)


if __name__ == "__main__":
    main()
