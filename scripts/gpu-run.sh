#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with device/ packed by
# scripts/gpu-pack.sh. Stages (any of them, in order): tests bench serve hf.
#   tests  kernel tests against CPU references, CUDA runner against the CPU runner
#   bench  batch-1 decode and 2,048-token prefill, bf16 and 4/8-bit, Qwen2.5-7B and Llama-3-8B shapes
#   nopdl  Qwen2.5-7B bf16 again with programmatic dependent launch off (TERN_CUDA_PDL=0)
#   profile  the same for Qwen2.5-7B bf16 and q4_k with TERN_CUDA_PROFILE=1 (GPU time per operation)
#   serve  `tern serve` cold start and `tern bench serve` at concurrency 1, 8, 32, 128 (128 in / 256 out)
#   servebase  concurrency 32 and 128 against device/tern-base's server (the previous version)
#   servenomma  concurrency 32 and 128 again with the tensor-core decode attention off (TERN_CUDA_ATTN_MMA=0)
#   basecmp  batch-1 decode of Qwen2.5-7B q4_k, q8_0, q4_k (or $BASECMP_DTYPES), alternating
#          device/tern-base.xz (a previous version's binary, copied there by hand) and device/tern
#   ncu    Nsight Compute on a few Q4_K matrix-vector kernels (speed of light, memory, warp stalls)
#   spec   `tern bench spec`, n-gram lookup (k <= 3 and 7) against plain decoding, batch 1, greedy:
#          Qwen2.5-7B bf16 random weights (acceptance is whatever the random model repeats), and the
#          real model file $SPEC_MODEL first where it is set. smollm2-135m (98 MB) exceeds one
#          call's 64 MiB: split it (`split -b 49181216 -d FILE part`), carry one half in a first
#          call that copies it to /tmp, the other in the next call on the still-warm machine, and
#          `cat` them there (check the .sha256 the model cache keeps beside it)
#   hf     the transformers baseline (../shared/bench/hf_baseline.py) in the same run
#   hfstatic  the same with a static cache and torch.compile, batch 128 then 1
#   serveprofile  concurrency 128 against a server with TERN_CUDA_PROFILE=ops (time per kernel)
#   b128   Qwen2.5-7B bf16 decode of 128 sequences together (128 in / 256 out): tern-base against
#          tern, then the GPU time per operation and Nsight Compute on its GEMMs and attention
# Logs and JSON go to $OUT (or ./gpu-out); each stage has a time limit and a failure does not
# stop the others.
set -uo pipefail
out="${OUT:-gpu-out}"
mkdir -p "$out"
stages="${*:-tests bench serve hf}"
for f in device/tern device/tern-core-tests device/tern-base; do
  [ -x "$f" ] || [ ! -f "$f.xz" ] || { xz -dkf "$f.xz" && chmod +x "$f"; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
qwen=configs/qwen2.5-7b.json
llama=configs/llama-3-8b.json

has() { [[ " $stages " == *" $1 "* ]]; }

if has tests; then
  echo "== tests"
  timeout 300 device/tern-core-tests cuda --nocapture --test-threads 1 >"$out/tests.log" 2>&1
  grep -E "^test |steps ×|skipped|result" "$out/tests.log"
  grep -A24 panicked "$out/tests.log" | grep -v "^note:\|backtrace" | head -40
fi

if has bench; then
  echo "== bench (batch 1)"
  for spec in "$qwen bf16" "$llama bf16" "$qwen q4_k" "$qwen q8_0" "$llama q4_k"; do
    set -- $spec
    name="$(basename "$1" .json)-$2"
    echo "-- $name" >>"$out/bench.txt"
    timeout 150 device/tern bench --device cuda -m "dummy:$1" --dummy-dtype "$2" -p 2048 -n 256 -r 3 \
      >"$out/one.txt" 2>&1
    echo "-- $name (exit $?)"
    cat "$out/one.txt" >>"$out/bench.txt"
    grep -E "^\| (pp|tg)|copy bandwidth|^device|error" "$out/one.txt"
  done
fi

if has basecmp && [ -x device/tern-base ]; then
  echo "== previous version (tern-base) against this one, batch-1 decode"
  for dtype in ${BASECMP_DTYPES:-q4_k q8_0 q4_k}; do
    for bin in tern-base tern; do
      timeout 100 device/$bin bench --device cuda -m "dummy:$qwen" --dummy-dtype $dtype -p 128 -n 256 -r 3 \
        >"$out/one.txt" 2>&1
      echo "-- qwen2.5-7b-$dtype $bin (exit $?)" | tee -a "$out/basecmp.txt"
      cat "$out/one.txt" >>"$out/basecmp.txt"
      grep -E "^\| tg|utilization|error" "$out/one.txt"
    done
  done
fi

if has b128; then
  echo "== batch-128 decode, Qwen2.5-7B bf16"
  for bin in tern-base tern tern-base tern; do
    [ -x device/$bin ] || continue
    TERN_CUDA_PROFILE=steps timeout 120 device/$bin bench --device cuda -m "dummy:$qwen" --dummy-dtype bf16 --batch 128 \
      -p 128 -n 256 -r 1 >"$out/one.txt" 2>&1
    echo "-- $bin (exit $?)" | tee -a "$out/b128.txt"
    cat "$out/one.txt" >>"$out/b128.txt"
    grep -E "^\| (pp|tg)|batch 128 \(graph|error" "$out/one.txt"
  done
  TERN_CUDA_PROFILE=ops timeout 120 device/tern bench --device cuda -m "dummy:$qwen" --dummy-dtype bf16 --batch 128 \
    -p 128 -n 32 -r 1 >"$out/one.txt" 2>&1
  echo "-- per operation (exit $?)" | tee -a "$out/b128.txt"
  cat "$out/one.txt" >>"$out/b128.txt"
  grep -E "^\| |time by" "$out/one.txt" | grep -v "^|---" | head -30
  TERN_CUDA_PROFILE=ops timeout 240 ncu --clock-control none --kernel-name regex:"attn_decode_mma|gemm|nvjet|silu_mul|rope_kv|rms_norm|f32_to_bf16" \
    --launch-skip 3000 --launch-count 12 --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats \
    --section Occupancy --section WarpStateStats device/tern bench --device cuda -m "dummy:$qwen" --dummy-dtype bf16 \
    --batch 128 -p 128 -n 8 -r 1 >"$out/ncu-b128.txt" 2>&1
  echo "ncu exit $?"
  TERN_CUDA_PROFILE=ops timeout 240 ncu --clock-control none --kernel-name regex:"attn_decode_mma" \
    --launch-skip 56 --launch-count 3 --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats \
    --section Occupancy --section WarpStateStats device/tern bench --device cuda -m "dummy:$qwen" --dummy-dtype bf16 \
    --batch 128 -p 128 -n 8 -r 1 >>"$out/ncu-b128.txt" 2>&1
  echo "ncu exit $?"
  grep -E "^  [a-zA-Z_0-9]+.*\(|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Grid Size|Block Size|Stall" "$out/ncu-b128.txt" | head -150
fi

if has ncu; then
  echo "== ncu: Q4_K matrix-vector kernels"
  TERN_CUDA_PROFILE=ops timeout 240 ncu --clock-control none --kernel-name regex:gemv_q4_k --launch-skip 40 \
    --launch-count 4 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section LaunchStats --section Occupancy device/tern bench --device cuda -m "dummy:$qwen" --dummy-dtype q4_k \
    -p 16 -n 8 -r 1 >"$out/ncu.txt" 2>&1
  echo "ncu exit $?"
  grep -E "gemv_q4_k|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Stall|Issued Ipc|L1/TEX Hit" "$out/ncu.txt" | head -60
fi

if has nopdl; then
  echo "== bench with programmatic dependent launch off (TERN_CUDA_PDL=0)"
  TERN_CUDA_PDL=0 timeout 150 device/tern bench --device cuda -m "dummy:$qwen" --dummy-dtype bf16 -p 2048 -n 256 -r 3 \
    >"$out/one.txt" 2>&1
  echo "-- qwen2.5-7b-bf16, PDL off (exit $?)" | tee -a "$out/bench.txt"
  cat "$out/one.txt" >>"$out/bench.txt"
  grep -E "^\| (pp|tg)|copy bandwidth|error" "$out/one.txt"
fi

if has profile; then
  echo "== profile (per-operation GPU time, graphs off)"
  for spec in "$qwen bf16 ops" "$qwen bf16 steps" "$qwen q4_k ops"; do
    set -- $spec
    name="$(basename "$1" .json)-$2-$3"
    TERN_CUDA_PROFILE=$3 timeout 150 device/tern bench --device cuda -m "dummy:$1" --dummy-dtype "$2" -p 2048 -n 64 -r 1 \
      >"$out/one.txt" 2>&1
    echo "-- $name (exit $?)" | tee -a "$out/profile.txt"
    cat "$out/one.txt" >>"$out/profile.txt"
    grep -E "^\| |time by" "$out/one.txt" | grep -v "^| test\|^|---" | head -30
  done
fi

# serve_at PORT CONCURRENCIES...: `tern bench serve` rows against the server on PORT.
serve_at() {
  local port=$1
  shift
  for c in "$@"; do
    n=$((c < 8 ? 8 : c * 2))
    timeout 150 device/tern bench serve --url "http://127.0.0.1:$port" --num-prompts $n --concurrency $c \
      --input-len 128 --output-len 256 --json >/tmp/serve-c$c.json 2>>"$out/serve.txt"
    python3 - /tmp/serve-c$c.json $c <<'PY' | tee -a "$out/serve.txt"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"concurrency {sys.argv[2]}: no result ({e})"); sys.exit()
m = r.get('server_metrics', {})
steps, step_s, fwd_s, sched_s, outp_s = (m.get('tern_engine_' + k, 0) for k in
    ['steps_total', 'step_seconds_total', 'forward_seconds_total', 'schedule_seconds_total', 'output_seconds_total'])
ms = lambda s: 1e3 * s / max(steps, 1)
print(f"concurrency {sys.argv[2]}: {r['completed']}/{r['num_prompts']} done, {r['output_token_throughput']:.1f} output tok/s, "
      f"TTFT p50 {r['ttft_ms']['p50']:.1f} ms, ITL p50 {r['itl_ms']['p50']:.2f} ms p99 {r['itl_ms']['p99']:.2f} ms; "
      f"{steps:.0f} engine steps, {ms(step_s):.2f} ms each, of which forward {ms(fwd_s):.2f} ms, "
      f"scheduling {ms(sched_s):.2f} ms, outputs {ms(outp_s):.2f} ms")
PY
  done
}

