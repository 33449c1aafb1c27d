#!/usr/bin/env bash
# Verify and measure everything on a CUDA GPU in one run: scripts/gpu_check.sh [OUTDIR]
# Uses only installed packages (no Hydra, no network); see attnbench/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 -m attnbench.gpu_check "${1:-gpu-check}" "${@:2}"
