#!/usr/bin/env bash
# Warm restarts of a fine-tuned multi-task model, then their greedy soup (BENCHMARKS.md, the released checkpoint).
# Resumable: each restart resumes from its latest checkpoint (a finished one only re-writes its card); a finished soup
# is kept.
#   [RESTARTS="seed:pool_epochs:learning_rate ..."] [ALPHA=0] bash benchmarks/run_restart_soup.sh <model folder> [data_dir] [output_dir]
# 1. each restart: the released recipe (label smoothing 0.1, stochastic depth 0.1, sets drawn with p ~ size^ALPHA:
#    0 equally often; EMA, best mean validation AUC kept) on the model's own tasks, a short second cosine cycle from <model> with its own
#    seed and peak rate
# 2. the greedy soup of <model> and the restarts on the validation split (examples/average_weights.py --greedy): the
#    best alone, or an average that scores higher; nothing here reads the test split
# 3. the soup on the test split, single view and with the label-safe flips, and on the validation split
set -euo pipefail
MODEL=${1:?usage: bash benchmarks/run_restart_soup.sh <model folder> [data_dir] [output_dir]}
DATA=${2:-../shared/data/medmnist}
OUT=${3:-outputs/restart_soup}
RESTARTS=${RESTARTS:-"3:10:2e-4 4:10:2e-4 5:10:2e-4 6:20:3e-4 7:20:3e-4"}
ALPHA=${ALPHA:-0}
source "$(dirname "$0")/settings.sh"
require_settings "$OUT" settings "model=$MODEL restarts=$RESTARTS$([ "$ALPHA" = 0 ] || echo " alpha=$ALPHA")"
LAUNCH=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
# The model's own tasks, in its order: another set in data_dir would grow a head, and models with other heads cannot
# be averaged.
read -ra TASKS <<< "$(python -c 'import json, sys; print(*json.load(open(sys.argv[1]))["task_order"])' "$MODEL/config.json")"

[ -f "$OUT/soup/validation/metrics.json" ] && exit 0  # the soup is made and evaluated (validation comes last)
candidates=("$MODEL")
for restart in $RESTARTS; do
  IFS=: read -r seed epochs rate <<< "$restart"
  run="$OUT/restart_seed${seed}_${epochs}x_lr${rate}"
  candidates+=("$run")
  "${LAUNCH[@]}" examples/finetune.py --data_dir "$DATA" --datasets "${TASKS[@]}" --init_from "$MODEL" \
    --batch_size 64 --seed "$seed" --num_train_epochs "$epochs" --learning_rate "$rate" --sampling_alpha "$ALPHA" \
    --label_smoothing 0.1 --drop_path_rate 0.1 --checkpointing_steps 250 --resume_from_checkpoint latest \
    --output_dir "$run"
done
python examples/average_weights.py --models "${candidates[@]}" --greedy --data_dir "$DATA" \
  --output_dir "$OUT/soup" --overwrite_output_dir
for flags in "" --test_time_flips "--split validation"; do
  # shellcheck disable=SC2086  # the flag strings are meant to split
  "${LAUNCH[@]}" examples/evaluate.py --model "$OUT/soup" --data_dir "$DATA" $flags
done
