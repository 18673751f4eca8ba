#!/usr/bin/env bash
# The GPU checks a lent session should run, in priority order, each under its own time limit; results go
# to $OUT (or ./gpu-results). No Ray. Prepare here, then carry `.whl` and `gpu-pair` (results go to
# docs/performance.md and docs/measurements/):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl diffusers hjson pydantic \
#     pydantic_core annotated_types typing_inspection importlib_metadata decord   (versions as in the venv)
#   DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -w .whl deepspeed
#   python benchmarks/realsize_gpu.py --write-pair gpu-pair
# (av is 36 MB: beyond the 64 MiB a call carries with the rest, hence the pair made here.)
# CHECKS picks a subset, e.g. CHECKS="refresh zero3" (default: all, in this order); REFRESH_ARGS adds arguments
# to refresh_gpu.py (e.g. "--host-runs 0 --sweep 1024:2,2048:2"). The rollout-speed checks (issue 29) need the
# diffusers, torchao and pydantic wheels only: CHECKS="variants fp8" (docs/performance.md). The checks run in the
# order of this file: variants, then the FP8 tests (their compiled case took > 150 s on a fresh H200), then the rest.
set -u
CHECKS=${CHECKS:-"variants fp8 floor refresh lora compile zero3 generation"}
# Each rollout setting on a replica of its own, in priority order (what is left after VARIANTS_BUDGET s is skipped).
# fc (FasterCache) first: a fixed schedule, so its saving on random-init weights is what real weights get (First
# Block Cache's depends on the weights). On 2026-12-04 three compiled cuDNN variants failed only after load and
# compile, and FP8 + compile did not finish in ~140 s (docs/performance.md): those come last.
# FAMILY=wan_i2v measures Wan2.2-TI2V-5B instead (configs/wan22_ti2v5b.yaml; FasterCache refuses Wan, whose CFG
# branches are two calls: its default VARIANTS are TaylorSeer's and d8, AniSora V3.x's step-distilled protocol, 8 steps
# without CFG, timed on the base model's random weights; last, d8+off: generator.offload's cost per call).
# EXACT_CHECK=1: each cached variant also renders its video with every step computed (the cache audit's reference,
# eval/cache_audit.py): its seconds, and that it is the config's video (bit for bit uncompiled). One video more each.
FAMILY=${FAMILY:-cogvideox_i2v}
if [ "$FAMILY" = wan_i2v ]; then VARIANTS=${VARIANTS:-"d8 compile+d8 ts compile+ts tsb compile+tsb compile d8+off"}
else VARIANTS=${VARIANTS:-"fc compile+fc fbc0.1 fp8+fc compile fp8+compile+fc flash cudnn"}; fi
variant_args() {  # NAME=a+b+... -> --variant NAME=generator.KEY=VALUE,...
  for v in $1; do
    local name=${v%%=*} parts=${v#*=} settings=""
    for p in ${parts//+/ }; do
      case $p in
        fp8) settings+="generator.quantize=fp8,";;
        compile) settings+="generator.compile=true,";;
        fbc*) settings+="generator.cache.kind=first_block,generator.cache.threshold=${p#fbc},";;
        fc) settings+="generator.cache.kind=faster_cache,";;
        ts) settings+="generator.cache.kind=taylorseer,";;  # TaylorSeer on attention (any family: Wan's too)
        tsb) settings+="generator.cache.kind=taylorseer,generator.cache.predict=blocks,";;  # on whole blocks
        off) settings+="generator.offload=model,";;  # components on the host, each on the GPU while it runs
        d[0-9]*) settings+="generator.num_inference_steps=${p#d},generator.guidance_scale=1,generator.flow_shift=5,";;  # a step-distilled protocol (AniSora V3.x: d8)
        *) settings+="generator.attention_backend=$p,";;
      esac
    done
    printf -- '--variant %s=%s ' "$name" "${settings%,}"
  done
}
want() { case " $CHECKS " in *" $1 "*) return 0;; *) return 1;; esac; }
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
RS=/tmp/anisora-realsize
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
# 0. Rollout settings at 49x480x720, one video each at 50 steps against eager bf16: seconds, memory, drift (issue 29).
#    With DEADLINE_S (seconds since this script started), the limits fit in what is left: ~45 s of model build, and
#    a variant started just inside the budget may take ~100 s more.
VARIANTS_LIMIT=${VARIANTS_LIMIT:-$(( ${DEADLINE_S:-600} - SECONDS - 10 ))}
MODEL=$RS/model; [ "$FAMILY" = cogvideox_i2v ] || MODEL=$RS/model-$FAMILY  # realsize_gpu.py reuses $RS/model (CogVideoX)
want variants && timeout "$VARIANTS_LIMIT" python3 benchmarks/generation_speed.py --family "$FAMILY" --build-realsize $MODEL \
  --batches "" --compile-batches "" ${EXACT_CHECK:+--exact-check} --budget-s "${VARIANTS_BUDGET:-$(( VARIANTS_LIMIT - 150 ))}" $(variant_args "$VARIANTS") \
  --json "$OUT/generation_variants.json" 2>&1 | grep -v "Writing model" | tee "$OUT/generation_variants.log" | grep -v -i warn
