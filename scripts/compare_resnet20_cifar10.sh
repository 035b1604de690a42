#!/usr/bin/env bash
# ResNet-20 on CIFAR-10, end to end, with the CLI verbs a user would type: search on a small CIFAR-10 subset
# (GMPQ at the measured default eta, and EdMIPS = eta 0) in target mode at the uniform-W3A3 BOPs budget, derive the
# budget-exact policy of each search (gmpq policy derive: same BOPs for every method), deploy every policy on the
# whole lossless subset (5,085 train images) with the same fine-tuning budget, evaluate on the 1,017 lossless test
# images and on the 10,000 JPEG test images, measure the Attribution Rank Distance to the float model, and compare
# with uniform W3A3 / W4A4, a random policy at the same BOPs, and float. SEEDS seeds per method.
#
#   bash scripts/compare_resnet20_cifar10.sh [OUT]
#
# Knobs (environment): SEEDS ("0 1 2"), SEARCH_SUBSET (1000), SEARCH_EPOCHS (4), FT_EPOCHS (8; the paper uses 40),
# METHODS ("gmpq edmips random uniform3 uniform4": the policies deployed; the searches run only for gmpq/edmips, so
# that e.g. METHODS="random uniform3 uniform4" can run beside the searches in a second shell), ATTR_IMAGES (test images of the ARD, 1017 = all lossless test images), THREADS (torch CPU threads per process, 1),
# GMPQ (the command, e.g. ".venv/bin/python -m gmpq"). Each stage is skipped when its output exists (rerun to
# continue). The table with mean and spread over seeds: OUT/report/report.md (gmpq report --group).
set -euo pipefail
OUT=${1:-runs/compare_resnet20_cifar10}
export GMPQ_DATA=${GMPQ_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
SEEDS=${SEEDS:-"0 1 2"}
SEARCH_SUBSET=${SEARCH_SUBSET:-1000}
SEARCH_EPOCHS=${SEARCH_EPOCHS:-4}
FT_EPOCHS=${FT_EPOCHS:-8}
ATTR_IMAGES=${ATTR_IMAGES:-1017}
THREADS=${THREADS:-1}
METHODS=${METHODS:-"gmpq edmips random uniform3 uniform4"}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS  # also for the verbs without a threads setting
GMPQ=${GMPQ:-gmpq}
W="$GMPQ_DATA/cifar_resnets/resnet20-12fca82f.th"
DATA="cifar10_npz:$GMPQ_DATA/cifar10"
mkdir -p "$OUT/policies"

# 1. Baseline policies (first conv and classifier stay full precision everywhere, as in the search).
$GMPQ policy uniform --model resnet20 --w-bits 4 --a-bits 4 --out "$OUT/policies/uniform4.json"
$GMPQ policy uniform --model resnet20 --w-bits 3 --a-bits 3 --out "$OUT/policies/uniform3.json"
BUDGET=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['summary']['bops_g'])" "$OUT/policies/uniform3.json")
echo "BOPs budget: $BUDGET G per image, whole model (uniform W3A3)"

