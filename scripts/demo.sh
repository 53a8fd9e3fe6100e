#!/usr/bin/env bash
# Quick start: slice SmolLM2-135M at 25% with C4 calibration and print a before/after report.
# Extra arguments go to `slicelm slice` (e.g. --sparsity 0.1).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"
cd "$repo"
exec slicelm slice smollm2-135m --sparsity 0.25 --calib c4 --calib-samples 64 --calib-seqlen 1024 \
  --ppl-windows 8 --out out/smollm2-135m-sliced-0.25 --overwrite "$@"
