#!/usr/bin/env bash
# The GPU verdict in one bounded command (300 s by default; see attnbench/gpu_check.py):
#   scripts/gpu_check.sh OUT                   measure and judge; at most 8 files in OUT
#   scripts/gpu_check.sh OUT --dry-run         the plan and its estimate, no GPU needed
#   scripts/gpu_check.sh --verdict-only OUT    the verdict again from OUT/rows.csv, on any machine
# Uses only installed packages (no Hydra, no network). On a machine without network,
# packages it lacks (pytest-xdist, for parallel tests) can come along in .gpu-vendor/
# (pip install --target .gpu-vendor pytest-xdist, elsewhere).
set -uo pipefail
cd "$(dirname "$0")/.."
vendor=""
[ -d .gpu-vendor ] && vendor="$PWD/.gpu-vendor"
export PYTHONPATH="$PWD${vendor:+:$vendor}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 -m attnbench.gpu_check "${1:-gpu-check}" "${@:2}"
