#!/usr/bin/env bash
# The quantization results table: for each model and method, `tern quantize` (calibrating on
# data/botchan-calib.txt), perplexity on the first WINDOWS windows of data/botchan-eval.txt,
# file size, stored bits per weight of the layer matrices, and CPU decode speed (2 threads).
# The baseline row is the source GGUF's weights dequantized to f32 (`--method f32`); the
# `kv-<dtype>` rows are that baseline with the KV cache stored as <dtype> (f16, bf16, int8, fp8);
# `fp8-tensor` is fp8 with one scale per matrix; `awq-clip` is awq with its clipping search.
# TERN=path runs another binary (e.g. a copy, so that builds can go on meanwhile).
# Usage: scripts/bench-quant.sh [model:method,method ...] (default: the README's rows).
set -euo pipefail
cd "$(dirname "$0")/.."
tern="${TERN:-target/release/tern}"
[ -x "$tern" ] || cargo build --release -q -p tern
windows="${WINDOWS:-8}"
out="${OUT_DIR:-/tmp/tern-quant}"
mkdir -p "$out"
if [ $# -gt 0 ]; then specs=("$@"); else specs=(smollm2-135m:f32,int8,int4-rtn,gptq,awq qwen2.5-0.5b:f32,int8,int4-rtn,awq); fi
echo "| model | method | perplexity (± stderr, $windows × 512 tokens) | file MB | bits/weight (layers) | decode tok/s (2 threads) | quantize s |"
echo "|---|---|---|---|---|---|---|"
for spec in "${specs[@]}"; do
  model="${spec%%:*}"
  IFS=, read -ra methods <<<"${spec#*:}"
  for method in "${methods[@]}"; do
    file="$out/$model-$method.gguf"
    qargs=()
    kv=f32
    quant="$method"
    case "$method" in
      gptq | awq | llm-int8) qargs=(--calib data/botchan-calib.txt) ;;
      awq-clip) quant=awq qargs=(--calib data/botchan-calib.txt --awq-clip) ;;
      kv-*) quant=f32 kv="${method#kv-}" ;;
      fp8-tensor) quant=fp8 qargs=(--fp8-scale tensor) ;;
    esac
    t0=$(date +%s.%N)
    # (the whole output, then its first line: `| head -1` could end the pipe while tern still
    # writes, and pipefail would then stop the script)
    report=$("$tern" quantize -m "$model" --method "$quant" "${qargs[@]}" -t 2 -o "$file" 2>/dev/null)
    report="${report%%$'\n'*}"
    t1=$(date +%s.%N)
    bpw=$(sed -n 's/.* at \([0-9.]*\) bits\/weight.*/\1/p' <<<"$report")
    ppl=$("$tern" eval perplexity -m "$file" --text data/botchan-eval.txt --max-windows "$windows" -t 2 --kv-cache-dtype "$kv" --json |
      python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.3f ± %.3f" % (d["ppl"], d["ppl_stderr"]))')
    tg=$("$tern" bench -m "$file" -p 0 -n 64 -r 3 -t 2 --kv-cache-dtype "$kv" --json |
      python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.1f" % [r for r in d["results"] if r["test"].startswith("tg")][0]["tok_per_s_median"])')
    mb=$(python3 -c "import os; print('%.1f' % (os.path.getsize('$file') / 1e6))")
    secs=$(python3 -c "print('%.0f' % ($t1 - $t0))")
    echo "| $model | $method | $ppl | $mb | $bpw | $tg | $secs |"
    rm -f "$file"
  done
done
