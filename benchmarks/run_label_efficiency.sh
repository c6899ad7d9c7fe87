#!/usr/bin/env bash
# The label-efficiency table and plot of BENCHMARKS.md, one command (re-running skips finished runs).
#   bash benchmarks/run_label_efficiency.sh <ssl checkpoint> [data_dir] [output_dir] [datasets...]
# For each dataset, label fraction (1%, 10%, 100%) and seed (0, 1, 2): fine-tune from the SSL checkpoint and from
# scratch with the same budget, select on validation, evaluate on test; then write the table and a PNG plot.
set -euo pipefail
SSL=${1:?pass the SSL checkpoint folder (from run_accuracy.sh: <output_dir>/ssl)}
DATA=${2:-../shared/data/medmnist}
OUT=${3:-outputs/label_efficiency}
shift $(( $# < 3 ? $# : 3 ))
DATASETS=("${@:-breastmnist}")
STEPS=${STEPS:-300}
LAUNCH=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
for name in "${DATASETS[@]}"; do
  for fraction in 0.01 0.1 1.0; do
    for seed in 0 1 2; do
      for init in ssl scratch; do
        run="$OUT/$name/fraction_${fraction}/seed_${seed}/$init"
        [ -f "$run/metrics.json" ] && continue
        init_args=(--model_size small)
        [ "$init" = ssl ] && init_args=(--init_from "$SSL")
        "${LAUNCH[@]}" examples/finetune.py --data_dir "$DATA" --datasets "$name" "${init_args[@]}" \
          --label_fraction "$fraction" --seed "$seed" --max_steps "$STEPS" --checkpointing_steps 50 \
          --learning_rate 5e-4 --report_to none --output_dir "$run"
        "${LAUNCH[@]}" examples/evaluate.py --model "$run" --data_dir "$DATA"
      done
    done
  done
done
python benchmarks/label_efficiency_report.py "$OUT"
