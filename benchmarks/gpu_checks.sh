#!/usr/bin/env bash
# The GPU checks of one lent session, in priority order, each under its own time limit; results go to $OUT
# (or ./gpu-results). Carried wheels in .whl/ (diffusers, deepspeed, pydantic, av, ...) are installed first:
# see docs/performance.md, "Measuring on a GPU". No Ray is needed.
set -u
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
MODEL=/tmp/anisora-realsize/model
# 1. Generation speed at 5B: eager vs compiled vs batched (issue 16).
timeout "${GEN_LIMIT:-330}" python3 benchmarks/generation_speed.py --build-realsize "$MODEL" --measure-steps 2 \
  --batches 1,2,4,8 --compile-batches 1,4 --budget-s "${GEN_BUDGET:-230}" --json "$OUT/generation_speed.json" \
  2>&1 | grep -v -i "warn" | tee "$OUT/generation_speed.log"
# 2. One LoRA GAPO pair update under ZeRO-2 bf16 (the generate phase only makes the pair: 4 steps).
timeout "${GAPO_LIMIT:-200}" python3 benchmarks/realsize_gpu.py --out /tmp/anisora-realsize --phases generate,lora \
  --steps 4 --gapo-steps 2 --json "$OUT/realsize.json" 2>&1 | grep -v -i "warn" | tail -40 | tee "$OUT/realsize.log"
