#!/usr/bin/env bash
# One prepared run for a single-GPU machine (written for an H200; ~5 minutes): training throughput and MFU of a
# GPT-2-124M shape and a LLaMA-style ~1.2B shape in bf16 with per-block torch.compile, through nomoat's own step.
# Target on one H200: MFU >= 45% for the ~1.2B shape.
#
#   bash benchmarks/gpu.sh              # on the GPU machine, with its python3 and torch
#   bash benchmarks/gpu.sh --dry-run    # anywhere: tiny shapes on CPU, checks that the script runs end to end
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # nomoat from this checkout, no install step needed

missing=$("$PY" - <<'PY'
import importlib.util
need = ["torch", "numpy", "tokenizers", "safetensors", "tomli_w", "tqdm"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [[ -n "$missing" ]]; then
  echo "gpu.sh: missing Python packages: $missing (pip install them, or carry their wheels)" >&2
  exit 2
fi

if [[ "${1:-}" == "--dry-run" ]]; then
  "$PY" benchmarks/gpu_train.py --preset gpt2-124m --dry-run
  "$PY" benchmarks/gpu_train.py --preset llama-1b --dry-run
  exit 0
fi

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
"$PY" benchmarks/gpu_train.py --preset gpt2-124m --batch-size 16 --seq-len 1024 --steps 150 --warmup 15
"$PY" benchmarks/gpu_train.py --preset llama-1b --batch-size 4 --seq-len 4096 --steps 100 --warmup 10
