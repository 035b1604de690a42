#!/usr/bin/env bash
# The cross-dataset experiment of issue 13, end to end: search a MobileNetV2 policy on a small CIFAR-10 subset (its
# search-time variant, teacher = the ImageNet MobileNetV2 fine-tuned on that subset), derive a budget-exact policy,
# deploy it on ImageNet (apply, calibrate, fine-tune with distillation on Imagenette train), evaluate 1000-way on
# imagenet/val_1300 and on Imagenette val. GMPQ vs EdMIPS (eta = 0) vs uniform W4A4 vs random, at the same BOPs
# (the uniform W4A4 cost), SEEDS seeds each; one table with mean and standard deviation, BOPs, size and ARD.
#
#   bash scripts/transfer_mobilenetv2_imagenet.sh [OUT]
#
# Knobs (environment): SEEDS ("0 1 2"), SEARCH_SUBSET (2000), SEARCH_EPOCHS (10), PRETRAIN_EPOCHS (3), FT_EPOCHS (2),
# FT_STEPS (empty = all), VAL_IMAGES (empty = all 1300 / 3925), THREADS (empty), SEARCH_STEPS (empty = all; a cap
# per epoch for a quick run), DEVICE (auto). Each stage is skipped when its output exists (rerun to continue).
# CPU cost at the defaults is days; on one GPU, hours.
set -euo pipefail
OUT=${1:-runs/transfer_mobilenetv2_imagenet}
export GMPQ_DATA=${GMPQ_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
SEEDS=${SEEDS:-"0 1 2"}
SEARCH_SUBSET=${SEARCH_SUBSET:-2000}
SEARCH_EPOCHS=${SEARCH_EPOCHS:-10}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-3}
FT_EPOCHS=${FT_EPOCHS:-2}
DEVICE=${DEVICE:-auto}
GMPQ=${GMPQ:-gmpq}
PY=${PY:-python}
HERE=$(dirname "$0")
opt() { [ -n "${2:-}" ] && echo "$1 $2" || true; }
mkdir -p "$OUT/policies"

# 1. The budget: uniform W4A4 (first conv and classifier in float), ImageNet model at 224 x 224.
$GMPQ policy uniform --model mobilenetv2 --w-bits 4 --a-bits 4 --out "$OUT/policies/uniform4.json"
BUDGET=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['summary']['bops_g'])" "$OUT/policies/uniform4.json")
echo "BOPs budget (whole model, uniform W4A4): $BUDGET G"

for SEED in $SEEDS; do
  # 2. Searches on the CIFAR-10 subset, target mode at the budget; then the budget-exact policy (ILP).
  for method in gmpq edmips; do
    recipe=recipes/mobilenetv2_cifar10.yaml; [ "$method" = edmips ] && recipe=recipes/mobilenetv2_cifar10_edmips.yaml
    run="$OUT/search_${method}_seed$SEED"
    if [ ! -f "$run/done" ]; then
      resume=""; [ -f "$run/checkpoint.pt" ] || [ -d "$run/teacher" ] && resume="--resume"
      steps=(); [ -n "${SEARCH_STEPS:-}" ] && steps=(--set max_steps_per_epoch="$SEARCH_STEPS")
      $GMPQ search --recipe "$recipe" --set out_dir="$run" --set epochs="$SEARCH_EPOCHS" --set seed="$SEED" \
        --set data.seed="$SEED" --set data.train_subset="$SEARCH_SUBSET" --set pretrain_epochs="$PRETRAIN_EPOCHS" \
        --set loss.complexity_mode=target --set loss.target_gbops="$BUDGET" --set device="$DEVICE" \
        --set progress=false "${steps[@]}" $(opt --set ${THREADS:+threads=$THREADS}) $resume
      touch "$run/done"
    fi
    $GMPQ policy derive --search "$run" --gbops "$BUDGET" --min-fraction 0.98 --out "$OUT/policies/${method}_seed$SEED.json"
    $GMPQ policy validate "$OUT/policies/${method}_seed$SEED.json" --model mobilenetv2   # the ImageNet model
  done
  # 3. A random policy at the same BOPs.
  $GMPQ policy random --model mobilenetv2 --bops "$BUDGET" --seed "$SEED" --candidates 2 3 4 5 6 8 \
    --out "$OUT/policies/random_seed$SEED.json"
  cp "$OUT/policies/uniform4.json" "$OUT/policies/uniform4_seed$SEED.json"
  # 4. Deploy every policy on ImageNet with the same fine-tuning budget; ARD on Imagenette val.
  for name in gmpq edmips random uniform4; do
    d="$OUT/deploy_${name}_seed$SEED"
    [ -f "$d/result.json" ] && continue
    $PY "$HERE/transfer_mobilenetv2_imagenet.py" deploy --policy "$OUT/policies/${name}_seed$SEED.json" --out "$d" \
      --ft-epochs "$FT_EPOCHS" --seed "$SEED" $(opt --max-steps "${FT_STEPS:-}") $(opt --val-images "${VAL_IMAGES:-}") \
      $(opt --threads "${THREADS:-}")
    $GMPQ attribution --model mobilenetv2 --weights "$GMPQ_DATA/imagenet/mobilenet_v2_imagenet.pth" \
      --quant-weights "$d/finetune/checkpoint.pt" --policy "$OUT/policies/${name}_seed$SEED.json" \
      --data "imagefolder:$GMPQ_DATA/imagenet/imagenette" --images 256 --out "$d/attribution" || true
  done
done
[ -f "$OUT/deploy_float/result.json" ] || $PY "$HERE/transfer_mobilenetv2_imagenet.py" deploy --out "$OUT/deploy_float" \
  $(opt --val-images "${VAL_IMAGES:-}")
$PY "$HERE/transfer_mobilenetv2_imagenet.py" table "$OUT"/deploy_*_seed* "$OUT/deploy_float" --out "$OUT/table.md"
