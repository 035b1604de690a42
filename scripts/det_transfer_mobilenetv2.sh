#!/usr/bin/env bash
# Issue 17: detection transfer with real mAP. SSDLite on the ImageNet-pretrained MobileNetV2, digits detection data.
#   1. the float detector: ImageNet backbone, float policy, recipes/det_ssdlite_mobilenet_v2_digits.yaml
#      (600 steps of batch 8 at 192 px; backbone lr 0.003, extra layers and heads 0.04);
#   2. from that float detector (init_detector), the backbone quantized by each policy of the classification network
#      `mobilenetv2`, activations calibrated, then the same quantization-aware fine-tune for every policy
#      (recipes/det_ssdlite_mobilenet_v2_digits_qat.yaml, 80 steps): the float policy itself (the reference at equal
#      training), the GMPQ and EdMIPS policies of the
#      MobileNetV2 search (POLICIES/{gmpq,edmips}_seed{S}.json), the uniform policy at the same BOPs
#      (POLICIES/budget.json: its "uniform_reference"), and random policies at the same BOPs (same candidate bits);
#   3. every deployment for SEEDS seeds (the search seed S of GMPQ/EdMIPS, the draw of random, the fine-tune seed);
#      a table of COCO AP / AP50, VOC mAP@0.5, backbone BOPs and size at 192 px (mean ± std over seeds);
#   4. (COCO=1) the float recipe with an 80-class head for a few steps on coco_tiny train2017, scored on val2017:
#      a check that real COCO json (91-id scheme, no info/licenses) evaluates (AP is low by design).
#
#   bash scripts/det_transfer_mobilenetv2.sh [OUT]
#
# Knobs (environment): SEEDS ("0 1 2"), POLICIES (runs/transfer_mobilenetv2_imagenet/policies: written by
# scripts/transfer_mobilenetv2_imagenet.sh), CANDIDATES ("4 5 6 8": the search's bits, for the random policies),
# SET (extra --set KEY=VALUE for the deployments, e.g. "max_steps_per_epoch=10"), THREADS (1), COCO (0).
# CPU cost (one thread, shared 2-core machine): the float detector 7.8 CPU-minutes (600 steps + evaluation); each
# deployment 2.5-3 CPU-minutes (calibration, 80 steps, evaluation of 500 images); 5 policies x 3 seeds ~ 45 CPU-min.
# See docs/detection.md.
set -euo pipefail
OUT=${1:-runs/det_transfer}
export GMPQ_DATA=${GMPQ_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
SEEDS=${SEEDS:-0 1 2}
POLICIES=${POLICIES:-runs/transfer_mobilenetv2_imagenet/policies}
CANDIDATES=${CANDIDATES:-4 5 6 8}
GMPQ=${GMPQ:-gmpq}
WEIGHTS="$GMPQ_DATA/imagenet/mobilenet_v2_imagenet.pth"
DIGITS=${DIGITS:-runs/digits}
COMMON=(--set "data.root=$DIGITS" --set "threads=${THREADS:-1}" --set progress=false)
EXTRA=()
for s in ${SET:-}; do EXTRA+=(--set "$s"); done
mkdir -p "$OUT/policies"

# 0. Data (deterministic: an existing folder is reused).
[ -f "$DIGITS/annotations/instances_val.json" ] || detr-ptq make-digits-coco --out "$DIGITS" --seed 0

# 1. The float detector.
$GMPQ policy uniform --model mobilenetv2 --w-bits 32 --a-bits 32 --out "$OUT/policies/float.json"
[ -f "$OUT/float/result.json" ] || $GMPQ finetune-det --recipe recipes/det_ssdlite_mobilenet_v2_digits.yaml \
    --policy "$OUT/policies/float.json" --backbone-weights "$WEIGHTS" --out-dir "$OUT/float" "${COMMON[@]}"

# 2. The policies: searched ones as given, uniform at the budget, random at the same BOPs.
read -r UNIFORM BUDGET < <(python3 -c "import json,sys; b=json.load(open(sys.argv[1])); \
print(b['uniform_reference'], b['bops_g'])" "$POLICIES/budget.json")
echo "budget: $BUDGET GBOPs per 224 x 224 image (mobilenetv2; $UNIFORM)"
cp "$UNIFORM" "$OUT/policies/uniform.json"
for seed in $SEEDS; do
    $GMPQ policy random --model mobilenetv2 --bops "$BUDGET" --seed "$seed" --candidates $CANDIDATES \
        --out "$OUT/policies/random_seed$seed.json"
done

# 3. One fine-tune budget for every policy, from the float detector.
for seed in $SEEDS; do
    for p in float_ft gmpq edmips uniform random; do
        case $p in
            float_ft) file="$OUT/policies/float.json" ;;  # the reference: the float detector, same fine-tune
            gmpq | edmips) file="$POLICIES/${p}_seed$seed.json" ;;
            uniform) file="$OUT/policies/uniform.json" ;;
            random) file="$OUT/policies/random_seed$seed.json" ;;
        esac
        [ -f "$file" ] || { echo "missing $file: $p seed $seed skipped"; continue; }
        run="$OUT/${p}_seed$seed"
        [ -f "$run/result.json" ] && continue
        $GMPQ finetune-det --recipe recipes/det_ssdlite_mobilenet_v2_digits_qat.yaml --policy "$file" \
            --init-detector "$OUT/float/model_final.pt" --out-dir "$run" --set seed="$seed" "${COMMON[@]}" \
            "${EXTRA[@]}"
    done
