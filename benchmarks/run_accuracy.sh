#!/usr/bin/env bash
# The accuracy table of BENCHMARKS.md, one command (resumable: re-running continues every stage where it stopped).
#   [SSL_EPOCHS=3] [FINETUNE_EPOCHS=56] [ALPHA=0] [FINETUNE_FLAGS="..."] [MODEL_FLAGS="..."] [SEED=0] \
#     bash benchmarks/run_accuracy.sh [data_dir] [output_dir]
# The defaults are the released checkpoint's recipe (56 pool-epochs, label smoothing 0.1, stochastic depth 0.1) and
# architecture (`small`); MODEL_FLAGS changes the architecture of every model built here (e.g. "--conv_stem_blocks 1").
# 1. SSL pre-training on the train images of every set in data_dir (2D and 3D together, labels unused)
# 2. multi-task fine-tuning from it, and the same from scratch with the same budget (what SSL adds); the SSL run is
#    the released checkpoint (checkpoints/medformer-small-medmnist)
# 3. single-task from scratch on each set, with the batches that set gets in the multi-task run (what sharing adds)
# 4. test-split evaluation of every model (checkpoints chosen on validation only; the SSL run also with test-time
#    flips), then the table (accuracy.md)
set -euo pipefail
DATA=${1:-../shared/data/medmnist}
OUT=${2:-outputs/accuracy}
SSL_EPOCHS=${SSL_EPOCHS:-3}
FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-56}
ALPHA=${ALPHA:-0}
FINETUNE_FLAGS=${FINETUNE_FLAGS-"--label_smoothing 0.1 --drop_path_rate 0.1"}  # for every fine-tuning run ("" for none)
MODEL_FLAGS=${MODEL_FLAGS:-}  # for every model built from scratch (the SSL one, the scratch runs); also --input_size_2d
SEED=${SEED:-0}  # of every run (initialisation, batches, augmentation); another seed of the same recipe
source "$(dirname "$0")/settings.sh"
require_settings "$OUT" settings "ssl_epochs=$SSL_EPOCHS finetune_epochs=$FINETUNE_EPOCHS alpha=$ALPHA \
finetune_flags=$FINETUNE_FLAGS model_flags=$MODEL_FLAGS$([ "$SEED" = 0 ] || echo " seed=$SEED")"
COMMON=(--data_dir "$DATA" --batch_size 64 --seed "$SEED" --resume_from_checkpoint latest)
LAUNCH=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)

# shellcheck disable=SC2086  # the flag strings are meant to split
"${LAUNCH[@]}" examples/pretrain.py "${COMMON[@]}" --model_size small $MODEL_FLAGS --num_train_epochs "$SSL_EPOCHS" \
  --learning_rate 5e-4 --checkpointing_steps 100 --output_dir "$OUT/ssl"
for init in ssl scratch; do
  run="$OUT/multitask_$init"
  [ -f "$run/metrics.json" ] && continue
  read -ra init_args <<< "--model_size small $MODEL_FLAGS"  # the architecture from scratch; a checkpoint has its own
  [ "$init" = ssl ] && init_args=(--init_from "$OUT/ssl")
  "${LAUNCH[@]}" examples/finetune.py "${COMMON[@]}" "${init_args[@]}" --num_train_epochs "$FINETUNE_EPOCHS" \
    --sampling_alpha "$ALPHA" --checkpointing_steps 250 --output_dir "$run" $FINETUNE_FLAGS
  "${LAUNCH[@]}" examples/evaluate.py --model "$run" --data_dir "$DATA"
done
[ -f "$OUT/multitask_ssl/test_time_flips/metrics.json" ] ||  # the released run also averaged over label-safe flips
  "${LAUNCH[@]}" examples/evaluate.py --model "$OUT/multitask_ssl" --data_dir "$DATA" --test_time_flips
while read -r name steps <&3; do  # fd 3: the runs below must not eat the list on stdin
  run="$OUT/single_task/$name"
  [ -f "$run/metrics.json" ] && continue
  "${LAUNCH[@]}" examples/finetune.py "${COMMON[@]}" --model_size small $MODEL_FLAGS --datasets "$name" \
    --max_steps "$steps" --checkpointing_steps 50 --output_dir "$run" $FINETUNE_FLAGS
  "${LAUNCH[@]}" examples/evaluate.py --model "$run" --data_dir "$DATA"
done 3< <(python benchmarks/accuracy_report.py steps "$DATA" "$FINETUNE_EPOCHS" "$ALPHA")
python benchmarks/accuracy_report.py table "$OUT"
