#!/usr/bin/env bash
# The serving numbers of the README, in one run: `tern serve` on one model, driven by
# `tern bench serve`.
#   1. batching gain: output tokens/s at concurrency 1 and 16 (same prompts, lengths, server);
#   2. prefix caching: TTFT of requests sharing a 1,000-token system prompt, with the prefix
#      cache on, then with a server started with --no-prefix-caching.
# Usage: scripts/bench-serve.sh [MODEL] (default smollm2-135m); TERN=path/to/tern overrides
# the binary (default: target/release/tern, built if missing). Prints one markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-smollm2-135m}"
tern="${TERN:-target/release/tern}"
[ -x "$tern" ] || cargo build --release -q
port="${PORT:-8431}"
url="http://127.0.0.1:$port"
log=$(mktemp -d)
server=""
stop_server() {
  if [ -n "$server" ]; then
    kill -INT "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=""
  fi
}
trap 'stop_server; rm -rf "$log"' EXIT

start_server() {
  "$tern" serve --model "$model" --port "$port" "$@" >"$log/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 1 600); do
    grep -q "listening on" "$log/serve.log" 2>/dev/null && return 0
    kill -0 "$server" 2>/dev/null || { cat "$log/serve.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "the server did not start in 60 s" >&2
  exit 1
}

# bench NAME ARGS...: one `tern bench serve` run, its JSON kept as $log/NAME.json.
bench() {
  local name=$1
  shift
  "$tern" bench serve --url "$url" --json "$@" >"$log/$name.json"
}

field() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, r))" "$log/$1.json" "$2"; }

row() { # name description
  printf '| %s | %s | %.1f | %.2f | %.0f | %.0f | %.1f | %s |\n' "$2" "$(field "$1" "f'{completed}/{num_prompts}'")" \
    "$(field "$1" output_token_throughput)" "$(field "$1" request_throughput)" \
    "$(field "$1" "ttft_ms['p50']")" "$(field "$1" "ttft_ms['p99']")" "$(field "$1" "itl_ms['p50']")" \
    "$(field "$1" "server_metrics.get('tern_prefill_tokens_computed_total', float('nan'))")"
}

start_server
# Batching: 48 prompts one at a time, then 48 others 16 at a time (other seeds: no prefix hits).
load=(--num-prompts 48 --input-len 128 --output-len 128)
bench warm --num-prompts 2 --input-len 16 --output-len 4 --seed 99
bench c1 "${load[@]}" --concurrency 1 --seed 1
bench c16 "${load[@]}" --concurrency 16 --seed 2
short=(--num-prompts 48 --input-len 32 --output-len 256)
bench s1 "${short[@]}" --concurrency 1 --seed 3
bench s16 "${short[@]}" --concurrency 16 --seed 4
# Prefix caching: 16 requests, one after another, each a shared 1,000-token prefix + 24 own tokens.
prefix=(--num-prompts 16 --prefix-len 1000 --input-len 24 --output-len 16 --concurrency 1 --seed 5)
bench prefix_on "${prefix[@]}"
stop_server
start_server --no-prefix-caching
bench prefix_off "${prefix[@]}"
stop_server

echo "model $model, $(nproc) cores, $(date -u +%F)"
echo
echo '| run | done | output tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | prefill tokens computed |'
echo '|---|---|---|---|---|---|---|---|'
row c1 "128 in / 128 out, concurrency 1"
row c16 "128 in / 128 out, concurrency 16"
row s1 "32 in / 256 out, concurrency 1"
row s16 "32 in / 256 out, concurrency 16"
row prefix_on "1,000 shared + 24 in / 16 out, prefix cache on"
row prefix_off "1,000 shared + 24 in / 16 out, --no-prefix-caching"
echo
python3 - "$log" <<'PY'
import json, sys
d = sys.argv[1]
r = {n: json.load(open(f"{d}/{n}.json")) for n in ["c1", "c16", "s1", "s16", "prefix_on", "prefix_off"]}
g = lambda a, b: r[a]["output_token_throughput"] / r[b]["output_token_throughput"]
print(f"batching gain (output tok/s, c16 / c1): {g('c16', 'c1'):.2f}x at 128/128, {g('s16', 's1'):.2f}x at 32/256")
t = lambda n, q: r[n]["ttft_ms"][q]
print(f"prefix-cache TTFT gain: {t('prefix_off', 'p50') / t('prefix_on', 'p50'):.1f}x (p50), "
      f"{t('prefix_off', 'mean') / t('prefix_on', 'mean'):.1f}x (mean)")
PY
