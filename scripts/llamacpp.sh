#!/usr/bin/env bash
# llama.cpp, the reference that nomoat's GGUF files are checked against, built once from source into a cache
# folder outside the repo; prints the folder that holds the binaries (llama-cli, llama-server, ...).
#
# The source comes from the package registry, inside llama-cpp-python's source distribution (vendor/llama.cpp,
# with convert_hf_to_gguf.py and gguf-py beside it), pinned below. The build is native to this CPU, so the cache
# folder is keyed by the CPU's flags too: another kind of CPU gets its own build. About 10 minutes on 2 cores.
#   scripts/llamacpp.sh           build if needed, print the bin folder
#   scripts/llamacpp.sh --source  print the source folder (convert_hf_to_gguf.py, gguf-py)
#   scripts/llamacpp.sh --built   print the bin folder if it is already built, else exit 1
set -euo pipefail
VERSION=0.3.36  # llama-cpp-python's version; it vendors one llama.cpp commit
CACHE=${NOMOAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nomoat}
CPU=$(grep -m1 '^flags' /proc/cpuinfo | sha256sum | cut -c1-12)
ROOT=$CACHE/llama.cpp-$VERSION
SRC=$ROOT/src/llama_cpp_python-$VERSION/vendor/llama.cpp
BUILD=$ROOT/build-$CPU
TOOLS=(llama-cli llama-completion llama-server llama-bench llama-perplexity llama-tokenize llama-quantize)
PIP=${PIP:-$(command -v pip || echo "python3 -m pip")}

built() { for t in "${TOOLS[@]}"; do [ -x "$BUILD/bin/$t" ] || return 1; done; }
if [ "${1:-}" = "--built" ]; then  # print the bin folder if it is built, else fail; never build
  built && echo "$BUILD/bin"
  exit $?
fi
mkdir -p "$ROOT"
exec 9>"$ROOT/.lock"
flock 9  # one build at a time: a test run and a shell may ask together
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  mkdir -p "$ROOT/src"
  tmp=$(mktemp -d)
  $PIP download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$tmp" >&2
  tar xzf "$tmp"/llama_cpp_python-$VERSION.tar.gz -C "$ROOT/src"
  rm -rf "$tmp"
fi
if [ "${1:-}" = "--source" ]; then
  echo "$SRC"
  exit 0
fi
if ! built; then
  echo "building llama.cpp $VERSION into $BUILD (about 10 minutes on 2 cores, once)" >&2
  cmake -S "$SRC" -B "$BUILD.tmp" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF -DBUILD_SHARED_LIBS=OFF >&2
  cmake --build "$BUILD.tmp" --target "${TOOLS[@]}" -j "$(nproc)" >&2
  rm -rf "$BUILD" && mv "$BUILD.tmp" "$BUILD"  # a half-finished build is never taken for a finished one
fi
echo "$BUILD/bin"
