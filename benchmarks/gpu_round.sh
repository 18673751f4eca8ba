#!/usr/bin/env bash
# One alignment round of configs/cogvideox5b_i2v_1gpu.yaml through Ray on the lent GPU machine, at real model sizes
# with random weights (benchmarks/gpu_round.py). Results go to $OUT (or ./gpu-results): gpu_round.json (phase wall
# times, peak GPU memory per process, the GPU's busy fraction), gpu_round.log, the Ray driver log's tail.
#
# Prepare here:  bash benchmarks/gpu_round_wheels.sh     (.whl/part1..3, each under 60 MiB: Ray, av + decord + mlflow,
#                                                          the rest; what the machine already has is left out)
# Then one device call per part, back to back (a warm machine keeps /tmp/site), the last one running the round:
#   run(carry=[".whl/part1"], command="PART=1 bash benchmarks/gpu_round.sh", timeout_s=120)
#   run(carry=[".whl/part2"], command="PART=2 bash benchmarks/gpu_round.sh", timeout_s=120)
#   run(carry=[".whl/part3"], command="PART=3 ROUND=1 bash benchmarks/gpu_round.sh", timeout_s=600)
# ROUND_ARGS adds gpu_round.py arguments (defaults: 2 prompts x 2 candidates, 4 denoising steps, 1 GAPO update).
set -u
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
SITE=/tmp/site
if [ -n "${PART:-}" ] && ls .whl/part"$PART"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/part"$PART"/*.whl 2>&1 | grep -v -i "warning" | tail -3
  echo "part $PART installed into $SITE ($(ls "$SITE" | wc -l) entries)"
fi
[ "${ROUND:-0}" = 1 ] || exit 0
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import ray, diffusers, deepspeed, mlflow, av, decord; print('imports ok: ray', ray.__version__)" || exit 1
timeout "${LIMIT:-540}" python3 benchmarks/gpu_round.py --out /tmp/anisora-round --json "$OUT/gpu_round.json" \
  --timeout "${ALIGN_LIMIT:-480}" ${ROUND_ARGS:-} 2>&1 | grep -v -i -E "warn|resource_tracker" > "$OUT/gpu_round.log"
code=${PIPESTATUS[0]}
tail -40 "$OUT/gpu_round.log"
tail -200 /tmp/anisora-round/run/align/logs/ray-driver.log > "$OUT/ray-driver-tail.log" 2>/dev/null
df -h /tmp | tail -1
exit "$code"
