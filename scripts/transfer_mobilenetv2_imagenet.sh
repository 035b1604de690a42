#!/usr/bin/env bash
# The cross-dataset experiment of issue 13, end to end: search a MobileNetV2 policy on a small CIFAR-10 subset (its
# search-time variant; one shared teacher = the ImageNet MobileNetV2 fine-tuned on that subset), derive a
# budget-exact policy, deploy it on ImageNet (apply, calibrate, fine-tune with distillation on Imagenette train),
# evaluate 1000-way on imagenet/val_1300 and on Imagenette val, ARD on Imagenette val. GMPQ vs EdMIPS (eta = 0) vs
# uniform vs random at the same BOPs (the uniform W${BUDGET_BITS}A${BUDGET_BITS} cost, first conv and classifier in
# float), SEEDS seeds each; one table with mean and standard deviation, BOPs (both conventions), size and ARD.
#
#   bash scripts/transfer_mobilenetv2_imagenet.sh [OUT]
#
# Knobs (environment), defaults = the full protocol (CPU: days; one GPU: hours):
#   SEEDS ("0 1 2")  BUDGET_BITS (6: uniform W4A4/W5A5 score 0 % / 6.5 % on val_1300 after calibration)
#   CANDIDATES ("4 5 6 8": search and random-policy bit-widths)
#   SEARCH_SUBSET (2000)  SEARCH_BATCH (64)  SEARCH_EPOCHS (10)  SEARCH_STEPS (empty = all; a cap per epoch)
#   SEARCH_LR (empty = the recipe's optim.lr for the network weights; the importance logits keep optim.arch_lr)
#   PRETRAIN_EPOCHS (3: the shared teacher)  PRETRAIN_LR (1e-4)
#   FT_EPOCHS (2)  FT_STEPS (empty = all; a cap per epoch)  FT_BATCH (32)  FT_LR (1e-5)  TRAIN_SIZE (224: fine-tuning
#   crop; evaluation is always 224)  CALIB_IMAGES (256)  VAL_IMAGES (empty = all 1300)  NETTE_IMAGES (empty = all 3925)
#   ARD_IMAGES (256)  THREADS (empty)  DEVICE (auto)  GMPQ (gmpq)  PY (python)
# Each stage is skipped when its output exists (rerun to continue).
set -euo pipefail
OUT=${1:-runs/transfer_mobilenetv2_imagenet}
export GMPQ_DATA=${GMPQ_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
SEEDS=${SEEDS:-"0 1 2"}
BUDGET_BITS=${BUDGET_BITS:-6}
CANDIDATES=${CANDIDATES:-"4 5 6 8"}
SEARCH_SUBSET=${SEARCH_SUBSET:-2000}
SEARCH_BATCH=${SEARCH_BATCH:-64}
SEARCH_EPOCHS=${SEARCH_EPOCHS:-10}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-3}
PRETRAIN_LR=${PRETRAIN_LR:-1e-4}
FT_EPOCHS=${FT_EPOCHS:-2}
FT_BATCH=${FT_BATCH:-32}
FT_LR=${FT_LR:-1e-5}
TRAIN_SIZE=${TRAIN_SIZE:-224}
CALIB_IMAGES=${CALIB_IMAGES:-256}
ARD_IMAGES=${ARD_IMAGES:-256}
DEVICE=${DEVICE:-auto}
GMPQ=${GMPQ:-gmpq}
PY=${PY:-python}
HERE=$(dirname "$0")
opt() { [ -n "${2:-}" ] && echo "$1 $2" || true; }
list() { local IFS=,; echo "[$*]"; }
mkdir -p "$OUT/policies"
common=(--set device="$DEVICE" --set progress=false --set data.seed=0 --set data.train_subset="$SEARCH_SUBSET"
        --set data.batch_size="$SEARCH_BATCH")
[ -n "${THREADS:-}" ] && common+=(--set threads="$THREADS")
[ -n "${SEARCH_STEPS:-}" ] && common+=(--set max_steps_per_epoch="$SEARCH_STEPS")
search_lr=(); [ -n "${SEARCH_LR:-}" ] && search_lr=(--set optim.lr="$SEARCH_LR")

# 1. The budget: uniform W${BUDGET_BITS}A${BUDGET_BITS}, ImageNet model at 224 x 224 (whole-model BOPs).
U="$OUT/policies/uniform$BUDGET_BITS.json"
$GMPQ policy uniform --model mobilenetv2 --w-bits "$BUDGET_BITS" --a-bits "$BUDGET_BITS" --out "$U"
BUDGET=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['summary']['bops_g'])" "$U")
$PY -c "import sys; from gmpq.io import atomic_write_json as w; w(sys.argv[3], {'uniform_reference': sys.argv[1], \
'bops_g': float(sys.argv[2])})" "$U" "$BUDGET" "$OUT/policies/budget.json"
echo "BOPs budget (whole model, uniform W${BUDGET_BITS}A${BUDGET_BITS}): $BUDGET G"

