#!/usr/bin/env bash
# One device check on a machine with one NVIDIA H200 and JAX preinstalled (issue 20, part 3):
# kernels vs dense, attention TFLOP/s vs cuDNN and Pallas flash, sparsity, tree vs flat, the 1.7B
# train step's MFU, sampler decode. Under 8 minutes; writes device_check.json + device_check.md to
# benchmarks/results/device_check/ (or the first argument). Each section has its own process and
# time limit; one failing records its error and the others still run.
#
#   bash benchmarks/device_check.sh [OUT_DIR] [--smoke] [--sections a,b] [--budget S]
#
# No package registry there: kat_jax's dependencies that the image lacks (as of 2026-11: grain
# 0.2.18 with array-record 0.8.6 and portpicker 1.6.0, ml-collections 1.1.0, tensorboardX 2.6.5;
# the train section needs the first two) travel as cp312 wheels in .whl/ (git-ignored through
# .git/info/exclude; see the device notes: pip download --no-deps --only-binary=:all:
# --python-version 3.12 ... -d .whl NAME==VERSION); this script installs .whl/ into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
OUT="benchmarks/results/device_check"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then OUT="$1"; shift; fi
if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "warning: the wheels in .whl/ did not install for $PY (built for CPython 3.12)" >&2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' || true
exec timeout 470 "$PY" benchmarks/device_check.py --out "$OUT" "$@"
