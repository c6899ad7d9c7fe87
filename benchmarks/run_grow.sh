#!/usr/bin/env bash
# Growing a trained checkpoint by a set it never saw (BENCHMARKS.md, "Growing a checkpoint"). Resumable.
#   bash benchmarks/run_grow.sh [data_dir] [output_dir] [ssl_folder]
# 1. reference: multi-task from the SSL pre-training on the 6 local sets without BreastMNIST (14 pool-epochs)
# 2. BreastMNIST added six ways: frozen backbone (--train new_heads), the same plus an Output Adaptformer of its own
#    (--train new_heads_and_output), plus Main Body adapters too (--train new_heads_and_adapters), plus Input
#    Adaptformer adapters (--adapt_input), full fine-tune with
#    the 6 old sets replayed, and from scratch on BreastMNIST alone (same epochs as the frozen routes)
# 3. test-split evaluation of every model on all 7 sets (old tasks before/after, the new task)
# SEEDS="0 1 2" repeats step 2 per seed (folders <route>_seed<N> beyond seed 0); the report gives mean ± sd.
set -euo pipefail
DATA=${1:-../shared/data/medmnist}
OUT=${2:-outputs/grow}
SSL=${3:-outputs/accuracy/ssl}
SEEDS=${SEEDS:-0}
OLD=(pneumoniamnist retinamnist organmnist3d nodulemnist3d fracturemnist3d vesselmnist3d)
NEW=breastmnist
LAUNCH=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)

finetune() {  # output folder, seed, then finetune.py arguments; skipped when finished
  local run=$1 seed=$2
  shift 2
  [ -f "$run/metrics.json" ] && return 0
  "${LAUNCH[@]}" examples/finetune.py --data_dir "$DATA" --batch_size 64 --seed "$seed" --sampling_alpha 0 \
    --resume_from_checkpoint latest --output_dir "$run" "$@"
  "${LAUNCH[@]}" examples/evaluate.py --model "$run" --data_dir "$DATA"
}

finetune "$OUT/reference6" 0 --datasets "${OLD[@]}" --init_from "$SSL" --num_train_epochs 14 --checkpointing_steps 250
GROWN=(--datasets "$NEW" --init_from "$OUT/reference6" --num_train_epochs 40 --checkpointing_steps 100)
for seed in $SEEDS; do
  suffix=$([ "$seed" = 0 ] || echo "_seed$seed")
  finetune "$OUT/frozen$suffix" "$seed" "${GROWN[@]}" --train new_heads
  finetune "$OUT/own_output$suffix" "$seed" "${GROWN[@]}" --train new_heads_and_output
  finetune "$OUT/adapters$suffix" "$seed" "${GROWN[@]}" --train new_heads_and_adapters
  finetune "$OUT/adapters_input$suffix" "$seed" "${GROWN[@]}" --train new_heads_and_adapters --adapt_input
  finetune "$OUT/replay$suffix" "$seed" --datasets "${OLD[@]}" "$NEW" --init_from "$OUT/reference6" \
    --num_train_epochs 3 --checkpointing_steps 100
  finetune "$OUT/scratch$suffix" "$seed" --datasets "$NEW" --model_size small --num_train_epochs 40 \
    --checkpointing_steps 100
done
python benchmarks/grow_report.py "$OUT"
