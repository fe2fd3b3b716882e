#!/usr/bin/env bash
# One-shot GPU check (pretrain / distill / relabel at 224 px, ResNet-18, fp32 vs bf16), the distill-step
# ratio on the GPU, then the bf16-vs-fp32 precision probe of one distill step. Wheels for packages the GPU image lacks may sit in .whl/ (installed into /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 bench/gpu_check.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
python3 bench/distill_step.py --device cuda --rounds 5 --iters 10 2>&1 | tee -a "${OUT:-/tmp}/gpu_check.log"
python3 bench/precision_probe.py --device cuda --size 224 --classes 100 --steps 50 \
  --out "${OUT:-/tmp}/precision_probe.json" 2>&1 | tee -a "${OUT:-/tmp}/gpu_check.log"
