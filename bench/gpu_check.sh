#!/usr/bin/env bash
# Prepared accelerator check (issue 8 / issue 4): paper-scale bfloat16 train
# steps on one GPU, step time and model FLOP utilisation (bench/gpu_check.py).
#
#   bash bench/gpu_check.sh                  # ResNet-50 48x192x192 batch 8, VNet 128^3 batch 1
#   bash bench/gpu_check.sh --batch 16 --vnet-batch 2
#   bash bench/gpu_check.sh --smoke          # tiny shapes, runs on CPU too
#   bash bench/gpu_check.sh --host-augment   # ResNet step without the on-device rotation + noise
#   bash bench/gpu_check.sh --convs --profile 12  # + every conv with its cuDNN algorithm, top kernels
#
# Needs the project's Python environment with a CUDA build of jaxlib (the
# machine has no network: install before). Exits non-zero if a correctness
# check fails; the whole run is capped at GPU_CHECK_TIMEOUT seconds (480).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SMOKE=0
for arg in "$@"; do [ "$arg" = "--smoke" ] && SMOKE=1; done

echo "# $(date -u '+%Y-%m-%d %H:%M:%S') UTC, host $(hostname), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
fi
BACKEND=$("$PYTHON" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo none)
echo "# python: $PYTHON, jax backend: $BACKEND"
if [ "$BACKEND" != "gpu" ] && [ "$SMOKE" = 0 ]; then
  echo "error: jax sees no GPU (backend '$BACKEND'); install a CUDA jaxlib matching jax" \
       "(pip install 'jax[cuda12]==<same version>') or run with --smoke" >&2
  exit 2
fi
# Let XLA take most of the GPU memory up front (faster allocation), but leave
# room for cuDNN workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PYTHON" bench/gpu_check.py "$@"
