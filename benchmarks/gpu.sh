#!/usr/bin/env bash
# The GPU figures of benchmarks/results.md, in one run on a machine with one CUDA GPU:
# extraction (pipeline vs model alone, a small and a foundation-sized ViT), training from HDF5
# (loading vs raw h5py, and an ABMIL epoch on the GPU), and the full-scale DINO recipe
# (configs/ssl/dino_vits16.yaml) for a few hundred steps on synthetic slides, with its k-NN check.
# Each stage has a time limit, so one that hangs does not cost the others.
#
#   bash benchmarks/gpu.sh [OUT_DIR]      (default benchmarks/_work/gpu; one .txt per stage)
set -uo pipefail
out=${1:-benchmarks/_work/gpu}
mkdir -p "$out"
workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
export PYTHONUNBUFFERED=1

stage() {  # stage NAME SECONDS COMMAND...: run, log to OUT/NAME.txt, report a failure and go on
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    timeout "$seconds" "$@" 2>&1 | tee "$out/$name.txt" || echo "!! $name failed or timed out"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
stage extract 90 python3 benchmarks/extract.py --device cuda --tiles 4096 --batch-size 256 \
    --num-workers "$workers" --encoder vit_small_patch16_224 vit_large_patch16_224
stage train_loading 45 python3 benchmarks/train_loading.py --train-device cuda
stage pretrain_full 150 python3 benchmarks/pretrain_small.py --work benchmarks/_work/full \
    --config configs/ssl/dino_vits16.yaml --mpp 0.5 --tile-size-px 256 --n-slides 12 \
    --size-px 6144 --max-steps 250 --set "data.num_workers=$workers"
