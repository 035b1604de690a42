#!/usr/bin/env bash
# Issue 17: detection transfer with real mAP. SSDLite on the ImageNet-pretrained MobileNetV2, digits detection data.
#   1. the float detector (ImageNet backbone, float policy) trained with recipes/det_ssdlite_mobilenet_v2_digits.yaml;
#   2. the same training budget (same recipe, same steps) with the backbone quantized by each policy of the
#      classification network `mobilenetv2`: uniform W4A4, random policies at the same BOPs, and the GMPQ / EdMIPS
#      policies of the MobileNetV2 search when given (GMPQ_POLICY / EDMIPS_POLICY, e.g. a `gmpq search` policy.json);
#   3. every run for SEEDS seeds; a table of COCO AP / AP50, VOC mAP@0.5, backbone BOPs and size (mean and spread);
#   4. the float detector of seed 0 fine-tuned for 80 COCO categories on coco_tiny train2017 (a few steps) and scored
#      on coco_tiny val2017: a check that real COCO json (91-id scheme, no info/licenses) evaluates (AP is low).
#
#   bash scripts/det_transfer_mobilenetv2.sh [OUT]
#
# Knobs (environment): SEEDS ("0 1 2"), SET (extra --set arguments for every run, e.g. "max_steps_per_epoch=50"),
# GMPQ_POLICY, EDMIPS_POLICY (policy files for mobilenetv2), THREADS (1). CPU cost of the default recipe: about 450
# SSDLite iterations of batch 8 at 192 px per run (see docs/detection.md for the measured seconds per iteration).
set -euo pipefail
OUT=${1:-runs/det_transfer_mobilenetv2}
export GMPQ_DATA=${GMPQ_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
SEEDS=${SEEDS:-0 1 2}
GMPQ=${GMPQ:-gmpq}
RECIPE=recipes/det_ssdlite_mobilenet_v2_digits.yaml
WEIGHTS="$GMPQ_DATA/imagenet/mobilenet_v2_imagenet.pth"
DIGITS=${DIGITS:-runs/digits}
mkdir -p "$OUT/policies"
EXTRA=()
for s in ${SET:-}; do EXTRA+=(--set "$s"); done

# 0. Data (deterministic: an existing folder of the same seed is reused).
[ -f "$DIGITS/annotations/instances_val.json" ] || detr-ptq make-digits-coco --out "$DIGITS" --seed 0

# 1. Policies of the classification network (first conv and classifier at full precision, as in the search).
$GMPQ policy uniform --model mobilenetv2 --w-bits 32 --a-bits 32 --out "$OUT/policies/float.json"
$GMPQ policy uniform --model mobilenetv2 --w-bits 4 --a-bits 4 --out "$OUT/policies/uniform4.json"
BUDGET=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['summary']['bops_g'])" \
    "$OUT/policies/uniform4.json")
echo "BOPs budget: $BUDGET G per 224 x 224 image (mobilenetv2 uniform W4A4)"
POLICIES=(float uniform4)
for seed in $SEEDS; do
    $GMPQ policy random --model mobilenetv2 --bops "$BUDGET" --seed "$seed" --out "$OUT/policies/random_s$seed.json"
done
POLICIES+=(random)
[ -n "${GMPQ_POLICY:-}" ] && cp "$GMPQ_POLICY" "$OUT/policies/gmpq.json" && POLICIES+=(gmpq)
[ -n "${EDMIPS_POLICY:-}" ] && cp "$EDMIPS_POLICY" "$OUT/policies/edmips.json" && POLICIES+=(edmips)

# 2. One training budget for every policy: the recipe's schedule from the ImageNet backbone.
for seed in $SEEDS; do
    for p in "${POLICIES[@]}"; do
        file="$OUT/policies/$p.json"
        [ "$p" = random ] && file="$OUT/policies/random_s$seed.json"
        run="$OUT/${p}_s$seed"
        [ -f "$run/result.json" ] && continue
        $GMPQ finetune-det --recipe "$RECIPE" --policy "$file" --backbone-weights "$WEIGHTS" --out "$run" \
            --set "data.root=$DIGITS" --set seed="$seed" --set progress=false "${EXTRA[@]}"
    done
done

# 3. The table (mean and spread over seeds).
python3 - "$OUT" "${POLICIES[@]}" <<'EOF'
import json, statistics, sys
from pathlib import Path
out, policies = Path(sys.argv[1]), sys.argv[2:]
keys = ("coco_AP", "coco_AP50", "mAP", "mAP_07")
print("| policy | seeds | COCO AP | COCO AP50 | VOC mAP@0.5 (all-point) | VOC mAP@0.5 (11-point) | mapped GBOPs "
      "| backbone GBOPs | backbone MB | s/iter |")
print("|---|---:|---|---|---|---|---:|---:|---:|---:|")
for p in policies:
    rs = [json.loads(f.read_text()) for f in sorted(out.glob(f"{p}_s*/result.json"))]
    if not rs:
        continue
    def cell(k):
        v = [r[k] for r in rs]
        return f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}" if len(v) > 1 else f"{v[0]:.4f}"
    r = rs[0]
    print(f"| {p} | {len(rs)} | " + " | ".join(cell(k) for k in keys) + f" | {r['mapped_bops_g']:.2f} | "
          f"{r['backbone_bops_g']:.2f} | {r['backbone_size_mb']:.2f} | {statistics.mean(x['seconds_per_iter'] for x in rs):.2f} |")
EOF

# 4. Real COCO json: the float detector's recipe on coco_tiny (80 categories, 91-id scheme), a few steps.
if [ ! -f "$OUT/coco_tiny/result.json" ]; then
    $GMPQ finetune-det --recipe "$RECIPE" --policy "$OUT/policies/float.json" --backbone-weights "$WEIGHTS" \
        --data "coco:$GMPQ_DATA/coco_tiny" --out "$OUT/coco_tiny" --set data.train_splits=[train2017] \
        --set data.test_split=val2017 --set detector.size=320 --set epochs=1 --set max_steps_per_epoch=10 \
        --set milestones=[1.0] --set warmup_iters=5 --set eval_before=true --set progress=false "${EXTRA[@]}"
fi
$GMPQ evaluate-det --checkpoint "$OUT/coco_tiny/model_final.pt" --workers 0 --out "$OUT/coco_tiny/eval.json"
