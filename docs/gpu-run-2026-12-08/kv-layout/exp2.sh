#!/usr/bin/env bash
# Why the batch-128 decode graph takes longer in `tern serve` than in `tern bench --batch 128`.
out="${OUT:-gpu-out}"; mkdir -p "$out"
for f in device/tern device/tern-base; do [ -x "$f" ] || { xz -dkf "$f.xz" && chmod +x "$f"; }; done
q=configs/qwen2.5-7b.json
for bin in tern-base tern; do
TERN_CUDA_PROFILE=steps timeout 120 device/$bin bench --device cuda -m "dummy:$q" --dummy-dtype bf16 --batch 128 -p 128 -n 256 -r 1 >"$out/one.txt" 2>&1
echo "$bin bench b128: $(grep -E '^\| tg|batch 128 \(graph' $out/one.txt | tr '\n' ' ')" | tee -a "$out/exp2.txt"
run() {  # name, concurrencies, server flags...
  local name=$1 cs=$2; shift 2
  TERN_CUDA_PROFILE=steps device/$bin serve --device cuda -m "dummy:$q" --dummy-dtype bf16 --tokenizer device/qwen-tokenizer \
    --port 8130 --max-num-seqs 128 --max-num-batched-tokens 4096 "$@" >/tmp/s.log 2>&1 &
  local pid=$!
  for _ in $(seq 1 1200); do grep -q "listening on" /tmp/s.log && break; sleep 0.05; done
  for c in $cs; do
    n=$((c < 8 ? 8 : c * 2))
    timeout 100 device/tern bench serve --url http://127.0.0.1:8130 --num-prompts $n --concurrency $c --input-len 128 --output-len 256 2>&1 | grep -E "output token throughput|tern_engine_(steps_total|step_seconds|forward_seconds|output_seconds)" | sed "s/^/$bin $name c$c: /" | tee -a "$out/exp2.txt"
  done
  kill -INT $pid; wait $pid
  grep -E "batch 128 \(graph|prefill or mixed|decode step, wall|KV blocks" /tmp/s.log | sed "s/^/$bin $name: /" | tee -a "$out/exp2.txt"
}
run fresh-full 128
run fresh-4gib 128 --kv-cache-memory 4GiB
run after-c1-c32 "1 32 128"
done
