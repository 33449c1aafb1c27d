#!/usr/bin/env bash
# The first run on a CUDA GPU, in one call: scripts/gpu_check.sh [OUTDIR] [--dry-run] [...]
# Uses only installed packages (no Hydra, no network); see attnbench/gpu_check.py. On a
# machine without network, packages it lacks (pytest-xdist, for parallel tests) can come
# along in .gpu-vendor/ (pip install --target .gpu-vendor pytest-xdist, elsewhere).
set -uo pipefail
cd "$(dirname "$0")/.."
vendor=""
[ -d .gpu-vendor ] && vendor="$PWD/.gpu-vendor"
export PYTHONPATH="$PWD${vendor:+:$vendor}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 -m attnbench.gpu_check "${1:-gpu-check}" "${@:2}"
