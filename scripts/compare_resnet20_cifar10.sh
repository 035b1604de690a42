#!/usr/bin/env bash
# The issue-4 experiment, end to end, with the CLI verbs a user would type:
#   search on a small CIFAR-10 subset (GMPQ and EdMIPS, same BOPs budget), deploy every policy on the whole
#   lossless subset (5,085 train images) with the same fine-tuning budget, evaluate on the 1,017 lossless test
#   images and on the 10,000 JPEG test images, and compare with uniform 4/3-bit, a random policy and float.
#
#   bash scripts/compare_resnet20_cifar10.sh [OUT]
#
# Knobs (environment): SEARCH_SUBSET (1000), SEARCH_EPOCHS (4), FT_EPOCHS (8; the paper uses 40), SEED (0).
# The BOPs budget of every search is that of uniform W3A3. GMPQ is searched at eta = 1 (the recipe) and at
# eta = 100, which makes the attribution term comparable in size to the cross-entropy for this model.
set -euo pipefail
OUT=${1:-runs/compare_resnet20_cifar10}
export GMPQ_DATA=${GMPQ_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
SEARCH_SUBSET=${SEARCH_SUBSET:-1000}
SEARCH_EPOCHS=${SEARCH_EPOCHS:-4}
FT_EPOCHS=${FT_EPOCHS:-8}
SEED=${SEED:-0}
GMPQ=${GMPQ:-gmpq}
W="$GMPQ_DATA/cifar_resnets/resnet20-12fca82f.th"
mkdir -p "$OUT/policies"

# 1. Baseline policies (first conv and classifier stay full precision everywhere, as in the search).
$GMPQ policy uniform --model resnet20 --w-bits 4 --a-bits 4 --out "$OUT/policies/uniform4.json"
$GMPQ policy uniform --model resnet20 --w-bits 3 --a-bits 3 --out "$OUT/policies/uniform3.json"
BUDGET=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['summary']['bops_g'])" "$OUT/policies/uniform3.json")
echo "BOPs budget: $BUDGET G per image (uniform W3A3)"

# 2. Searches on SEARCH_SUBSET training images, with the same BOPs budget (penalty only above it).
for method in gmpq gmpq_eta100 edmips; do
  recipe=recipes/resnet20_cifar10.yaml; [ "$method" = edmips ] && recipe=recipes/resnet20_cifar10_edmips.yaml
  eta=(); [ "$method" = gmpq_eta100 ] && eta=(--set loss.eta=100)
  if [ ! -f "$OUT/search_$method/policy.json" ] || [ ! -f "$OUT/search_$method/done" ]; then
    $GMPQ search --recipe "$recipe" --set out_dir="$OUT/search_$method" --set epochs="$SEARCH_EPOCHS" \
      --set data.train_subset="$SEARCH_SUBSET" --set seed="$SEED" --set progress=false \
      --set loss.complexity_mode=target --set loss.target_gbops="$BUDGET" "${eta[@]}"
    touch "$OUT/search_$method/done"
  fi
  cp "$OUT/search_$method/policy.json" "$OUT/policies/$method.json"
done

# 3. A random policy at the GMPQ policy's BOPs.
GMPQ_BOPS=$(python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['summary']; print(s.get('bops_g') or s['final_bops']/1e9)" "$OUT/policies/gmpq.json")
$GMPQ policy random --model resnet20 --bops "$GMPQ_BOPS" --seed "$SEED" --candidates 2 3 4 --out "$OUT/policies/random.json"

# 4. Same fine-tuning budget for every policy; evaluate on both test sets.
for name in gmpq_eta100 gmpq edmips uniform4 uniform3 random; do
  if [ ! -f "$OUT/ft_$name/result.json" ]; then
    resume=""; [ -f "$OUT/ft_$name/checkpoint.pt" ] && resume="--resume"
    $GMPQ finetune --policy "$OUT/policies/$name.json" --model resnet20 --weights "$W" --data cifar10_npz \
      --also cifar10_jpeg --epochs "$FT_EPOCHS" --out "$OUT/ft_$name" --set seed="$SEED" --set progress=false \
      --set data.batch_size=128 $resume
  fi
done
$GMPQ evaluate --model resnet20 --weights "$W" --data cifar10_npz --also cifar10_jpeg --out "$OUT/float/result.json"

# 5. One table and one plot.
$GMPQ report "$OUT"/ft_{gmpq_eta100,gmpq,edmips,random,uniform3,uniform4}/result.json "$OUT/float/result.json" \
  --out "$OUT/report" --extra top1_before_finetune top1_cifar10_jpeg
