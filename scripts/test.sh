#!/usr/bin/env bash
# Run the whole test suite (installs on first use). Extra arguments go to pytest.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"
cd "$repo"
exec python -m pytest -q -p no:cacheprovider "$@"
