#!/usr/bin/env bash
# Every GPU check of the kernel and deployment issues in one call on a lent GPU machine (see
# /work/.library/device): parity suite, kernel benchmark, hot functions, runtime benchmark.
#
#   OUT=/path/to/results bash bench/gpu_session.sh [kernels] [runtime]   # from the repo root
#
# Both parts by default; name one to split the work over two calls (the device tool stops a
# command after 10 minutes).
#
# The machine has torch, triton, timm, onnx(runtime CPU), scikit-learn, pytest-benchmark but no
# network: fastad is installed (editable) without dependencies. The runtime benchmark uses a 1-epoch run with
# a random backbone (`--weights none`): its numbers are speed and parity, not accuracy. Steps go on
# after a failure so that one broken step does not lose the others' results. At most 8 files
# land in $OUT (the device tool's limit); copy them to bench/results/ with the GPU's name.
set -uo pipefail
OUT=${OUT:?set OUT to the results folder}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
step() { echo; echo "=== $* ($(date -u +%T))"; }

step install
$PY -m pip install -q --no-deps --no-build-isolation -e . > /tmp/fastad-install.log 2>&1 \
    || { tail -20 /tmp/fastad-install.log; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

PARTS=${*:-kernels runtime}
has() { [[ " $PARTS " == *" $1 "* ]]; }

if has kernels; then
step "kernel parity suite on the GPU"
$PY -m pytest -q tests/test_kernels_i2corr.py tests/test_kernels_i2corr_production.py \
    tests/test_kernels_feature_distance.py tests/test_i2corr_grad_triton.py 2>&1 | tee "$OUT/kernel_tests.log" | tail -5

# Inference records at every default shape; training records ("mode": "train": forward +
# backward with FOD's losses, time and peak memory) for the authors' eager formulation, the lean
# branch and the Triton kernels at N 1024 / 4096 / 16384 and B 1 / 8 (eager runs out of memory
# at the large shapes: recorded as skipped).
step "kernel benchmark (inference and training)"
$PY bench/bench_kernels.py --train eager lean triton --train-n 1024 4096 16384 --train-batch 1 8 \
    --out "$OUT/kernels.json" 2>&1 | tail -3

step "hot functions"
$PY -m pytest -q bench/test_hot_functions.py --benchmark-only \
    --benchmark-json "$OUT/hot_functions.json" 2>&1 | tail -15

fi

if has runtime; then
step "runtime benchmark (1-epoch random-backbone FOD run)"
$PY -c "from fastad.data.demo import make_demo_dataset as m; m('/tmp/demo_data', overwrite=True)" \
 && fastad train --model fod --data /tmp/demo_data --out /tmp/gpurun --weights none --epochs 1 \
        --device cuda --quiet --overwrite \
 && fastad export --run /tmp/gpurun --format onnx --out /tmp/gpurun.onnx \
 && fastad bench --run /tmp/gpurun --backend torch,torch-lean,triton,onnx --batch 1,8,32 \
        --device cuda --onnx /tmp/gpurun.onnx --quiet \
        --json "$OUT/runtime.json" --md "$OUT/runtime.md" --png "$OUT/runtime.png"
fi
step done
ls -la "$OUT"
