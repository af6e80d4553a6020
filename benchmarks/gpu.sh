#!/usr/bin/env bash
# ResNet-18 on CIFAR-10 on one GPU, about 10 minutes: SimCLR's throughput against the lightly
# loop (images/s and CIFAR-10 epochs/min, bf16 autocast), then short accuracy runs of SimCLR and
# of VICReg, the best new method of the CPU tables (pretrain on the GPU, kNN and linear probe).
# PREPARED, NOT YET RUN: no GPU has been lent.
#
# Here (prepares .gpu/, which git ignores: a CIFAR-10 subset small enough for the device tool's
# 64 MiB, plus wheels of the packages the GPU image lacks: kornia, lightly and its hydra-core):
#   bash benchmarks/gpu.sh prepare
# On the GPU machine (device tool: carry [".gpu"]), from the repository root:
#   bash benchmarks/gpu.sh run $OUT
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "prepare" ]]; then
    mkdir -p .gpu/cifar10 .gpu/wheels
    python - <<'PY'
import numpy as np
src = "../shared/data/cifar10"
train = np.load(f"{src}/train-1.npz")
np.savez_compressed(".gpu/cifar10/train-1.npz", x=train["x"][:12000], y=train["y"][:12000])
test = np.load(f"{src}/test.npz")
np.savez_compressed(".gpu/cifar10/test.npz", x=test["x"][:4000], y=test["y"][:4000])
PY
    pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/wheels \
        lightly==1.6.0 hydra-core omegaconf antlr4-python3-runtime kornia kornia_rs
    du -sh .gpu
    exit 0
fi

OUT=${2:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
python3 -c "import kornia, lightly" 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps .gpu/wheels/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

# 1. Throughput, the same comparison as on the CPU (benchmarks/RESULTS.md), 1 round: ~2 min.
SELFSUP_BENCH_CIFAR=.gpu/cifar10/train-1.npz timeout 200 python3 benchmarks/train_step.py \
    --device cuda --backbones resnet18 --batch 512 --resnet-steps 20 --rounds 1 --workers 12 \
    2>&1 | tee "$OUT/throughput.txt"

# 2. Short accuracy runs on the carried subset (12,000 train / 4,000 test images): ~3 min each.
for method in simclr vicreg; do
    timeout 180 python3 -m selfsup pretrain $method --data npz:.gpu/cifar10 --backbone resnet18 \
        --accelerator gpu --epochs 30 --batch-size 512 --out "$OUT/$method" \
        2>&1 | tail -5 | tee "$OUT/pretrain-$method.txt" || true
    timeout 90 python3 -m selfsup evaluate "$OUT/$method" --fractions 1 --seeds 1 \
        --baselines random --no-kmeans 2>&1 | tail -15 | tee "$OUT/evaluate-$method.txt" || true
done
