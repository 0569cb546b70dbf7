#!/usr/bin/env bash
# GPU path check (issue 3): bf16 mixed precision, a 4-bit NF4 teacher and FSDP on ~0.5B-scale
# models built from a config, in one run of a few minutes on a single H100/H200; prints a table
# (step time, rollout and train tokens/s, peak GPU memory). Without a GPU: a dry run on CPU.
#   bash benchmarks/gpu_check.sh            # GPU: appends the table to benchmarks/RESULTS.md
#   bash benchmarks/gpu_check.sh --dry-run  # CPU: checks the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "${1:-}" = "--dry-run" ] || ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  exec python benchmarks/gpu_check.py --dry-run
fi
exec timeout 480 python benchmarks/gpu_check.py --steps 8
