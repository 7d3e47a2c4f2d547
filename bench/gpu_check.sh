#!/usr/bin/env bash
# The GPU check of issue #14, as one command (under 8 minutes on one H200): AMP vs fp32 training
# throughput and peak memory (demo model, ResNet-50 code at 800 px), DDP scaling 1 -> N GPUs and
# candidates fanned out one per GPU when N > 1. Figures go to stdout and to gpu_check.json (or $1).
# CI never runs it: it needs a GPU (`bench/gpu_check.py --quick` checks the script on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
test -x "$PY" || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 470 "$PY" bench/gpu_check.py --json "${1:-gpu_check.json}"
