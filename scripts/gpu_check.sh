#!/usr/bin/env bash
# The GPU checks of this project, as one prepared script for a borrowed CUDA machine (no network there).
#
#   bash scripts/gpu_check.sh prepare   # here: wheels into .whl/, the benchmark data into .gpu/ (both gitignored)
#   bash scripts/gpu_check.sh run       # there, from the repository root, with .whl and .gpu carried along
#
# `run` installs the carried wheels over the machine's own packages (into /tmp/site, nothing else touched),
# prints the versions it runs with, runs the CUDA tests (`-m gpu`), then the training benchmark against the
# Trainer + PEFT peers (SDPA attention on both sides) for one round. Logs go to $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pure-Python wheels the machine's image lacks (datasets and its helpers) or holds in older versions than the
# ones this project is tested with (transformers, peft). Its torch, accelerate, tokenizers, safetensors, pyarrow
# and huggingface_hub are used as they are.
WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 transformers==5.24.0 peft==0.21.2)
DATA=../shared/data/alpaca_5000.json

case "${1:-}" in
prepare)
    rm -rf .whl && mkdir -p .whl .gpu
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    cp "$DATA" .gpu/  # a scratch copy for the trip, never committed (.gitignore)
    du -sh .whl .gpu
    echo "now: run(command='bash scripts/gpu_check.sh run', carry=['.whl', '.gpu'], timeout_s=540)"
    ;;
run)
    out=${OUT:-/tmp/gpu-check}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
    python3 -c "import torch, transformers, peft, accelerate, datasets, pyarrow; print('torch', torch.__version__,
'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported(), '| transformers', transformers.__version__,
'peft', peft.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__,
'pyarrow', pyarrow.__version__)" | tee -a "$out/device.txt"
    set +e
    python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
    tests=${PIPESTATUS[0]}
    python3 scripts/bench_train.py --source .gpu/alpaca_5000.json --steps 30 --warmup 3 --repeat 1 \
        --work /tmp/gpu-bench 2>&1 | grep -v "Loading weights" | tee "$out/bench.log"
    bench=${PIPESTATUS[0]}
    cp /tmp/gpu-bench/results.json "$out/" 2>/dev/null
    echo "gpu tests rc=$tests, benchmark rc=$bench"
    exit $(( tests || bench ))
    ;;
*)
    echo "usage: bash scripts/gpu_check.sh prepare|run" >&2
    exit 2
    ;;
esac
