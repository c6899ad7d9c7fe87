#!/usr/bin/env bash
# The pretext ablation of BENCHMARKS.md, one command (resumable: finished runs are skipped).
#   [SEEDS="0 1 2"] [ARMS="scratch reconstruction ..."] [SSL_EPOCHS=5] [FRACTION=0.1] [STEPS=150] \
#     bash benchmarks/run_pretext_ablation.sh [data_dir] [output_dir]
# Each arm pre-trains the `small` model with one set of pretext tasks on the train images of every local set (2D and
# 3D together, SSL_EPOCHS passes over the pool, seed 0), then fine-tunes it on FRACTION of the labels of one 2D and one
# 3D set (SETS) for STEPS steps per seed, keeping the best-validation checkpoint, and evaluates it on the test split;
# "scratch" fine-tunes the same model from random weights. Table (mean ± sd over SEEDS): <output_dir>/finetune/ablation.md.
set -euo pipefail
DATA=${1:-../shared/data/medmnist}
OUT=${2:-outputs/pretext_ablation}
SETS=${SETS:-"breastmnist organmnist3d"}
SSL_EPOCHS=${SSL_EPOCHS:-5}
FRACTION=${FRACTION:-0.1}
STEPS=${STEPS:-150}
LAUNCH=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
declare -A ARM_FLAGS=(
  [scratch]=""
  [reconstruction]="--ssl_tasks masked_reconstruction"
  [two_masks]="--ssl_tasks masked_reconstruction view_agreement"
  [augmented_views]="--ssl_tasks masked_reconstruction view_agreement --augment"
  [slices]="--ssl_tasks masked_reconstruction view_agreement slice_consistency --augment"
  [slices_norm_pix]="--ssl_tasks masked_reconstruction view_agreement slice_consistency --augment --norm_pix_loss"
  [slices_decoder_2]="--ssl_tasks masked_reconstruction view_agreement slice_consistency --augment --num_decoder_layers 2"
  [two_masks_ratio_0.5]="--ssl_tasks masked_reconstruction view_agreement --mask_ratio 0.5"
  [two_masks_ratio_0.9]="--ssl_tasks masked_reconstruction view_agreement --mask_ratio 0.9"
  [two_masks_unit_2]="--ssl_tasks masked_reconstruction view_agreement --mask_unit 2"
)
ALL="scratch reconstruction two_masks augmented_views slices slices_norm_pix slices_decoder_2 two_masks_ratio_0.5
two_masks_ratio_0.9
two_masks_unit_2"
for arm in ${ARMS:-$ALL}; do
  [ -n "${ARM_FLAGS[$arm]+set}" ] || { echo "unknown arm $arm; choose from: $ALL" >&2; exit 2; }
done
source "$(dirname "$0")/settings.sh"
require_settings "$OUT" settings "ssl_epochs=$SSL_EPOCHS fraction=$FRACTION steps=$STEPS sets=$SETS"
for arm in ${ARMS:-$ALL}; do
  init=(--model_size small)
  if [ "$arm" != scratch ]; then
    ssl="$OUT/ssl/$arm"
    if [ ! -f "$ssl/model.safetensors" ]; then
      # shellcheck disable=SC2086  # the arm's flags are meant to split
      "${LAUNCH[@]}" examples/pretrain.py --data_dir "$DATA" --model_size small --batch_size 64 --seed 0 \
        --num_train_epochs "$SSL_EPOCHS" --learning_rate 5e-4 --checkpointing_steps 100 \
        --resume_from_checkpoint latest --output_dir "$ssl" ${ARM_FLAGS[$arm]}
    fi
    init=(--init_from "$ssl")
  fi
  for seed in ${SEEDS:-0 1 2}; do
    for name in $SETS; do
      run="$OUT/finetune/$arm/$name/seed$seed"
      [ -f "$run/metrics.json" ] && continue
      "${LAUNCH[@]}" examples/finetune.py --data_dir "$DATA" --datasets "$name" "${init[@]}" --batch_size 64 \
        --seed "$seed" --label_fraction "$FRACTION" --max_steps "$STEPS" --checkpointing_steps 25 \
        --label_smoothing 0.1 --report_to none --resume_from_checkpoint latest --output_dir "$run"
      "${LAUNCH[@]}" examples/evaluate.py --model "$run" --data_dir "$DATA"
    done
  done
done
python benchmarks/accuracy_report.py ablation "$OUT/finetune"
