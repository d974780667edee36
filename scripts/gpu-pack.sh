#!/usr/bin/env bash
# Builds the CUDA binaries on this (GPU-less) machine and packs what a GPU run needs into
# device/ (git-ignored; name it in the device tool's `carry`): the tern binary, the tern-core
# test binary (kernel and runner tests), the transformers baseline script, and the Qwen2.5
# tokenizer (for serving dummy weights). Then run scripts/gpu-run.sh on the GPU machine.
# Needs the CUDA 13.0 build toolchain: ../shared/cuda/setup-cuda-build.sh installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null && [ -z "${NVCC:-}" ]; then
  eval "$(bash ../shared/cuda/setup-cuda-build.sh --print)"
fi
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# A target directory of its own: the CPU build's artifacts stay valid.
export CARGO_TARGET_DIR=target/cuda
cargo build --release -p tern --features cuda -q
tests=$(cargo test --release --features cuda -p tern-core --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["kind"] == ["lib"] and m["profile"]["test"] and m.get("executable"):
        print(m["executable"])')
mkdir -p device
strip -o device/tern target/cuda/release/tern
strip -o device/tern-core-tests "$tests"
xz -f -T2 -6 device/tern device/tern-core-tests
cp ../shared/bench/hf_baseline.py device/
[ -f device/qwen-tokenizer/tokenizer.json ] || target/cuda/release/tern export-tokenizer -m qwen2.5-0.5b device/qwen-tokenizer >/dev/null
du -sh device/*