# 0. FP8 replicas (generator.quantize: fp8) on the GPU: FP8 block linears, frames near bf16's, full and LoRA refreshes
#    landing in the quantized replica, compiled too (skipped on the CPU); and offloaded replicas (generator.offload:
#    model): components on the host between calls, a lower peak, nothing recompiled (~30 s).
want fp8 && timeout "${FP8_LIMIT:-300}" python3 -m pytest -v -p no:cacheprovider -rs --durations=5 \
  tests/test_generation_fp8.py tests/test_generation_offload.py 2>&1 | tee "$OUT/fp8_tests.log" | grep -E "PASS|FAIL|SKIP|ERROR|passed|failed"
# 0. The host refresh's data path on this machine's cores (no GPU, no Ray): 2 cores here put it at ~50% of memcpy.
for run in $(seq "${FLOOR_RUNS:-2}"); do  # fresh runs, for the spread
  want floor && timeout "${FLOOR_LIMIT:-120}" python3 benchmarks/refresh_floor.py 2>&1 | grep -v -i -E "warn|resource_tracker" \
    | tee -a "$OUT/refresh_floor.log"
done
# 0. Weight refresh through CUDA IPC (9.5 GB of bf16 to 2 replica processes on the GPU) vs a D2D memcpy.
want refresh && timeout "${REFRESH_LIMIT:-150}" python3 benchmarks/refresh_gpu.py ${REFRESH_ARGS:-} --json "$OUT/refresh_gpu.json" 2>&1 \
  | tee "$OUT/refresh_gpu.log" | grep -v -i -E "warn|resource_tracker|KeyError|cache\[rtype\]"
# 1. GAPO at 5B: LoRA eager vs gapo.compile, then ZeRO-3 full fine-tuning with the gathered export.
want lora && timeout "${LORA_LIMIT:-240}" python3 benchmarks/realsize_gpu.py --out $RS --pair gpu-pair/pair.json --phases lora \
  --gapo-compile "" --json "$OUT/realsize_lora.json" 2>&1 | grep -v -i warn | tail -8 | tee "$OUT/realsize_lora.log"
want compile && timeout "${COMPILE_LIMIT:-200}" python3 benchmarks/realsize_gpu.py --out $RS --pair gpu-pair/pair.json --phases lora \
  --gapo-compile lora --json "$OUT/realsize_lora_compiled.json" 2>&1 | grep -v -i warn | tail -8 | tee "$OUT/realsize_lora_compiled.log"
want zero3 && timeout "${ZERO3_LIMIT:-300}" python3 benchmarks/realsize_gpu.py --out $RS --pair gpu-pair/pair.json --phases zero3 \
  --json "$OUT/realsize_zero3.json" 2>&1 | tee "$OUT/realsize_zero3.log" | grep -v -i warn | tail -25
# 2. Generation speed at 5B, a second fresh run for the spread (the first: docs/measurements/).
want generation && timeout "${GEN_LIMIT:-330}" python3 benchmarks/generation_speed.py --build-realsize $RS/model --measure-steps 2 \
  --batches 1,4 --compile-batches 1,4 --budget-s 200 --json "$OUT/generation_speed.json" 2>&1 | grep -v -i warn \
  | tee "$OUT/generation_speed.log"
