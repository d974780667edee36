#!/usr/bin/env bash
# Prefetch experiment: TERN_GEMV_PREFETCH modes against tern-base, batch-1 decode, Qwen2.5-7B shape.
out="${OUT:-gpu-out}"; mkdir -p "$out"
for f in device/tern device/tern-base; do [ -x "$f" ] || { xz -dkf "$f.xz" && chmod +x "$f"; }; done
q=configs/qwen2.5-7b.json

for dtype in q4_k bf16; do
  for mode in base 0 1 2 3 4; do
    bin=tern; [ $mode = base ] && bin=tern-base
    TERN_GEMV_PREFETCH=$mode timeout 60 device/$bin bench --device cuda -m "dummy:$q" --dummy-dtype $dtype -p 128 -n 256 -r 3 >"$out/one.txt" 2>&1
    echo "$dtype mode $mode: $(grep -E '^\| tg' $out/one.txt) $(grep -o 'utilization [0-9.]*%' $out/one.txt)" | tee -a "$out/exp.txt"
  done
done
