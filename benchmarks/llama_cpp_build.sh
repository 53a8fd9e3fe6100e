#!/usr/bin/env bash
# Build a CPU-only llama.cpp runtime and its HF -> GGUF converter, outside the repo.
#
# What it does (every step is skipped when its result is already there, so re-running is cheap):
#   1. pip-downloads the source distribution of llama-cpp-python==$LLAMA_CPP_PY_VERSION (it vendors
#      llama.cpp under vendor/llama.cpp) into $LLAMA_CPP_DIR/sdist and unpacks it there;
#   2. configures llama.cpp with cmake (Release, CPU only, static, no tests/examples/server/app/openssl)
#      and builds only llama-quantize, llama-perplexity, llama-bench and llama-completion (the
#      plain-text generation CLI; llama-cli needs the whole server build and is left out);
#   3. creates the converter venv $LLAMA_CPP_DIR/venv with torch==2.13.0 (pinned: an unpinned torch pulls
#      gigabytes of CUDA wheels), transformers 5.x, safetensors, numpy, sentencepiece, protobuf and the
#      vendored gguf-py (editable);
#   4. prints the binaries' and the converter's paths as KEY=VALUE lines (last lines of the output).
#
# How long: 11-12 minutes from scratch on 2 cores (download ~1 min, venv ~1-2 min, build ~10 min with -j2);
# a few seconds when everything is already built.
#
# Requires: bash, python3 >= 3.10 with venv and pip (reaching PyPI), a C/C++ compiler (gcc/g++),
# cmake >= 3.14 (installed into the venv with pip when missing), ninja or make, about 1.6 GB of disk.
# No network other than PyPI. Writes nothing inside the repository.
#
# Settings (environment):
#   LLAMA_CPP_DIR         where everything goes            (default /work/llama.cpp-build; must be outside the repo)
#   LLAMA_CPP_JOBS        parallel compile jobs            (default 2)
#   LLAMA_CPP_NATIVE      GGML_NATIVE, -march=native      (default ON; set OFF for binaries that run on other CPUs)
#   LLAMA_CPP_PY_VERSION  llama-cpp-python sdist version  (default 0.3.36, which vendors llama.cpp 0c1e57098)
#   PYTHON                interpreter for the venv         (default python3)
#
# Usage:  bash benchmarks/llama_cpp_build.sh            # then e.g. eval "$(bash benchmarks/llama_cpp_build.sh | grep '^LLAMA_CPP_')"
set -euo pipefail

LLAMA_CPP_DIR="${LLAMA_CPP_DIR:-/work/llama.cpp-build}"
JOBS="${LLAMA_CPP_JOBS:-2}"
NATIVE="${LLAMA_CPP_NATIVE:-ON}"
PY_VERSION="${LLAMA_CPP_PY_VERSION:-0.3.36}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
TARGETS=(llama-quantize llama-perplexity llama-bench llama-completion)

log() { printf '[llama_cpp_build] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- refuse to write inside the repository --------------------------------------------------------
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
LLAMA_CPP_DIR="$(realpath -m "$LLAMA_CPP_DIR")"
case "$LLAMA_CPP_DIR/" in
    "$REPO_ROOT/"*) die "LLAMA_CPP_DIR=$LLAMA_CPP_DIR is inside the repository $REPO_ROOT; pick a folder outside it" ;;
esac
mkdir -p "$LLAMA_CPP_DIR"

SDIST_DIR="$LLAMA_CPP_DIR/sdist"
SDIST="$SDIST_DIR/llama_cpp_python-$PY_VERSION.tar.gz"
PKG_DIR="$LLAMA_CPP_DIR/llama_cpp_python-$PY_VERSION"
SRC="$PKG_DIR/vendor/llama.cpp"
BUILD="$LLAMA_CPP_DIR/build"
VENV="$LLAMA_CPP_DIR/venv"
VPY="$VENV/bin/python"

for tool in cc c++ tar; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y build-essential)"
done
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null \
    || die "$PYTHON must be Python >= 3.10 (the vendored gguf-py needs it)"

