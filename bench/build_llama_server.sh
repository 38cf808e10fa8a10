#!/usr/bin/env bash
# Build llama.cpp's own server from the llama.cpp source that llama-cpp-python vendors (the same
# version our backend runs), for the benchmarks' "vs llama-server" figures. Installs into
# .llama-server/ at the repository root (ignored by git). ~5 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
.venv/bin/python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
tar xzf "$WORK"/llama_cpp_python-*.tar.gz -C "$WORK"
SRC="$(echo "$WORK"/llama_cpp_python-*/vendor/llama.cpp)"
cmake -S "$SRC" -B "$WORK/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF > "$WORK/cmake.log"
cmake --build "$WORK/build" --target llama-server -j"$(nproc)" >> "$WORK/cmake.log"
mkdir -p .llama-server/bin
cp "$WORK"/build/bin/llama-server .llama-server/bin/  # static: no shared libraries to carry
echo "llama-server (llama.cpp vendored by llama-cpp-python $VERSION) in .llama-server/bin"
