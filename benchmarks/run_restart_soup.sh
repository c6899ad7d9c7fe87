#!/usr/bin/env bash
# Warm restarts of a fine-tuned multi-task model, then their greedy soup (BENCHMARKS.md, "Warm restarts and their
# soup"). Resumable: each restart resumes from its latest checkpoint (a finished one only re-writes its card).
#   [RESTARTS="seed:pool_epochs:learning_rate ..."] bash benchmarks/run_restart_soup.sh <model> [data_dir] [output_dir]
# 1. each restart: the released recipe (label smoothing 0.1, stochastic depth 0.1, every set drawn equally often, EMA,
#    best mean validation AUC kept) for a short second cosine cycle from <model>, with its own seed and peak rate
# 2. the greedy soup of <model> and the restarts on the validation split (examples/average_weights.py --greedy): the
#    best alone, or an average that scores higher; nothing here reads the test split
# 3. the soup on the test split, single view and with the label-safe flips
set -euo pipefail
MODEL=$1
DATA=${2:-../shared/data/medmnist}
OUT=${3:-outputs/restart_soup}
RESTARTS=${RESTARTS:-"3:10:2e-4 4:10:2e-4 5:10:2e-4 6:20:3e-4 7:20:3e-4"}
source "$(dirname "$0")/settings.sh"
require_settings "$OUT" settings "model=$MODEL restarts=$RESTARTS"
LAUNCH=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)

candidates=("$MODEL")
for restart in $RESTARTS; do
  IFS=: read -r seed epochs rate <<< "$restart"
  run="$OUT/restart_seed${seed}_${epochs}x_lr${rate}"
  candidates+=("$run")
  "${LAUNCH[@]}" examples/finetune.py --data_dir "$DATA" --init_from "$MODEL" --batch_size 64 --seed "$seed" \
    --num_train_epochs "$epochs" --learning_rate "$rate" --sampling_alpha 0 --label_smoothing 0.1 \
    --drop_path_rate 0.1 --checkpointing_steps 250 --resume_from_checkpoint latest --output_dir "$run"
done
python examples/average_weights.py --models "${candidates[@]}" --greedy --data_dir "$DATA" \
  --output_dir "$OUT/soup" --overwrite_output_dir
for flips in "" --test_time_flips; do
  # shellcheck disable=SC2086  # an empty flag is no argument
  "${LAUNCH[@]}" examples/evaluate.py --model "$OUT/soup" --data_dir "$DATA" $flips
done
"${LAUNCH[@]}" examples/evaluate.py --model "$OUT/soup" --data_dir "$DATA" --split validation
