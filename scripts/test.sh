#!/usr/bin/env bash
# Run the whole test suite (installs on first use). Extra arguments go to pytest.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"
cd "$repo"
# One worker per core (tests pin torch to one thread each); -p no:xdist or -n 0 to run serially.
exec python -m pytest -q -p no:cacheprovider -n "${SLICELM_TEST_WORKERS:-auto}" "$@"
