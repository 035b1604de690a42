#!/usr/bin/env bash
# Q-DETR QAT experiments on the reference detector (issue 8): the module ablation at W4/W3 and the distillation
# ablation (baseline, + DA, + FQM, + DA + FQM) at W4/W3/W2, activations at the weight bits, attention operands
# at 8 bits, first conv 8 bits, heads full precision. Every run: EPOCHS x STEPS steps of batch 8 on one CPU thread.
#   detr-ptq make-digits-coco --out runs/digits --seed 0
#   bash scripts/qat_experiments.sh            # JOBS runs in parallel (default 2), finished runs are skipped
#   detr-ptq qat-report runs/qat --out runs/qat/tables.md
set -euo pipefail
OUT=${OUT:-runs/qat}
EPOCHS=${EPOCHS:-3}
STEPS=${STEPS:-250}
JOBS=${JOBS:-2}
BIN=${BIN:-.venv/bin/detr-ptq}
mkdir -p "$OUT"

jobs_list() {
  local parts=(backbone backbone,encoder backbone,encoder,decoder_attn)
  for b in 4 3; do
    for i in 0 1 2; do
      echo "abl_w${b}_p$((i + 1)) bits=$b-$b-8 align=false fqm=false quantize=[${parts[$i]}]"
    done
  done
  for b in 4 3 2; do
    echo "w${b}_base bits=$b-$b-8 align=false fqm=false"
    echo "w${b}_da bits=$b-$b-8 align=true fqm=false"
    echo "w${b}_fqm bits=$b-$b-8 align=false fqm=true"
    echo "w${b}_da_fqm bits=$b-$b-8 align=true fqm=true"
  done
}

run_one() {
  local name=$1; shift
  [[ -f "$OUT/$name/result.json" ]] && { echo "skip $name (done)"; return 0; }
  local sets=()
  for kv in "$@"; do sets+=(--set "$kv"); done
  local resume=()
  [[ -f "$OUT/$name/checkpoint.pth" ]] && resume=(--resume)
  echo "run $name $*"
  "$BIN" qat --recipe recipes/qat_detr_tiny.yaml --set "out_dir=$OUT/$name" --set "epochs=$EPOCHS" \
    --set "steps_per_epoch=$STEPS" --set progress=false "${sets[@]}" "${resume[@]}" > "$OUT/$name.log" 2>&1 \
    || { echo "FAILED $name (see $OUT/$name.log)"; return 1; }
  tail -n 1 "$OUT/$name.log"
}
export -f run_one
export OUT EPOCHS STEPS BIN

jobs_list | xargs -P "$JOBS" -L 1 bash -c 'run_one "$@"' _
"$BIN" qat-report "$OUT" --out "$OUT/tables.md"