# 2. One teacher for every search: the float search-time model fine-tuned on the (data.seed = 0) subset.
$PY "$HERE/transfer_mobilenetv2_imagenet.py" teacher --recipe recipes/mobilenetv2_cifar10.yaml --out "$OUT/teacher" \
  "${common[@]}" --set pretrain_epochs="$PRETRAIN_EPOCHS" --set pretrain_lr="$PRETRAIN_LR"
TEACHER="$OUT/teacher/teacher/checkpoint.pt"

# 3. All searches first (CIFAR-10 subset, target mode at the budget), each followed by its budget-exact policy (ILP).
for SEED in $SEEDS; do
  for method in gmpq edmips; do
    recipe=recipes/mobilenetv2_cifar10.yaml; [ "$method" = edmips ] && recipe=recipes/mobilenetv2_cifar10_edmips.yaml
    run="$OUT/search_${method}_seed$SEED"
    if [ ! -f "$run/done" ]; then
      resume=""; [ -f "$run/checkpoint.pt" ] && resume="--resume"
      $GMPQ search --recipe "$recipe" "${common[@]}" --set out_dir="$run" --set epochs="$SEARCH_EPOCHS" \
        --set seed="$SEED" --set weights="$TEACHER" --set pretrain_epochs=0 \
        --set hypernet.w_bits="$(list $CANDIDATES)" --set hypernet.a_bits="$(list $CANDIDATES)" \
        --set loss.complexity_mode=target --set loss.target_gbops="$BUDGET" "${search_lr[@]}" $resume
      touch "$run/done"
    fi
    $GMPQ policy derive --search "$run" --gbops "$BUDGET" --min-fraction 0.98 --out "$OUT/policies/${method}_seed$SEED.json"
    $GMPQ policy validate "$OUT/policies/${method}_seed$SEED.json" --model mobilenetv2   # the ImageNet model
  done
  # A random policy at the same BOPs, and the uniform one (no seed of its own; its fine-tune has one).
  $GMPQ policy random --model mobilenetv2 --bops "$BUDGET" --seed "$SEED" --candidates $CANDIDATES \
    --out "$OUT/policies/random_seed$SEED.json"
  cp "$U" "$OUT/policies/uniform_seed$SEED.json"
done

# 4. Deploy every policy on ImageNet with the same fine-tuning budget; ARD on Imagenette val.
for SEED in $SEEDS; do
  for name in gmpq edmips random uniform; do
    d="$OUT/deploy_${name}_seed$SEED"
    if [ ! -f "$d/result.json" ]; then
      $PY "$HERE/transfer_mobilenetv2_imagenet.py" deploy --policy "$OUT/policies/${name}_seed$SEED.json" --out "$d" \
        --ft-epochs "$FT_EPOCHS" --seed "$SEED" --batch-size "$FT_BATCH" --lr "$FT_LR" --train-size "$TRAIN_SIZE" \
        --calib-images "$CALIB_IMAGES" $(opt --max-steps "${FT_STEPS:-}") $(opt --val-images "${VAL_IMAGES:-}") \
        $(opt --nette-images "${NETTE_IMAGES:-}") $(opt --threads "${THREADS:-}")
    fi
    [ -f "$d/attribution/attribution.json" ] || $GMPQ attribution --model mobilenetv2 \
      --weights "$GMPQ_DATA/imagenet/mobilenet_v2_imagenet.pth" --quant-weights "$d/finetune/checkpoint.pt" \
      --policy "$OUT/policies/${name}_seed$SEED.json" --data "imagefolder:$GMPQ_DATA/imagenet/imagenette" \
      --images "$ARD_IMAGES" --grid 4 --out-dir "$d/attribution"
  done
done
[ -f "$OUT/deploy_float/result.json" ] || $PY "$HERE/transfer_mobilenetv2_imagenet.py" deploy --out "$OUT/deploy_float" \
  --calib-images 16 $(opt --val-images "${VAL_IMAGES:-}") $(opt --nette-images "${NETTE_IMAGES:-}") \
  $(opt --threads "${THREADS:-}")
$PY "$HERE/transfer_mobilenetv2_imagenet.py" table "$OUT"/deploy_*_seed* "$OUT/deploy_float" \
  --searches "$OUT"/search_*_seed* --out "$OUT/table.md"
