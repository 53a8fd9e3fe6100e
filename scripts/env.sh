# Shared by the scripts: set up the venv, activate it, and point at the offline data if it is there.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
# shellcheck disable=SC1091
source "${SLICELM_VENV:-$repo/.venv}/bin/activate"
if [ -z "${SLICELM_DATA_DIR:-}" ] && [ -d "$repo/../shared/data" ]; then
  export SLICELM_DATA_DIR="$(cd "$repo/../shared/data" && pwd)"
fi
export TOKENIZERS_PARALLELISM=false