if has serve; then
  echo "== serve"
  port=8123
  t0=$(date +%s.%N)
  TERN_CUDA_PROFILE=steps device/tern serve --device cuda -m "dummy:$qwen" --dummy-dtype bf16 --tokenizer device/qwen-tokenizer \
    --port $port --max-num-seqs 128 --max-num-batched-tokens 4096 >/tmp/serve.log 2>&1 &
  server=$!
  for _ in $(seq 1 1200); do grep -q "listening on" /tmp/serve.log && break; sleep 0.05; done
  curl -s "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt":[1000,2000,3000],"max_tokens":1}' >/dev/null
  t1=$(date +%s.%N)
  {
    echo "cold start (process start to first token served): $(python3 -c "print(f'{$t1 - $t0:.2f} s')")"
    cat /tmp/serve.log
    nvidia-smi --query-gpu=memory.used --format=csv
  } | tee "$out/serve.txt"
  serve_at $port 1 8 32 128
  python3 -c "import json,glob; print(json.dumps({f: json.load(open(f)) for f in sorted(glob.glob('/tmp/serve-c*.json'))}, indent=1))" >"$out/serve.json" 2>/dev/null
  kill -INT $server
  wait $server
  echo "server exit $?" | tee -a "$out/serve.txt"
  grep -E "^\| |time by|stopped" /tmp/serve.log | grep -v "^|---" | tee -a "$out/serve.txt"
