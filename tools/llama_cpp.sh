#!/usr/bin/env bash
# Builds the llama.cpp that the benchmark and the GGUF fixtures use: the copy vendored in PyPI's
# llama-cpp-python source distribution (pinned), compiled for this CPU.
#
#   tools/llama_cpp.sh [DIR]        (default: ~/.cache/latent/peers)
#
# Prints the llama.cpp folder (with convert_hf_to_gguf.py, gguf-py/ and build/bin/llama-bench,
# llama-quantize, llama-perplexity, llama-batched-bench, llama-server). Needs a C++ compiler;
# cmake and ninja come from the package index.
set -euo pipefail
VERSION=0.3.36
DIR=${1:-$HOME/.cache/latent/peers}
PY=${PYTHON:-python3}
SRC=$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp
mkdir -p "$DIR"
if [ ! -d "$SRC" ]; then
  # The source distribution through pip itself, so that the user's pip configuration (index,
  # mirror, proxy, certificates) applies. Only this package is taken from source: its build
  # backend's dependencies come as wheels, and preparing its metadata compiles nothing.
  "$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$DIR" >&2
  tar -xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
fi
"$PY" -m pip install --quiet cmake ninja >&2
BIN=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
export PATH=$BIN:$PATH
TARGETS="llama-bench llama-quantize llama-perplexity llama-batched-bench llama-server"
missing=0
for t in $TARGETS; do [ -x "$SRC/build/bin/$t" ] || missing=1; done
if [ "$missing" = 1 ]; then
  cmake -S "$SRC" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON >&2
  # shellcheck disable=SC2086
  cmake --build "$SRC/build" -j "$(nproc)" --target $TARGETS >&2
fi
echo "$SRC"
