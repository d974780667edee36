#!/usr/bin/env python3
"""Loads a GGUF file written by `tern quantize` with Hugging Face transformers (which reads
GGUF through llama.cpp's gguf-py and dequantizes Q4_1 / Q8_0 to float32) and scores the same
perplexity windows as reference/perplexity.py. Run next to
`tern eval perplexity -m FILE --dequantize --json` on the same windows: equal perplexities
show that another engine reads tern's file as tern does.

  /tmp/refenv/bin/python reference/load_quantized.py FILE --key smollm2-135m --max-windows 2
"""
import argparse
import json
import math
import os
import sys

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import perplexity as ppl_ref  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file")
    ap.add_argument("--key", required=True, help="the source model (for its tokenizer fix-ups)")
    ap.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "..", "data", "botchan-eval.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d, fname = os.path.split(os.path.abspath(args.file))
    add_bos_meta, bos_id, pre = ppl_ref.gguf_bos(args.file)
    import gguf

    r = gguf.GGUFReader(args.file)
    types = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    tok, _, _ = ppl_ref.load_tokenizer(d, "tern-output", fname, pre)
    text = open(args.text, encoding="utf-8").read()
    tokens = tok(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=fname, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    add_bos = bool(add_bos_meta is True and bos_id is not None)
    total, n = 0.0, 0
    with torch.inference_mode():
        for w in range(min(len(tokens) // args.ctx, args.max_windows)):
            win = tokens[w * args.ctx:(w + 1) * args.ctx]
            nll = ppl_ref.window_nll(model, [bos_id] + win, win, 0) if add_bos else ppl_ref.window_nll(model, win, win[1:], 0)
            total += float(nll.sum())
            n += len(nll)
    print(json.dumps({"file": args.file, "tensor_types": types,
                      "method": r.fields["tern.quantize.method"].contents() if "tern.quantize.method" in r.fields else None,
                      "tokens_scored": n, "ppl": math.exp(total / n)}))


if __name__ == "__main__":
    main()
