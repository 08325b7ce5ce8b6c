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
  # The sdist's link from PyPI's simple index (pip download would try to build its metadata).
  "$PY" - "$DIR" "$VERSION" <<'PYEOF'
import hashlib, re, sys, urllib.parse, urllib.request
d, v = sys.argv[1], sys.argv[2]
index = "https://pypi.org/simple/llama-cpp-python/"
html = urllib.request.urlopen(index).read().decode()
name = f"llama_cpp_python-{v}.tar.gz"
link = re.search(r'href="([^"]*' + re.escape(name) + r'[^"]*)"', html)
if not link:
    sys.exit(f"{name} is not on {index}")
url = urllib.parse.urljoin(index, link.group(1).replace("&amp;", "&"))
path = f"{d}/{name}"
urllib.request.urlretrieve(url.split("#")[0], path)
want = re.search(r"sha256=([0-9a-f]{64})", url)
if want and hashlib.sha256(open(path, "rb").read()).hexdigest() != want.group(1):
    sys.exit(f"{path}: sha256 does not match the index")
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