# --- 1. source ---------------------------------------------------------------------------------------
if [[ ! -f "$SDIST" ]]; then
    log "downloading llama-cpp-python==$PY_VERSION sdist"
    mkdir -p "$SDIST_DIR"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$PY_VERSION" -d "$SDIST_DIR"
    [[ -f "$SDIST" ]] || die "pip download did not produce $SDIST"
fi
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    log "unpacking $SDIST"
    tmp="$(mktemp -d "$LLAMA_CPP_DIR/unpack.XXXXXX")"
    tar -xzf "$SDIST" -C "$tmp"
    rm -rf "$PKG_DIR"
    mv "$tmp/llama_cpp_python-$PY_VERSION" "$PKG_DIR"
    rmdir "$tmp"
fi
# The vendored llama.cpp commit, from the package changelog (the sdist has no git metadata).
COMMIT="$(awk -v v="## [$PY_VERSION]" '$0 == v {f = 1; next} f && /^## \[/ {exit}
          f && match($0, /llama\.cpp@[0-9a-f]+/) {print substr($0, RSTART + 10, RLENGTH - 10); exit}' \
          "$PKG_DIR/CHANGELOG.md" 2>/dev/null || true)"
COMMIT="${COMMIT:-unknown}"

# --- 2. converter venv (also provides cmake when the system has none) -------------------------------
if [[ ! -x "$VPY" ]]; then
    log "creating venv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VPY" - "$SRC/gguf-py" <<'EOF' 2>/dev/null
import os, sys
import torch, transformers, safetensors, numpy, sentencepiece, google.protobuf, gguf
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert transformers.__version__.startswith("5."), transformers.__version__
assert os.path.realpath(gguf.__file__).startswith(os.path.realpath(sys.argv[1]))
EOF
then
    log "installing converter requirements into $VENV"
    "$VPY" -m pip install --quiet "$TORCH_PIN" 'transformers>=5,<6' safetensors numpy sentencepiece protobuf
    "$VPY" -m pip install --quiet -e "$SRC/gguf-py"
fi

CMAKE="$(command -v cmake || true)"
if [[ -z "$CMAKE" ]]; then
    [[ -x "$VENV/bin/cmake" ]] || { log "cmake not found; installing it into the venv"; "$VPY" -m pip install --quiet cmake; }
    CMAKE="$VENV/bin/cmake"
fi
GENERATOR=()
if command -v ninja >/dev/null; then GENERATOR=(-G Ninja); fi

# --- 3. build ----------------------------------------------------------------------------------------
# Configuring again is cheap and does not rebuild anything when the settings are unchanged.
if [[ -f "$BUILD/CMakeCache.txt" ]]; then GENERATOR=(); fi  # keep the generator the folder was made with
log "configuring llama.cpp ($COMMIT) in $BUILD"
"$CMAKE" -S "$SRC" -B "$BUILD" "${GENERATOR[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE="$NATIVE" \
    -DGGML_CCACHE=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_COMMIT="$COMMIT" >&2
log "building ${TARGETS[*]} with -j$JOBS (about 10 minutes on 2 cores the first time)"
"$CMAKE" --build "$BUILD" -j"$JOBS" --target "${TARGETS[@]}" >&2

for t in "${TARGETS[@]}"; do
    [[ -x "$BUILD/bin/$t" ]] || die "missing $BUILD/bin/$t after the build"
done
"$BUILD/bin/llama-bench" --version >&2 2>&1 || true

# --- 4. report ---------------------------------------------------------------------------------------
cat <<EOF
LLAMA_CPP_COMMIT=$COMMIT
LLAMA_CPP_QUANTIZE=$BUILD/bin/llama-quantize
LLAMA_CPP_PERPLEXITY=$BUILD/bin/llama-perplexity
LLAMA_CPP_BENCH=$BUILD/bin/llama-bench
LLAMA_CPP_COMPLETION=$BUILD/bin/llama-completion
LLAMA_CPP_CONVERT=$SRC/convert_hf_to_gguf.py
LLAMA_CPP_PYTHON=$VPY
EOF
