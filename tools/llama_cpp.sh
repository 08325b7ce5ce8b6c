#!/usr/bin/env bash
# Builds the llama.cpp that the benchmark and the GGUF fixtures use: the copy vendored in PyPI's
# llama-cpp-python source distribution (pinned), compiled for this CPU.
#
#   tools/llama_cpp.sh [DIR]        (default: ~/.cache/latent/peers)
#
# Prints the llama.cpp folder (with convert_hf_to_gguf.py, gguf-py/ and build/bin/llama-bench,
# llama-quantize, llama-perplexity). Needs a C++ compiler; cmake and ninja come from PyPI.
set -euo pipefail
VERSION=0.3.36
DIR=${1:-$HOME/.cache/latent/peers}
PY=${PYTHON:-python3}
SRC=$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp
mkdir -p "$DIR"
if [ ! -d "$SRC" ]; then
  "$PY" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation "llama-cpp-python==$VERSION" -d "$DIR" >&2 \
    || "$PY" - "$DIR" "$VERSION" <<'PYEOF'
import json, sys, urllib.request
d, v = sys.argv[1], sys.argv[2]
meta = json.load(urllib.request.urlopen(f"https://pypi.org/pypi/llama-cpp-python/{v}/json"))
url = next(u["url"] for u in meta["urls"] if u["packagetype"] == "sdist")
urllib.request.urlretrieve(url, f"{d}/llama_cpp_python-{v}.tar.gz")
PYEOF
  tar -xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
fi
"$PY" -m pip install --quiet cmake ninja >&2
BIN=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
export PATH=$BIN:$PATH
if [ ! -x "$SRC/build/bin/llama-bench" ] || [ ! -x "$SRC/build/bin/llama-quantize" ]; then
  cmake -S "$SRC" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
  cmake --build "$SRC/build" -j "$(nproc)" --target llama-bench llama-quantize llama-perplexity >&2
fi
echo "$SRC"
