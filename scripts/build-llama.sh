#!/usr/bin/env bash
# Build llama-cpp-python once, portably, into a wheel cache that every checkout shares.
#
#   scripts/build-llama.sh PIP VERSION    # prints the folder that holds the wheel
#
# Why not `pip install llama-cpp-python`: that compiles llama.cpp with
# -march=native, and pip caches the wheel under the source package's name, so
# the next machine that shares the cache (a container layer, a shared home, a CI
# runner) gets instructions its CPU may lack. On Intel Xeons with AMX the native
# build also routes matrix products through ggml's AMX kernels, which die with
# SIGILL (see src/testtime/engines/_ggml.py).
#
# The recipe: no -march=native; every CPU variant of ggml's CPU backend built as
# its own library (x86: from plain x86-64 up to AVX2, AVX-512 and AMX; ARM:
# armv8.0 up to SVE2/SME), and ggml loads the best one the CPU runs at start-up
# (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS). The variant libraries go into
# llama_cpp/lib next to libggml, where testtime loads them from. The vision
# library (mtmd) is not built: testtime does not use it.
#
# The wheel is built with pip's cache off, so it neither reuses a native wheel
# another tool cached nor leaves one behind, and is stored under a name that
# includes a hash of this recipe, in ${TESTTIME_WHEELS:-~/.cache/testtime/wheels}.
# The first build takes about 15 minutes on 2 cores; later set-ups reuse it.
set -euo pipefail

PIP=${1:?usage: build-llama.sh PIP VERSION}
VERSION=${2:?usage: build-llama.sh PIP VERSION}
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib -DLLAVA_BUILD=OFF"
RECIPE=$(printf '%s|%s|%s' "$VERSION" "$CMAKE_ARGS" "$(uname -m)" | sha256sum | cut -c1-12)
ROOT=${TESTTIME_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/testtime/wheels}
DIR="$ROOT/llama-cpp-python-$VERSION-$RECIPE"

if ! compgen -G "$DIR/llama_cpp_python-$VERSION-*.whl" >/dev/null; then
    mkdir -p "$ROOT"
    TMP=$(mktemp -d "$ROOT/.build-XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
    echo "building llama-cpp-python $VERSION (portable, all CPU variants) into $DIR; this takes a while" >&2
    CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        "$PIP" wheel --quiet --no-deps --no-cache-dir --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -w "$TMP" >&2
    chmod 755 "$TMP"   # mktemp made it private; the cache may be shared
    rm -rf "$DIR"
    mv "$TMP" "$DIR"   # appears whole or not at all: an interrupted build is redone
    trap - EXIT
fi
echo "$DIR"