fi

if has servebase && [ -x device/tern-base ]; then
  echo "== serve, the previous version (device/tern-base)" | tee -a "$out/serve.txt"
  port=8126
  TERN_CUDA_PROFILE=steps device/tern-base serve --device cuda -m "dummy:$qwen" --dummy-dtype bf16 \
    --tokenizer device/qwen-tokenizer --port $port --max-num-seqs 128 --max-num-batched-tokens 4096 >/tmp/serve-base.log 2>&1 &
  server=$!
  for _ in $(seq 1 1200); do grep -q "listening on" /tmp/serve-base.log && break; sleep 0.05; done
  serve_at $port 32 128
  kill -INT $server
  wait $server
fi

if has servenomma; then
  echo "== serve, tensor-core decode attention off (TERN_CUDA_ATTN_MMA=0)" | tee -a "$out/serve.txt"
  port=8125
  TERN_CUDA_ATTN_MMA=0 device/tern serve --device cuda -m "dummy:$qwen" --dummy-dtype bf16 --tokenizer device/qwen-tokenizer \
    --port $port --max-num-seqs 128 --max-num-batched-tokens 4096 >/tmp/serve-nomma.log 2>&1 &
  server=$!
  for _ in $(seq 1 1200); do grep -q "listening on" /tmp/serve-nomma.log && break; sleep 0.05; done
  serve_at $port 32 128
  kill -INT $server
  wait $server
