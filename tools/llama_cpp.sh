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
  # The sdist's link from the package index pip is configured with (PIP_INDEX_URL, or pip's
  # config files' index-url; PyPI otherwise), fetched through the proxy the environment names.
  # (`pip download` would try to build the package's metadata, which needs a compiler run.)
  INDEX=${PIP_INDEX_URL:-$("$PY" -m pip config get global.index-url 2>/dev/null || true)}
  INDEX=${INDEX:-https://pypi.org/simple}
  "$PY" - "$DIR" "$VERSION" "$INDEX" <<'PYEOF'
import hashlib, re, sys, urllib.parse, urllib.request
d, v, index = sys.argv[1], sys.argv[2], sys.argv[3].rstrip("/") + "/llama-cpp-python/"
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
