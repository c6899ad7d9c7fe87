#!/usr/bin/env bash
# The tokenizer and recipe ablation of BENCHMARKS.md, one command (resumable: finished runs are skipped).
#   [SEEDS="0 1 2"] [INIT=outputs/ref/ssl] [VARIANT_LIST="default ..."] bash benchmarks/run_recipe_ablation.sh [data_dir] [output_dir]
# Single-task runs (`small` model from scratch, or the INIT checkpoint) on one 2D and one 3D set; each variant
# changes one thing of the default recipe (conv stem, fan-in init, lr 1e-3 with 5% warm-up, label-safe augmentation,
# EMA 0.999, 48 latents, no label smoothing / stochastic depth / layer-wise lr decay). Each run keeps its
# best-validation checkpoint and is then evaluated on the test split; the table (mean ± sd over SEEDS): ablation.md.
set -euo pipefail
DATA=${1:-../shared/data/medmnist}
OUT=${2:-outputs/ablation}
SETS=${SETS:-"breastmnist:40 organmnist3d:15"}  # name:epochs
LAUNCH=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
declare -A VARIANTS=(
  [default]=""
  [linear_tokenizer]="--tokenizer linear"
  [vit_init_0.02]="--weight_init fixed"
  [no_augmentation]="--no-augment"
  [no_ema]="--ema_decay 0"
  [lr_3e-4]="--learning_rate 3e-4"
  [latents_16]="--num_latents 16"
  [latents_32]="--num_latents 32"
  [latents_64]="--num_latents 64"
  [label_smoothing_0.1]="--label_smoothing 0.1"
  [drop_path_0.1]="--drop_path_rate 0.1"
  [mixup_0.2]="--mixup_alpha 0.2"
  [layer_decay_0.75]="--layer_decay 0.75"
  [stem_blocks_1]="--conv_stem_blocks 1"
  [stem_blocks_2]="--conv_stem_blocks 2"
  [stem_blocks_3]="--conv_stem_blocks 3"
  [input_56]="--input_size_2d 56"
  [input_84]="--input_size_2d 84"
)
# Architecture variants need a model built from scratch; layer-wise decay needs a pre-trained INIT.
SCRATCH_ONLY="linear_tokenizer vit_init_0.02 latents_16 latents_32 latents_64 stem_blocks_1 stem_blocks_2 stem_blocks_3"
INIT_ONLY="layer_decay_0.75"
if [ -n "${INIT:-}" ]; then
  ALL="default no_augmentation no_ema lr_3e-4 label_smoothing_0.1 drop_path_0.1 mixup_0.2 input_56 input_84 $INIT_ONLY"
  FORBIDDEN=$SCRATCH_ONLY
  MODEL_FLAGS=(--init_from "$INIT")
else
  ALL="default no_augmentation no_ema lr_3e-4 label_smoothing_0.1 drop_path_0.1 mixup_0.2 input_56 input_84 $SCRATCH_ONLY"
  FORBIDDEN=$INIT_ONLY
  MODEL_FLAGS=(--model_size small)
fi
for variant in ${VARIANT_LIST:-$ALL}; do
  if [[ " $FORBIDDEN " == *" $variant "* ]]; then
    echo "variant $variant does not apply when starting from ${INIT:-scratch}; choose from: $ALL" >&2
    exit 2
  fi
done
# The folder records what the runs started from, so a scratch and a pre-trained ablation never share results.
source "$(dirname "$0")/settings.sh"
require_settings "$OUT" started_from "${INIT:-scratch}"
for seed in ${SEEDS:-0}; do
  for variant in ${VARIANT_LIST:-$ALL}; do
    for entry in $SETS; do
      name=${entry%%:*} epochs=${entry##*:}
      run="$OUT/$variant/$name/seed$seed"
      [ -f "$run/metrics.json" ] && continue
      # shellcheck disable=SC2086  # the variant's flags are meant to split
      "${LAUNCH[@]}" examples/finetune.py --data_dir "$DATA" --datasets "$name" --batch_size 64 \
        --seed "$seed" --num_train_epochs "$epochs" --checkpointing_steps 25 --report_to none \
        --resume_from_checkpoint latest --output_dir "$run" "${MODEL_FLAGS[@]}" ${VARIANTS[$variant]}
      "${LAUNCH[@]}" examples/evaluate.py --model "$run" --data_dir "$DATA"
    done
  done
done
python benchmarks/accuracy_report.py ablation "$OUT"
