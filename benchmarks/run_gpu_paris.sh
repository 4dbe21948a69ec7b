#!/usr/bin/env bash
# Paris scale on one GPU: scoring 58,270 photos x 58,270 tiles at 360 deg (Wg 64) and 70 deg
# (Wg 13), in fp32 (the fused CuPy kernel where it loads, else torch CUDA) and bf16 (torch CUDA,
# with its fp32 rank check); then the throughput of the VGG16 encoders (ground 128 x 512, polar
# 128 x 512) on torch CUDA (CUDA graphs; fp32, fp16 and bf16 autocast), ONNX Runtime CUDA
# (onnxruntime-gpu) and TensorRT where installed; then one end-to-end run; then the table.
#
#   benchmarks/run_gpu_paris.sh                 # WORK=/big/disk N=20000 ... to change
#
# Needs about 4 GB of disk in WORK (two 1.9 GB feature stores, one at a time) and a GPU with
# 16 GB or more. The VGG16 weights are random: speed does not depend on them.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${N:-58270}"
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$WORK"

for PRECISION in fp32 bf16; do
    for GROUND_WIDTH in 64 13; do
        cvig-engine bench score --n "$N" --m "$N" --wg "$GROUND_WIDTH" --device cuda \
            --precision "$PRECISION" --work-dir "$WORK" --no-progress
    done
done

CHECKPOINT="$WORK/vgg16_360.safetensors"
python - "$CHECKPOINT" <<'PYTHON'
import sys

from cvig_engine.model import build_model, save_checkpoint

save_checkpoint(build_model("vgg16", fov=360.0, vgg_weights=False), sys.argv[1])
PYTHON
EXPORT_OPTIONS=(--precision fp32 --precision fp16 --precision bf16 --quiet)
if python -c "import tensorrt" 2>/dev/null; then
    EXPORT_OPTIONS+=(--tensorrt)
fi
cvig-engine export "$CHECKPOINT" -o "$WORK/vgg16_360" "${EXPORT_OPTIONS[@]}"
for BATCH in 32 128; do
    # every backend available on CUDA: tensorrt, onnxruntime (CUDA provider), torch
    cvig-engine bench encode --model "$WORK/vgg16_360" --device cuda --batch "$BATCH" \
        --precision bf16 --precision fp16 --precision fp32
done

cvig-engine bench e2e --checkpoint "$CHECKPOINT" --pairs 1000 --device cuda --precision bf16 \
    --score-device cuda --no-progress
python benchmarks/summarize.py