names=()
for SEED in $SEEDS; do
  # 2. Searches on SEARCH_SUBSET training images (penalty only above the budget), then the budget-exact policy.
  for method in gmpq edmips; do
    case " $METHODS " in *" $method "*) ;; *) continue ;; esac
    recipe=recipes/resnet20_cifar10.yaml; [ "$method" = edmips ] && recipe=recipes/resnet20_cifar10_edmips.yaml
    run="$OUT/search_${method}_seed$SEED"
    if [ ! -f "$run/done" ]; then
      resume=""; [ -f "$run/checkpoint.pt" ] && resume="--resume"
      $GMPQ search --recipe "$recipe" --set out_dir="$run" --set epochs="$SEARCH_EPOCHS" \
        --set data.train_subset="$SEARCH_SUBSET" --set seed="$SEED" --set data.seed="$SEED" --set progress=false \
        --set threads="$THREADS" --set eval_every="$SEARCH_EPOCHS" \
        --set loss.complexity_mode=target --set loss.target_gbops="$BUDGET" $resume
      touch "$run/done"
    fi
    $GMPQ policy derive --search "$run" --gbops "$BUDGET" --min-fraction 0.98 --out "$OUT/policies/${method}_seed$SEED.json"
  done
  # 3. A random policy at the same BOPs.
  $GMPQ policy random --model resnet20 --bops "$BUDGET" --seed "$SEED" --candidates 2 3 4 \
    --out "$OUT/policies/random_seed$SEED.json"
  cp "$OUT/policies/uniform3.json" "$OUT/policies/uniform3_seed$SEED.json"
  cp "$OUT/policies/uniform4.json" "$OUT/policies/uniform4_seed$SEED.json"
  # 4. Same fine-tuning budget for every policy; evaluate on both test sets; ARD against the float model.
  for name in $METHODS; do
    ft="$OUT/ft_${name}_seed$SEED"
    names+=("$ft/result.json")
    if [ ! -f "$ft/result.json" ]; then
      resume=""; [ -f "$ft/checkpoint.pt" ] && resume="--resume"
      $GMPQ finetune --policy "$OUT/policies/${name}_seed$SEED.json" --model resnet20 --weights "$W" \
        --data cifar10_npz --also cifar10_jpeg --epochs "$FT_EPOCHS" --out-dir "$ft" --set seed="$SEED" \
        --set progress=false --set data.batch_size=128 --set threads="$THREADS" $resume
    fi
    [ -f "$ft/attribution/attribution.json" ] || $GMPQ attribution --model resnet20 --weights "$W" \
      --quant-weights "$ft/model_final.pt" --data "$DATA" --images "$ATTR_IMAGES" --out-dir "$ft/attribution"
  done
done
[ -f "$OUT/float/result.json" ] || $GMPQ evaluate --model resnet20 --weights "$W" --data cifar10_npz \
  --also cifar10_jpeg --out "$OUT/float/result.json"

# 5. One table (mean ± std over seeds, then every run; BOPs in both conventions, ARD) and one plot.
$GMPQ report "${names[@]}" "$OUT/float/result.json" --out-dir "$OUT/report" --group \
  --extra top1_before_finetune top1_cifar10_jpeg
# 6. The gradient norm each weighted loss term sent to the importance logits (log.jsonl), mean over epochs, and its
#    share of the three; then mean ± std of the shares over seeds.
python3 - "$OUT" "$SEEDS" <<'PY' | tee "$OUT/report/grad_shares.md"
import json, os, statistics, sys
out, seeds = sys.argv[1], sys.argv[2].split()
terms = ("grad_ce", "grad_complexity", "grad_attribution")
print("| search | " + " | ".join(f"{t} (norm)" for t in terms) + " | " + " | ".join(f"{t} share" for t in terms) + " |")
print("|" + "---|" * (1 + 2 * len(terms)))
for method in ("gmpq", "edmips"):
    shares = {t: [] for t in terms}
    for seed in seeds:
        if not os.path.isfile(log := f"{out}/search_{method}_seed{seed}/log.jsonl"):
            continue  # not searched (METHODS)
        logs = [json.loads(l) for l in open(log) if l.strip()]
        norms = {t: statistics.fmean(r.get(t, 0.0) for r in logs) for t in terms}
        total = sum(norms.values())
        for t in terms:
            shares[t].append(norms[t] / total if total > 0 else 0.0)
        print(f"| {method} seed {seed} | " + " | ".join(f"{norms[t]:.3e}" for t in terms) + " | "
              + " | ".join(f"{norms[t] / total:.3f}" if total > 0 else "-" for t in terms) + " |")
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
    if shares["grad_ce"]:
        print(f"| {method} mean ± std | | | | " + " | ".join(f"{statistics.fmean(shares[t]):.3f} ± {sd(shares[t]):.3f}"
                                                            for t in terms) + " |")
PY