fi

if has spec; then
  echo "== speculative decoding: n-gram lookup against plain decoding, batch 1, greedy"
  for m in ${SPEC_MODEL:-} "dummy:$qwen"; do
    extra=()
    [[ $m == dummy:* ]] && extra=(--dummy-dtype bf16 --tokenizer device/qwen-tokenizer)
    for k in 3 7; do
      timeout 150 device/tern bench spec --device cuda -m "$m" "${extra[@]}" --kv-cache-memory 8GiB \
        --prompts data/spec-grounded.jsonl --chat --max-tokens 192 --speculative ngram --num-speculative-tokens $k \
        >"$out/one.txt" 2>&1
      echo "-- $(basename "$m") k <= $k (exit $?)" | tee -a "$out/spec.txt"
      cat "$out/one.txt" >>"$out/spec.txt"
      grep -E "^\| [a-z]|end to end|accepted|rror" "$out/one.txt" | grep -v "^| prompt"
    done
  done
fi

if has hf; then
  echo "== transformers baseline"
  PYTHONUNBUFFERED=1 timeout 400 python3 device/hf_baseline.py --batches 1,8,32,128 --out "$out/hf_baseline.json" 2>&1 |
    tee "$out/hf.log" | tail -25
fi

if has hfstatic; then
  echo "== transformers baseline, static cache + torch.compile (batch 128, then 1)"
  PYTHONUNBUFFERED=1 timeout 450 python3 device/hf_baseline.py --batches "" --static --static-batches 128,1 --reps 2 \
    --skip-micro --static-budget-s 360 --out "$out/hf_static.json" 2>&1 | tee "$out/hf-static.log" | tail -25
fi
rm -f "$out/one.txt"

if has serveprofile; then
  echo "== serve at concurrency 128 with TERN_CUDA_PROFILE=ops (GPU time per operation, graphs off)"
  port=8124
  TERN_CUDA_PROFILE=ops device/tern serve --device cuda -m "dummy:$qwen" --dummy-dtype bf16 --tokenizer device/qwen-tokenizer \
    --port $port --max-num-seqs 128 --max-num-batched-tokens 4096 >/tmp/serve-prof.log 2>&1 &
  server=$!
  for _ in $(seq 1 1200); do grep -q "listening on" /tmp/serve-prof.log && break; sleep 0.05; done
  timeout 150 device/tern bench serve --url "http://127.0.0.1:$port" --num-prompts 128 --concurrency 128 \
    --input-len 128 --output-len 256 >/dev/null 2>&1
  kill -INT $server
  wait $server
  grep -E "^\| |time by" /tmp/serve-prof.log | grep -v "^|---" | tee "$out/serve-profile.txt"
  rm -f "$out/one.txt"
fi
