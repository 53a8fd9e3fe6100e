#!/usr/bin/env bash
# Quick start: compress SmolLM2-135M to 85% of its true parameter count in the stock Llama
# architecture (MLP channels pruned with an OBS refit, C4 calibration) and print a before/after report.
# Extra arguments go to `slicelm slice` (e.g. --sparsity 0.25 --layout slicegpt for the paper's SliceGPT).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"
cd "$repo"
exec slicelm slice smollm2-135m --target-params 0.85 --schedule mlp --layout plain --calib c4 \
  --calib-samples 64 --calib-seqlen 1024 --ppl-windows 8 --out out/smollm2-135m-0.85-plain --overwrite "$@"
