#!/usr/bin/env bash
# Decode tok/s (2 threads, tern bench -p 0 -n 64 -r 3) of every weight format and KV cache dtype,
# back to back in one run so that they compare (this VM drifts ~20% between runs): the
# weights re-encoded with tern quantize, the KV dtypes over the f32 weights. DEPTH=1024 puts
# that many tokens in the context first (where the KV format matters). TERN=path: another binary.
set -euo pipefail
T="${TERN:-target/release/tern}"
cd "$(dirname "$0")/.."
for model in smollm2-135m qwen2.5-0.5b; do
  for m in f32 int8 w8a8 fp8 fp8-tensor; do
    q=$m; extra=""; [ $m = fp8-tensor ] && q=fp8 extra="--fp8-scale tensor"
    $T quantize -m $model --method $q $extra -t 2 -o /tmp/rm-$model-$m.gguf >/dev/null 2>&1
  done
  for spec in f32:f32 int8:f32 w8a8:f32 fp8:f32 fp8-tensor:f32 f32:f16 f32:bf16 f32:int8 f32:fp8; do
    m=${spec%%:*}; kv=${spec#*:}
    tg=$($T bench -m /tmp/rm-$model-$m.gguf -p 0 -n 64 -r 3 -t 2 --kv-cache-dtype $kv -d "${DEPTH:-0}" --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.1f" % [r for r in d["results"] if r["test"].startswith("tg")][0]["tok_per_s_median"])')
    echo "$model weights=$m kv=$kv depth=${DEPTH:-0} tg64 $tg"
  done
  rm -f /tmp/rm-$model-*.gguf
done
