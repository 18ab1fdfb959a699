#!/usr/bin/env bash
# One device check on a machine with one NVIDIA H200 and JAX preinstalled (issue 20, part 3):
# kernels vs dense, attention TFLOP/s vs cuDNN and Pallas flash, sparsity, tree vs flat, the 1.7B
# train step's MFU, sampler decode. Under 8 minutes; writes JSON + markdown to
# benchmarks/results/device_check/ (or $1). Each section has its own process and time limit.
#
#   bash benchmarks/device_check.sh [OUT_DIR] [--smoke] [--sections a,b]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
OUT="benchmarks/results/device_check"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then OUT="$1"; shift; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' || true
exec timeout 470 "$PY" benchmarks/device_check.py --out "$OUT" "$@"
