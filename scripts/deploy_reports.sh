#!/usr/bin/env bash
# Deploy reports of issue 19: ResNet-20 (CIFAR-10) with uniform W8A8, W7A8 and a mixed policy, MobileNetV2
# (ImageNet) with uniform W8A8 and W7A8. Post-training quantization from the float checkpoints in $GMPQ_DATA,
# integer ONNX, onnxruntime latency against the float ONNX on one thread (interleaved rounds, medians).
# The benchmark runs time both integer output modes (--int-outputs float: exact, default; uint8: requantized) in
# the same rounds as the float model. About 20 CPU-minutes alone (MobileNetV2 on all 1,300 images: most of it).
#   GMPQ_DATA=../shared/data bash scripts/deploy_reports.sh [OUT=runs/deploy] [ROUNDS=15] [MBV2_TEST=1300]
set -euo pipefail
OUT=${OUT:-runs/deploy}
ROUNDS=${ROUNDS:-15}
MBV2_TEST=${MBV2_TEST:-1300}
BIN=${BIN:-.venv/bin}
mkdir -p "$OUT"
R20="$GMPQ_DATA/cifar_resnets/resnet20-12fca82f.th"
$BIN/gmpq policy uniform --model resnet20 --w-bits 8 --a-bits 8 --out "$OUT/r20_w8a8.json"
# 7-bit weights: codes fit onnxruntime's fast u8s8 kernels on CPUs without AVX-VNNI (see docs/deploy.md)
$BIN/gmpq policy uniform --model resnet20 --w-bits 7 --a-bits 8 --out "$OUT/r20_w7a8.json"
# a mixed policy: weights and activations 4..8 bits drawn at random (seed 0) at the BOPs of uniform W6A6
$BIN/gmpq policy random --model resnet20 --bops 1.8975 --candidates 4 5 6 7 8 --seed 0 --out "$OUT/r20_mixed.json"
for p in w8a8 w7a8 mixed; do
  $BIN/gmpq export --model resnet20 --weights "$R20" --policy "$OUT/r20_$p.json" --calib-data cifar10_npz \
    --out "$OUT/r20_$p/resnet20.gmpq" --latency-rounds "$ROUNDS" | tee "$OUT/r20_$p.txt"
done
# float ONNX vs integer ONNX with exact float outputs vs integer ONNX requantized to uint8, side by side
$BIN/python benchmarks/bench_deploy.py --cases resnet20_w8a8 resnet20_w7a8 --rounds "$ROUNDS" \
  --out "$OUT/bench_r20" | tee "$OUT/resnet20_modes.txt"
# MobileNetV2: the registered datasets have no 1000-class ImageNet split here (Imagenette is a 10-class folder), so
# the benchmark calibrates on Imagenette train images and scores val_1300 (labels.txt) itself.
$BIN/python benchmarks/bench_deploy.py --cases mobilenetv2_w8a8 mobilenetv2_w7a8 --rounds "$ROUNDS" \
  --test-images "$MBV2_TEST" --out "$OUT/bench" | tee "$OUT/mobilenetv2.txt"
