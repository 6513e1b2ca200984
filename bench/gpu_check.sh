#!/usr/bin/env bash
# Prepared accelerator check (issue 8 / issue 4): paper-scale bfloat16 train
# steps on one GPU, step time and model FLOP utilisation (bench/gpu_check.py).
#
#   bash bench/gpu_check.sh                  # ResNet-50 48x192x192 batch 8, VNet 128^3 batch 1
#   bash bench/gpu_check.sh --batch 16 --vnet-batch 2
#   bash bench/gpu_check.sh --smoke          # tiny shapes, runs on CPU too
#   bash bench/gpu_check.sh --host-augment   # ResNet step without the on-device rotation + noise
#   bash bench/gpu_check.sh --convs --profile 12  # + every conv with its cuDNN algorithm, top kernels
#   bash bench/gpu_check.sh --vnet-transpose subpixel,dilated  # + VNet with lax.conv_transpose
#   bash bench/gpu_check.sh --no-monai       # project rows only
#
# Every run first times MONAI's same networks in PyTorch (bench/gpu_check_monai.py,
# own process, --monai-timeout 240 s) and prints project/MONAI per model.
# Needs the project's Python environment with a CUDA build of jaxlib and
# PyTorch with CUDA (the machine has no network). MONAI is pure Python: if it
# is not importable, the wheels in bench/wheels/ (bench/requirements-gpu.txt)
# are installed offline into a scratch directory on PYTHONPATH. Exits
# non-zero if a correctness check fails; the whole run is capped at
# GPU_CHECK_TIMEOUT seconds (540).
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
if ! "$PYTHON" -c 'import monai' >/dev/null 2>&1; then
  if ls bench/wheels/*.whl >/dev/null 2>&1; then
    SITE="${TMPDIR:-/tmp}/gpu_check_site"
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" bench/wheels/*.whl \
      && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" \
      && echo "# MONAI installed offline from bench/wheels into $SITE"
  else
    echo "# MONAI not importable and no bench/wheels/*.whl (see bench/requirements-gpu.txt)"
  fi
fi
if [ "$BACKEND" != "gpu" ] && [ "$SMOKE" = 0 ]; then
  echo "error: jax sees no GPU (backend '$BACKEND'); install a CUDA jaxlib matching jax" \
       "(pip install 'jax[cuda12]==<same version>') or run with --smoke" >&2
  exit 2
fi
# Let XLA take most of the GPU memory up front (faster allocation), but leave
# room for cuDNN workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec timeout "${GPU_CHECK_TIMEOUT:-540}" "$PYTHON" bench/gpu_check.py "$@"
