#!/usr/bin/env bash
# On a machine with a CUDA GPU (CI never runs this): install the project, check that the
# GPU scan gives the CPU scan's top-10 on 300k x 8 synthetic rows and time both, then run a
# tiny-model ingest on the GPU. Put the numbers it prints in docs/query.md.
#
#   bash bench/gpu_check.sh              # 300k rows x 8 layers
#   ROWS=50000 LAYERS=2 bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-300000}
LAYERS=${LAYERS:-8}
PY=${PYTHON:-python3}

# a venv that sees the machine's CUDA torch; the project installed into it (offline: no deps)
if [ ! -x .venv-gpu/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv-gpu
fi
. .venv-gpu/bin/activate
python -m pip install -q -e . 2>/dev/null || python -m pip install -q --no-deps --no-build-isolation -e .
python - <<'PY'
import torch
assert torch.cuda.is_available(), "this torch sees no CUDA device"
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))
PY
nproc; grep -m1 "model name" /proc/cpuinfo || true

echo "== scan: CPU vs CUDA, ${ROWS} rows x ${LAYERS} layers"
python bench/gpu_check.py scan --rows "$ROWS" --layers "$LAYERS"
echo "== ingest: tiny model on CUDA"
python bench/gpu_check.py ingest