done

# 4. The table (mean ± std over seeds).
python3 - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
keys = ("coco_AP", "coco_AP50", "mAP")
print("| policy | seeds | COCO AP | COCO AP50 | VOC mAP@0.5 | mapped GBOPs @192 | backbone GBOPs @192 | backbone MB "
      "| wall s / step |")
print("|---|---:|---|---|---|---|---|---|---:|")
for p in ("float", "float_ft", "gmpq", "edmips", "uniform", "random"):
    rs = [json.loads(f.read_text()) for f in sorted(out.glob(f"{p}*/result.json")) if f.parent.name in
          (p, *(f"{p}_seed{s}" for s in range(100)))]
    if not rs:
        continue
    def cell(k, fmt="{:.3f}"):
        v = [r[k] for r in rs]
        return fmt.format(statistics.mean(v)) + (" ± " + fmt.format(statistics.stdev(v)) if len(v) > 1 else "")
    print(f"| {p} | {len(rs)} | " + " | ".join(cell(k) for k in keys) + f" | {cell('mapped_bops_g', '{:.2f}')} | "
          f"{cell('backbone_bops_g', '{:.2f}')} | {cell('backbone_size_mb', '{:.2f}')} | "
          f"{statistics.mean(r['seconds_per_iter'] for r in rs):.2f} |")
EOF

# 5. Real COCO json (optional): the float recipe on coco_tiny (80 categories, 91-id scheme), a few steps.
if [ "${COCO:-0}" = 1 ] && [ ! -f "$OUT/coco_tiny/result.json" ]; then
    $GMPQ finetune-det --recipe recipes/det_ssdlite_mobilenet_v2_digits.yaml --policy "$OUT/policies/float.json" \
        --backbone-weights "$WEIGHTS" --data "coco:$GMPQ_DATA/coco_tiny" --out-dir "$OUT/coco_tiny" \
        --set data.train_splits=[train2017] --set data.test_split=val2017 --set detector.size=320 --set epochs=1 \
        --set max_steps_per_epoch=4 --set warmup_iters=2 --set eval_before=true --set progress=false
    $GMPQ evaluate-det --checkpoint "$OUT/coco_tiny/model_final.pt" --workers 0 --out "$OUT/coco_tiny/eval.json"
fi
