#!/usr/bin/env bash
# Builds llama.cpp's llama-bench from the source that llama-cpp-python 0.3.36 vendors (the
# baseline tern is compared with) and runs it with the given arguments, e.g.
#   scripts/llama-bench.sh -m ~/.cache/tern/models/smollm2-135m.gguf -t 2 -p 512 -n 128 -r 3
# A measuring tool only: tern does not depend on it. Needs cmake and a C++ compiler; the
# build takes ~10 minutes on 2 cores and is cached in $LLAMA_BENCH_DIR.
set -euo pipefail
dir="${LLAMA_BENCH_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tern/llama-bench}"
bin="$dir/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-bench"
if [ ! -x "$bin" ]; then
  command -v cmake >/dev/null || { echo "cmake is needed (apt-get install cmake)" >&2; exit 1; }
  mkdir -p "$dir"
  cd "$dir"
  [ -f llama_cpp_python-0.3.36.tar.gz ] ||
    python3 -m pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d . -q
  tar xzf llama_cpp_python-0.3.36.tar.gz
  cd llama_cpp_python-0.3.36/vendor/llama.cpp
  cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  cmake --build build --target llama-bench -j"$(nproc)" >/dev/null
fi
exec "$bin" "$@"
