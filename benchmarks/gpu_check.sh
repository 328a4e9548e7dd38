#!/usr/bin/env bash
# The memory plan against torch.cuda.max_memory_allocated at 512 px (SD 1.5- and SD 2.1-shaped random weights, fp16/bf16,
# with and without gradient checkpointing) and transfer latency vs the stock StableDiffusionControlNetPipeline.
# Budget: <= 8 minutes on one H100/H200. Extra arguments go to gpu_check.py (e.g. --cpu --small to try it on a CPU).
#   bash benchmarks/gpu_check.sh                                   # writes benchmarks/results/gpu_check-<host>-<time>.json
#   bash benchmarks/gpu_check.sh --cpu --small --out /tmp/check.json
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="benchmarks/results/gpu_check-$(hostname -s)-$(date +%Y%m%d-%H%M%S).json"
for arg in "$@"; do [[ "$arg" == --out ]] && out=""; done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec timeout 480 python benchmarks/gpu_check.py ${out:+--out "$out"} "$@"
