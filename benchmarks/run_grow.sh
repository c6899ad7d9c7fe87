#!/usr/bin/env bash
# Growing a trained checkpoint by a set it never saw (BENCHMARKS.md, "Growing a checkpoint"). Resumable.
#   bash benchmarks/run_grow.sh [data_dir] [output_dir] [ssl_folder]
# 1. reference: multi-task from the SSL pre-training on the 6 local sets without BreastMNIST (14 pool-epochs)
# 2. BreastMNIST added six ways: frozen backbone (--train new_heads), the same plus an Output Adaptformer of its own
#    (--train new_heads_and_output), plus Main Body adapters too (--train new_heads_and_adapters), plus Input
#    Adaptformer adapters (--adapt_input), full fine-tune with
#    the 6 old sets replayed, and from scratch on BreastMNIST alone (same epochs as the frozen routes)
# 3. test-split evaluation of every model on all 7 sets (old tasks before/after, the new task)
set -euo pipefail
DATA=${1:-../shared/data/medmnist}
OUT=${2:-outputs/grow}
SSL=${3:-outputs/accuracy/ssl}
OLD=(pneumoniamnist retinamnist organmnist3d nodulemnist3d fracturemnist3d vesselmnist3d)
NEW=breastmnist
COMMON=(--data_dir "$DATA" --batch_size 64 --seed 0 --sampling_alpha 0 --resume_from_checkpoint latest)
LAUNCH=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)

finetune() {  # output folder, then finetune.py arguments; skipped when finished
  local run=$1
  shift
  [ -f "$run/metrics.json" ] && return 0
  "${LAUNCH[@]}" examples/finetune.py "${COMMON[@]}" --output_dir "$run" "$@"
  "${LAUNCH[@]}" examples/evaluate.py --model "$run" --data_dir "$DATA"
}

finetune "$OUT/reference6" --datasets "${OLD[@]}" --init_from "$SSL" --num_train_epochs 14 --checkpointing_steps 250
finetune "$OUT/frozen" --datasets "$NEW" --init_from "$OUT/reference6" --train new_heads --num_train_epochs 40 \
  --checkpointing_steps 100
finetune "$OUT/own_output" --datasets "$NEW" --init_from "$OUT/reference6" --train new_heads_and_output \
  --num_train_epochs 40 --checkpointing_steps 100
finetune "$OUT/adapters" --datasets "$NEW" --init_from "$OUT/reference6" --train new_heads_and_adapters \
  --num_train_epochs 40 --checkpointing_steps 100
finetune "$OUT/adapters_input" --datasets "$NEW" --init_from "$OUT/reference6" --train new_heads_and_adapters \
  --adapt_input --num_train_epochs 40 --checkpointing_steps 100
finetune "$OUT/replay" --datasets "${OLD[@]}" "$NEW" --init_from "$OUT/reference6" --num_train_epochs 3 \
  --checkpointing_steps 100
finetune "$OUT/scratch" --datasets "$NEW" --model_size small --num_train_epochs 40 --checkpointing_steps 100
python benchmarks/grow_report.py "$OUT"
