#!/usr/bin/env bash
# ResNet-18 on CIFAR-10 on one GPU, about 10 minutes: SimCLR's throughput against the lightly
# loop (images/s, bf16 autocast), the FLOP-utilisation table of benchmarks/mfu.py on the GPU, then
# SimCLR (ResNet-18, lightly's benchmark settings: batch 512, SGD at 0.06 x B/256, kNN k=200) and
# VICReg for a few minutes each, with wall time, kNN and linear-probe accuracy.
# PREPARED, NOT YET RUN ON A GPU: no GPU has been lent (never quote a GPU number not measured).
#
# Here (prepares .gpu/, which git ignores: a CIFAR-10 subset small enough for the device tool's
# 64 MiB, plus wheels of the packages the GPU image lacks: kornia, lightly and its hydra-core):
#   bash benchmarks/gpu.sh prepare
# On the GPU machine (device tool: carry [".gpu"]), from the repository root:
#   bash benchmarks/gpu.sh run $OUT
# The whole script on this CPU at toy sizes, under a minute (tests/test_gpu_script.py):
#   bash benchmarks/gpu.sh smoke OUT
# The full CIFAR-10 is used where shared/data/cifar10 is in the checkout, else the .gpu subset.
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

MODE=${1:-run}
PY=${PYTHON:-python3}  # the interpreter (the test passes its own)
OUT=${2:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
if [[ "$MODE" == "smoke" ]]; then  # the same steps on the CPU at toy sizes
    DEVICE=cpu ACCEL=cpu BATCH=32 EPOCHS=1 LIMIT=(--limit 64) BUDGET=300 METHODS=simclr
    DATA=npz:${SELFSUP_DATA:-../shared/data}/cifar10
    STEP=(--backbones convnet --batch 32 --steps 1 --resnet-steps 1 --rounds 1 --workers 0)
    MFU=(--quick --methods simclr --steps 1 --batch 16 --gemm 256 --no-gpt --no-profile)
    EVAL=(--limit 64) PROBES=("knn --knn-k 200")  # one probe: the test stays under a minute
else
    DEVICE=cuda ACCEL=gpu BATCH=512 EPOCHS=${EPOCHS:-20} LIMIT=() BUDGET=${BUDGET:-240}
    METHODS="simclr vicreg"
    DATA=npz:.gpu/cifar10
    [[ -d shared/data/cifar10 ]] && DATA=npz:shared/data/cifar10
    STEP=(--backbones resnet18 --batch 512 --resnet-steps 20 --rounds 1 --workers 12)
    MFU=(--backbones resnet18:32,resnet18:96 --methods simclr,vicreg,byol,mae --steps 10 --gemm 8192)
    EVAL=() PROBES=("knn --knn-k 200" linear)
    "$PY" -c "import kornia, lightly" 2>/dev/null ||
        "$PY" -m pip install -q --no-index --no-deps .gpu/wheels/*.whl
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"

# 1. Throughput, the same comparison as on the CPU (benchmarks/RESULTS.md), 1 round: ~2 min.
SELFSUP_BENCH_CIFAR=${DATA#npz:}/train-1.npz timeout 200 "$PY" benchmarks/train_step.py \
    --device $DEVICE "${STEP[@]}" 2>&1 | tee "$OUT/throughput.txt"

# 2. FLOP utilisation of the steps against the device's own GEMM peak: ~1 min.
timeout 200 "$PY" benchmarks/mfu.py --device $DEVICE "${MFU[@]}" 2>&1 | tee "$OUT/mfu.txt"

# 3. Accuracy runs of EPOCHS epochs (default 20), each killed after BUDGET seconds (240) if not
#    done: the encoder of its last whole epoch is evaluated (kNN k=200 as lightly's, linear probe).
for method in $METHODS; do
    options=(--backbone resnet18 --accelerator $ACCEL --epochs $EPOCHS --batch-size $BATCH)
    [[ $method == simclr ]] && options+=(--optimizer sgd)
    start=$(date +%s)
    timeout $BUDGET "$PY" -m selfsup pretrain $method --data $DATA "${LIMIT[@]}" \
        "${options[@]}" --no-online-probe --out "$OUT/$method" 2>&1 | tail -3 | tee "$OUT/pretrain-$method.txt" || true
    echo "$method: $(( $(date +%s) - start )) s of pretraining wall time" | tee -a "$OUT/pretrain-$method.txt"
    for probe in "${PROBES[@]}"; do
        timeout 120 "$PY" -m selfsup evaluate "$OUT/$method" --fractions 1 --seeds 1 \
            --probe $probe --baselines none --no-kmeans "${EVAL[@]}" 2>&1 | tail -6 |
            tee -a "$OUT/evaluate-$method.txt" || true
    done
done
