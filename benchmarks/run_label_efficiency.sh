#!/usr/bin/env bash
# The label-efficiency table and plot of BENCHMARKS.md, one command (re-running skips finished runs).
#   bash benchmarks/run_label_efficiency.sh <ssl checkpoint> [data_dir] [output_dir] [datasets...]
# For each seed (0, 1, 2), dataset (default: every set in data_dir) and label fraction (1%, 10%, 100%): fine-tune from
# the SSL checkpoint and from scratch with the same budget and the package's recipe (lr 1e-3 with warm-up, label-safe
# augmentation, EMA, label smoothing 0.1), select on validation, evaluate on test; then write the tables and a PNG
# plot. The 100% from-scratch runs are also single-task from-scratch baselines.
# Initialisations (INITS): ssl (fine-tune everything from the SSL checkpoint), scratch, and ssl_lpft (probe, then
# fine-tune: first PROBE_STEPS steps training only the Output Adaptformer and the head on the frozen pre-trained
# encoder, `--train output_and_heads`, then the study's fine-tuning from that model; LP-FT, Kumar et al. 2022, so the
# random head does not distort the pre-trained features in the first steps), and ssl_cotrain (fine-tune everything from
# the SSL checkpoint with its pretext tasks kept running on the set's unlabeled train images, `--pretext_weight`
# PRETEXT_WEIGHT: semi-supervised).
# Env: EPOCHS (passes over the labelled images, default 30), MIN_STEPS (floor for the few-label runs, default 100),
# PROBE_STEPS (ssl_lpft's probe, default 50), PRETEXT_WEIGHT (ssl_cotrain's, default 1),
# JOBS (runs in parallel, default 1; each gets nproc/JOBS threads), INITS (default "ssl scratch"; "scratch" alone
# runs the from-scratch half, which needs no SSL checkpoint yet, e.g. while the pre-training still runs), SEEDS
# (default "0 1 2") and FRACTIONS (default "0.01 0.1 1.0"): a subset of the study, e.g. only seed 2; RECORD (a JSON
# file, e.g. benchmarks/results/label_efficiency_runs.json): the report adds this folder's runs to that record of every
# run and reports the whole record, so seeds run into folders that are gone still count.
set -euo pipefail
SSL=${1:?pass the SSL checkpoint folder (from run_accuracy.sh: <output_dir>/ssl)}
DATA=${2:-../shared/data/medmnist}
OUT=${3:-outputs/label_efficiency}
shift $(( $# < 3 ? $# : 3 ))
if [ $# -gt 0 ]; then DATASETS=("$@"); else
  mapfile -t DATASETS < <(python -c 'import sys; from medformer_hf.data import local_datasets
print(*local_datasets(sys.argv[1]), sep="\n")' "$DATA")
fi
EPOCHS=${EPOCHS:-30}
MIN_STEPS=${MIN_STEPS:-100}
PROBE_STEPS=${PROBE_STEPS:-50}
PRETEXT_WEIGHT=${PRETEXT_WEIGHT:-1}
JOBS=${JOBS:-1}
for init in ${INITS:-}; do  # a misspelt name would run as scratch, and the report refuse it only after the runs
  case $init in
    ssl | scratch | ssl_lpft | ssl_cotrain) ;;
    *) echo "INITS: unknown initialisation '$init': use ssl, scratch, ssl_lpft or ssl_cotrain" >&2; exit 2 ;;
  esac
done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}

source "$(dirname "$0")/settings.sh"
require_settings "$OUT" settings "ssl=$SSL epochs=$EPOCHS min_steps=$MIN_STEPS"
[[ " ${INITS:-} " == *" ssl_lpft "* ]] && require_settings "$OUT" probe_settings "probe_steps=$PROBE_STEPS"
[[ " ${INITS:-} " == *" ssl_cotrain "* ]] && require_settings "$OUT" pretext_settings "pretext_weight=$PRETEXT_WEIGHT"

runs=()  # seed outermost, so a run cut short still covers every set
for seed in ${SEEDS:-0 1 2}; do
  for name in "${DATASETS[@]}"; do
    for fraction in ${FRACTIONS:-0.01 0.1 1.0}; do
      for init in ${INITS:-ssl scratch}; do runs+=("$name $fraction $seed $init"); done
    done
  done
done

worker() {  # runs number worker, worker + JOBS, ... so parallel workers never share a run
  for (( i = $1; i < ${#runs[@]}; i += JOBS )); do
    read -r name fraction seed init <<< "${runs[$i]}"
    run="$OUT/$name/fraction_${fraction}/seed_${seed}/$init"
    [ -f "$run/metrics.json" ] && continue
    init_args=(--model_size small)
    # EPOCHS passes over the labelled images (the subset finetune.py keeps: stratified_subset), counted as
    # --num_train_epochs counts them, but at least MIN_STEPS steps.
    steps=$(python -c 'import math, sys
from medformer_hf.data import build_multitask_dataset
name, fraction, seed, epochs, floor, batch, data = sys.argv[1:]
labelled = len(build_multitask_dataset([name], "train", float(fraction), int(seed), data_dir=data, download=False))
print(max(int(floor), math.ceil(float(epochs) * labelled / int(batch))))' \
      "$name" "$fraction" "$seed" "$EPOCHS" "$MIN_STEPS" 64 "$DATA")
    common=(--data_dir "$DATA" --datasets "$name" --batch_size 64 --label_fraction "$fraction" --seed "$seed"
      --checkpointing_steps 25 --label_smoothing 0.1 --report_to none --resume_from_checkpoint latest)
    case $init in
      ssl) init_args=(--init_from "$SSL") ;;
      ssl_cotrain) init_args=(--init_from "$SSL" --pretext_weight "$PRETEXT_WEIGHT") ;;
      ssl_lpft)
        python examples/finetune.py "${common[@]}" --init_from "$SSL" --train output_and_heads \
          --max_steps "$PROBE_STEPS" --output_dir "$run/probe"
        init_args=(--init_from "$run/probe") ;;
    esac
    python examples/finetune.py "${common[@]}" "${init_args[@]}" --max_steps "$steps" --output_dir "$run"
    python examples/evaluate.py --model "$run" --data_dir "$DATA"
  done
}

pids=()
for (( job = 0; job < JOBS; job++ )); do worker "$job" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid"; done  # a failed run fails the command
python benchmarks/label_efficiency_report.py "$OUT" ${RECORD:+--record "$RECORD"}
