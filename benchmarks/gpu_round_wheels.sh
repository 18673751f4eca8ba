#!/usr/bin/env bash
# Prepare, on the development machine, the wheels `benchmarks/gpu_round.sh` needs on the lent GPU machine (Python
# 3.12, x86_64), in parts of at most 60 MiB (a device call carries 64 MiB): .whl/part1, .whl/part2, ...
# What that machine already has (KINDS.md, read 2026-11-17: torch, transformers, peft, accelerate, pyarrow, pandas,
# aiohttp, grpcio, msgpack, ...) is left out; Ray goes without its Java worker (../shared/tools/strip-ray-wheel.py).
#   bash benchmarks/gpu_round_wheels.sh            # then see gpu_round.sh for the calls
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux2010_x86_64 --platform manylinux1_x86_64"
STRIP=${STRIP:-../shared/tools/strip-ray-wheel.py}
ALL=$(mktemp -d)
trap 'rm -rf "$ALL"' EXIT
# The closure of what the round imports besides the machine's own packages (pip resolves it for that platform).
# shellcheck disable=SC2086
$PY -m pip download -q $PLAT -d "$ALL" "ray[data,train]==2.60.0" diffusers==0.42.1 mlflow==3.17.2 \
  eva-decord==0.6.1 av==18.1.0 hjson pydantic xxhash
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$ALL" deepspeed==0.19.8
HAVE=" absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer
 click cloudpickle contourpy cycler einops filelock flatbuffers fonttools frozenlist fsspec grpcio h11 hf-xet httpcore httpx
 huggingface-hub idna imageio jinja2 joblib kiwisolver lazy-loader markdown markdown-it-py markupsafe matplotlib mdurl
 mpmath msgpack multidict networkx ninja numpy nvidia-ml-py opencv-python-headless packaging pandas peft pillow pip
 portalocker prometheus-client propcache protobuf psutil py-cpuinfo pyarrow pygments pyparsing python-dateutil pyyaml
 regex requests rich safetensors scikit-image scikit-learn scipy setuptools six sympy threadpoolctl tifffile tokenizers
 torch tqdm transformers triton typing-extensions urllib3 uvloop werkzeug wheel wrapt xxhash yarl zipp "
HAVE=" $(echo $HAVE) "  # one line
rm -rf .whl && mkdir -p .whl
part=1 size=0
for whl in $(ls -S "$ALL"/*.whl); do  # largest first
  name=$(basename "$whl" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
  case "$HAVE" in *" $name "*) continue;; esac
  if [ "$name" = ray ]; then $PY "$STRIP" "$whl" "$ALL/stripped" >/dev/null; whl=$(ls "$ALL"/stripped/ray-*.whl); fi
  bytes=$(stat -c %s "$whl")
  if [ $((size + bytes)) -gt $((60 * 1024 * 1024)) ]; then part=$((part + 1)); size=0; fi
  mkdir -p ".whl/part$part" && cp "$whl" ".whl/part$part/" && size=$((size + bytes))
done
du -sh .whl/part* && echo "$part part(s): carry one per device call, the last with the round (gpu_round.sh)"
