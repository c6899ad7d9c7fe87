"""Multi-task fine-tuning of Medformer on MedMNIST sets, from scratch or from a (pre-trained) checkpoint.

    accelerate launch examples/finetune.py --data_dir ../shared/data/medmnist --init_from outputs/pretrain

One head per dataset; each step trains one dataset's batch (p ~ n^alpha, the same on every process). At every
checkpoint the model is evaluated on the validation splits; the best mean validation AUC (ties: mean ACC) is exported to
--output_dir (model, image processor, card, validation metrics, confusion matrices). The test split is never read.
"""

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from accelerate.utils import set_seed

from medformer_hf import MedformerConfig, MedformerForMultiTask, MedformerImageProcessor, multitask_loss
from medformer_hf.data import CATALOGUE, MedformerCollator, build_multitask_dataset, multitask_dataloader
from medformer_hf.hub import metrics_table, push_or_exit, write_model_card
from medformer_hf.training import (
    CheckpointManager,
    FineTuningWithPretexts,
    HelpFormatter,
    TrainState,
    add_common_arguments,
    add_model_arguments,
    carry_best_model,
    check_common_arguments,
    checkpoint_processor,
    create_accelerator,
    create_ema,
    create_optimizer,
    describe_batch,
    describe_input_size,
    endless_batches,
    evaluate_tasks,
    export_model_folder,
    exported_state_dict,
    fine_tuned_model,
    given_model_flags,
    input_size_problem,
    is_hub_id,
    log_line,
    mix_within_tasks,
    model_config_kwargs,
    refusals_in_one_line,
    resolve_budget,
    scorable_tasks,
    train,
    training_processor,
    validation_score,
)
from medformer_hf.visualization import save_confusion_matrix

# --train modes whose Main Body is frozen: it runs as at inference (no stochastic depth) and has no layer-wise rates to
# decay. With adapters it trains (the new task's adapters sit in it), so `new_heads_and_adapters` is not one.
FROZEN_BODY_MODES = ("output_and_heads", "new_heads", "new_heads_and_output")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    add_common_arguments(parser, default_output_dir="outputs/finetune")
    parser.add_argument("--init_from", help="Medformer checkpoint folder or Hub id (default: from scratch)")
    add_model_arguments(parser)
    parser.add_argument("--label_fraction", type=float, default=1.0, help="share of training labels kept, (0, 1]")
    regularisation = parser.add_argument_group("regularisation")
    regularisation.add_argument(
        "--label_smoothing", type=float, default=0.0, help="targets moved this far to uniform (see task_loss)"
    )
    regularisation.add_argument(
        "--drop_path_rate",
        type=float,
        help="Main Body stochastic depth (MedformerConfig; default: the checkpoint's, 0)",
    )
    regularisation.add_argument(
        "--mixup_alpha",
        type=float,
        default=0.0,
        help="mixup of images of the same task, weights ~ Beta(alpha, alpha) (0: off; see mix_within_tasks)",
    )
    regularisation.add_argument(
        "--pretext_weight",
        type=float,
        default=0.0,
        help="keep the pretext tasks of --init_from (a pre-training) running on the unlabeled train images of "
        "--datasets, their loss added with this weight (semi-supervised, for few labels; 0: off)",
    )
    regularisation.add_argument(
        "--layer_decay",
        type=float,
        default=1.0,
        help="layer-wise learning-rate decay towards the input (1: off; for fine-tuning a pre-trained checkpoint)",
    )
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each set's label-safe augmentation from the catalogue (shifts, intensity; flips/rotations where allowed)",
    )
    parser.add_argument(
        "--train",
        choices=["all", "output_and_heads", "new_heads", "new_heads_and_output", "new_heads_and_adapters"],
        default="all",
        help="what trains: everything; the Output Adaptformer and the task heads on a frozen encoder (Input "
        "Adaptformer + Main Body of --init_from: attentive probing of a pre-training, for few labels); only the heads "
        "of --datasets sets the --init_from checkpoint lacks; those heads plus an Output Adaptformer of their own (a "
        "copy of the shared one); or also low-rank adapters on the Main Body used only for their samples "
        "(--adapter_rank). The new_heads* choices freeze everything the checkpoint had, so its tasks' weights stay "
        "bit-identical",
    )
    parser.add_argument("--adapter_rank", type=int, help="LoRA rank of --train new_heads_and_adapters (default 8)")
    parser.add_argument(
        "--adapt_input",
        action="store_true",
        help="with --train new_heads_and_adapters: adapters on the Input Adaptformer's layers too, so a new set can "
        "change what its latents read from the image",
    )
    args = parser.parse_args()
    if not 0.0 < args.label_fraction <= 1.0:
        parser.error(f"--label_fraction must be in (0, 1], got {args.label_fraction}.")
    if not 0.0 <= args.label_smoothing < 1.0:
        parser.error(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}.")
    if args.mixup_alpha < 0.0:
        parser.error(f"--mixup_alpha must be >= 0 (0 turns mixup off), got {args.mixup_alpha}.")
    if not 0.0 < args.layer_decay <= 1.0:
        parser.error(f"--layer_decay must be in (0, 1], got {args.layer_decay}.")
    if args.pretext_weight < 0.0:
        parser.error(f"--pretext_weight must be >= 0 (0 turns it off), got {args.pretext_weight}.")
    if args.pretext_weight and args.train != "all":
        parser.error(f"--pretext_weight trains the encoder, which --train {args.train} freezes: drop one of them.")
    if args.pretext_weight and args.init_from is None:
        parser.error("--pretext_weight keeps a pre-training's pretext tasks running: pass --init_from <its folder>.")
    if args.init_from is not None and not Path(args.init_from).is_dir() and not is_hub_id(args.init_from):
        parser.error(f"--init_from {args.init_from} is not a folder (nor a Hub id, user/name).")
    resized = [dims for dims in (2, 3) if getattr(args, f"input_size_{dims}d") is not None]
    try:
        init_config = MedformerConfig.from_pretrained(args.init_from) if args.init_from else None  # once, for below
    except OSError as error:  # a folder without config.json, a Hub id offline or not found
        parser.error(f"--init_from {args.init_from} cannot be read: {str(error).splitlines()[0]}")
    if init_config is not None and "MedformerForImageClassification" in (init_config.architectures or []):
        parser.error(
            f"--init_from {args.init_from} holds a single-task classifier (extract_task.py's or the Trainer's), and "
            "finetune.py trains multi-task models: pass the multi-task folder it came from, or fine-tune the "
            "classifier with transformers' Trainer (README, 'With the Hugging Face tools you already use')."
        )
    if resized and (problem := input_size_problem(args, init_config or MedformerConfig(**model_config_kwargs(args)))):
        parser.error(problem)
    if args.pretext_weight:
        if "MedformerForPreTraining" not in (init_config.architectures or []):
            parser.error(
                f"--pretext_weight keeps a pre-training's pretext tasks running, but --init_from {args.init_from} is "
                "not a pre-training (pretrain.py's folder): its pretext heads would start untrained. Pass a "
                "pre-training, or drop --pretext_weight."
            )
    if args.drop_path_rate is not None and not 0.0 <= args.drop_path_rate < 1.0:
        parser.error(f"--drop_path_rate must be in [0, 1), got {args.drop_path_rate}.")
    if args.adapter_rank is not None and args.train != "new_heads_and_adapters":
        parser.error("--adapter_rank sizes the adapters of --train new_heads_and_adapters; add that, or drop it.")
    if args.adapt_input and args.train != "new_heads_and_adapters":
        parser.error("--adapt_input extends the adapters of --train new_heads_and_adapters; add that, or drop it.")
    args.adapter_rank = 8 if args.adapter_rank is None else args.adapter_rank
    if args.adapter_rank < 1:
        parser.error(f"--adapter_rank must be a positive integer, got {args.adapter_rank}.")
    if args.drop_path_rate is not None and args.train in FROZEN_BODY_MODES:
        parser.error(f"--drop_path_rate regularises the Main Body, which --train {args.train} freezes; drop it.")
    if args.layer_decay < 1.0 and args.train in FROZEN_BODY_MODES:
        parser.error(f"--layer_decay changes nothing with --train {args.train} (the encoder is frozen); drop it.")
    if args.init_from is not None:
        given = given_model_flags(args)
        if given:
            parser.error(
                f"{', '.join(given)} shape a model built from scratch, but --init_from {args.init_from} brings its "
                "own architecture: drop them."
            )
    if args.train != "all" and args.init_from is None:
        parser.error(f"--train {args.train} freezes a trained checkpoint's encoder: pass --init_from <folder>.")
    check_common_arguments(parser, args)
    if args.init_from is not None and resized:  # the saved processor resizes every task's images, trained here or not
        trained_at = checkpoint_processor(args.init_from, init_config)
        for dims in resized:
            side, was = getattr(args, f"input_size_{dims}d"), getattr(trained_at, f"size_{dims}d")
            kept = [
                name
                for name, spec in init_config.tasks.items()
                if spec.get("spatial_dims") == dims and name not in args.datasets
            ]
            if kept and was is not None and list(was) != [side] * dims:
                parser.error(
                    f"--input_size_{dims}d {side}: the --init_from checkpoint's {dims}D tasks {kept}, which this run "
                    f"does not train, learned at {'x'.join(map(str, was))} px, and the saved model would feed them "
                    f"{side} px: add them to --datasets, or leave --input_size_{dims}d out."
                )
    return args


def build_model(args: argparse.Namespace) -> tuple[MedformerForMultiTask, list[str]]:
    """A multi-task model with one head per dataset: the checkpoint as it is, grown by `add_task` for the sets it
    lacks (appended, so its tasks keep their ids). Also returns the checkpoint's own tasks (empty from scratch)."""
    tasks = {name: CATALOGUE[name].task_spec() for name in args.datasets}
    regularisation = {} if args.drop_path_rate is None else {"drop_path_rate": args.drop_path_rate}
    if args.train in FROZEN_BODY_MODES:  # a frozen Main Body runs as it will at inference, without stochastic depth
        regularisation = {"drop_path_rate": 0.0}
    if args.init_from is None:
        return MedformerForMultiTask(MedformerConfig(**model_config_kwargs(args), **regularisation, tasks=tasks)), []
    model, loading = MedformerForMultiTask.from_pretrained(
        args.init_from, dtype="float32", output_loading_info=True, **regularisation
    )
    old_tasks = list(model.config.tasks)
    new_tasks = [name for name in tasks if name not in old_tasks]
    # Its own Output Adaptformer (a copy of the shared one) and Main Body (and Input Adaptformer) adapters, if asked.
    own_output = args.train in ("new_heads_and_output", "new_heads_and_adapters")
    adapters = args.train == "new_heads_and_adapters"
    for name in new_tasks:
        model.add_task(
            name,
            private_output=own_output,
            adapter_rank=args.adapter_rank if adapters else 0,
            adapt_input=args.adapt_input,
            **tasks[name],
        )
    if args.train == "output_and_heads":
        frozen_missing = [key for key in loading["missing_keys"] if key.startswith("medformer.")]
        if frozen_missing:
            raise SystemExit(
                f"--train output_and_heads would freeze weights {args.init_from} lacks: {frozen_missing[:3]}"
            )
        for name, parameter in model.named_parameters():
            parameter.requires_grad = not name.startswith("medformer.")
    elif args.train != "all":
        if len(new_tasks) < len(tasks):
            raise SystemExit(
                f"--train {args.train} freezes the heads {args.init_from} has, so "
                f"{[name for name in tasks if name in old_tasks]} would not train: drop them from --datasets, or "
                "replay them with --train all."
            )
        if loading["missing_keys"]:
            raise SystemExit(
                f"--train {args.train} would freeze weights {args.init_from} lacks: "
                f"{sorted(loading['missing_keys'])[:3]} ..."
            )
        owned = ("task_heads", "private_output_adaptformers", "medformer.task_adapters")
        trained = tuple(f"{module}.{name}." for name in new_tasks for module in owned)
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(trained)
    return model, old_tasks


def old_tasks_report(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> str:
    """Markdown: each of the checkpoint's own tasks before and after this run (what growing it cost)."""
    lines = [
        "| task | validation AUC before | after | change | validation ACC before | after |",
        "|---|---|---|---|---|---|",
    ]
    for name, start in before.items():
        end = after[name]
        cells = [start["auc"], end["auc"], end["auc"] - start["auc"], start["acc"], end["acc"]]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{value:+.4f}" if i == 2 else f"{value:.4f}" for i, value in enumerate(cells))
            + " |"
        )
    return "\n".join(lines)


@contextmanager
def sizes_recorded_as_fed(config: MedformerConfig, fed_by: MedformerImageProcessor) -> Iterator[None]:
    """While inside, `config` records the input sizes `fed_by` feeds: the "before" pass feeds the checkpoint as it was
    fed, which a model already told of this run's new size would warn about as a size it was not trained at."""
    recorded = config.image_size_2d, config.image_size_3d
    config.image_size_2d, config.image_size_3d = fed_by.size_2d, fed_by.size_3d
    try:
        yield
    finally:
        config.image_size_2d, config.image_size_3d = recorded


@refusals_in_one_line
def main() -> None:
    args = parse_args()
    accelerator = create_accelerator(args, "medformer-finetune")
    set_seed(args.seed)
    load = dict(size=args.size, data_dir=args.data_dir)
    with accelerator.main_process_first():
        train_set = build_multitask_dataset(args.datasets, "train", args.label_fraction, args.seed, **load)
        validation = {name: build_multitask_dataset([name], "validation", **load) for name in args.datasets}
    model, old_tasks = build_model(args)
    # The checkpoint's own tasks (those with a local file) are validated before and after this run: what growing cost.
    # Before, as the checkpoint was fed (training_processor may give them another size below); after, as the exported
    # model will be.
    scored = scorable_tasks(model.config, args.size, args.data_dir)["scored"]
    old_scored = [name for name in old_tasks if name in scored]
    starting_processor = checkpoint_processor(args.init_from, model.config) if old_scored else None
    with_pretexts = args.pretext_weight > 0
    if with_pretexts:
        with accelerator.main_process_first():
            unlabeled = build_multitask_dataset(args.datasets, "train", with_labels=False, **load)
    processor = training_processor(model.config, args)
    task_names = list(model.config.tasks)
    loader = multitask_dataloader(
        train_set,
        MedformerCollator(train_set, processor, task_names, augment=args.augment),
        args.batch_size,
        args.sampling_alpha,
        args.seed,
        num_workers=args.num_workers,
    )
    resolve_budget(accelerator, args, loader)
    if with_pretexts:  # its own seed: the labelled and unlabeled images are drawn independently
        unlabeled_loader = multitask_dataloader(
            unlabeled,
            MedformerCollator(unlabeled, processor),
            args.batch_size,
            args.sampling_alpha,
            args.seed + 1,
            num_workers=args.num_workers,
        )
    collators = {name: MedformerCollator(data, processor, task_names) for name, data in validation.items()}
    with accelerator.main_process_first():
        old_validation = {
            name: validation.get(name) or build_multitask_dataset([name], "validation", **load) for name in old_scored
        }

    def old_task_collators(fed_by: MedformerImageProcessor) -> dict[str, MedformerCollator]:
        return {name: MedformerCollator(data, fed_by, task_names) for name, data in old_validation.items()}

    trained = FineTuningWithPretexts(model, args.init_from) if with_pretexts else model
    optimizer, scheduler = create_optimizer(trained, args, accelerator.num_processes, args.layer_decay)
    trained, optimizer, scheduler = accelerator.prepare(trained, optimizer, scheduler)
    # From here each process draws its own masks, augmentations and dropout (seed + process index): one seed for all
    # would give every process's i-th image the same ones. The sampler keeps its shared generator.
    set_seed(args.seed, device_specific=True)
    state = TrainState()
    ema = create_ema(accelerator, trained, args.ema_decay)
    checkpoints = CheckpointManager.for_run(accelerator, args, state, ema)
    output_dir = Path(args.output_dir)
    carry_best_model(accelerator, checkpoints.resume(args.resume_from_checkpoint), output_dir, state, args.max_steps)
    model_config = model.config
    if with_pretexts:  # one unlabeled batch per labelled one
        unlabeled_batches = endless_batches(unlabeled_loader, state.step * args.gradient_accumulation_steps)

    def compute_loss(trained, batch):
        pixel_values = batch["pixel_values"]
        if args.mixup_alpha:
            pixel_values, partner, weight = mix_within_tasks(pixel_values, batch["task_ids"], args.mixup_alpha)
        labelled = dict(
            pixel_values=pixel_values,
            task=batch["task_ids"],
            labels=batch["labels"],
            modality_ids=batch["modality_ids"],
            body_part_ids=batch["body_part_ids"],
            target_smoothing=args.label_smoothing,
        )
        if with_pretexts:
            images = next(unlabeled_batches)
            pretext_inputs = ("pixel_values", "modality_ids", "body_part_ids")
            output, pretext = trained(labelled, {key: images[key].to(accelerator.device) for key in pretext_inputs})
        else:
            output = trained(**labelled)
        loss, scalars = output.loss, {}
        if args.mixup_alpha:
            partner_loss, _ = multitask_loss(
                model_config, output.task_logits, output.task_indices, batch["labels"][partner], args.label_smoothing
            )
            loss = weight * loss + (1 - weight) * partner_loss
        if with_pretexts:
            loss = loss + args.pretext_weight * pretext.loss
            scalars = {"train/supervised_loss": output.loss.item(), "train/pretext_loss": pretext.loss.item()}
        return loss, scalars

    # What is evaluated and saved: the EMA of the weights when it is on.
    evaluated = fine_tuned_model(accelerator.unwrap_model(trained) if ema is None else ema.module)
    if old_validation and state.step == 0:
        with sizes_recorded_as_fed(evaluated.config, starting_processor):
            old_before, _ = evaluate_tasks(
                accelerator, evaluated, old_validation, old_task_collators(starting_processor), args.batch_size
            )
        if accelerator.is_main_process:
            (output_dir / "old_tasks_before.json").parent.mkdir(parents=True, exist_ok=True)
            (output_dir / "old_tasks_before.json").write_text(json.dumps(old_before, indent=2))

    def validate_and_keep_best(step: int) -> None:
        metrics, predictions = evaluate_tasks(accelerator, evaluated, validation, collators, args.batch_size)
        mean_auc, mean_acc = validation_score(metrics)
        logged = {f"validation/{name}/{key}": values[key] for name, values in metrics.items() for key in ("acc", "auc")}
        accelerator.log({**logged, "validation/mean_auc": mean_auc, "validation/mean_acc": mean_acc}, step=step)
        per_set = ", ".join(f"{name} {values['auc']:.3f}" for name, values in metrics.items())
        best = (mean_auc, mean_acc) > (state.best_metric, state.best_accuracy)
        log_line(accelerator, f"step {step} validation AUC: {per_set}; mean {mean_auc:.4f}{' (best: saved)' * best}")
        if not best:
            return
        state.best_metric, state.best_accuracy = mean_auc, mean_acc
        weights = exported_state_dict(accelerator, trained, ema)

        def write(folder: Path) -> None:
            evaluated.save_pretrained(folder, state_dict=weights)
            processor.save_pretrained(folder)
            summary = {"step": step, "mean_auc": mean_auc, "metrics": metrics}
            (folder / "validation_metrics.json").write_text(json.dumps(summary, indent=2))
            (folder / "validation_metrics.md").write_text(
                f"Best at step {step}\n\n{metrics_table(metrics, 'validation')}\n"
            )
            for name, (scores, labels) in predictions.items():
                if CATALOGUE[name].task_type != "multilabel":
                    path = folder / "confusion_matrices" / f"{name}_validation.png"
                    title = f"{name} validation, step {step}"
                    save_confusion_matrix(labels, scores.argmax(1), list(CATALOGUE[name].labels), path, title)

        if accelerator.is_main_process:
            export_model_folder(output_dir, write)

    def fed_size(fed_by: MedformerImageProcessor, dims: int) -> list[int]:  # no size: the files' own
        return list(getattr(fed_by, f"size_{dims}d") or [args.size] * dims)

    fed_as_before = starting_processor is not None and all(
        fed_size(processor, dims) == fed_size(starting_processor, dims) for dims in (2, 3)
    )
    if args.init_from and state.step == 0 and set(args.datasets) <= set(old_tasks) and fed_as_before:
        # A continuation (a warm restart, more epochs): the starting weights are a candidate too, so a run that only
        # loses validation AUC exports them, not the best of its worse steps. Not at a new input size: there they are
        # not the model they were, and exported they would be labelled with a size they never learned.
        checkpoints.save(0)  # first, as train() does: a folder with an exported model always has a checkpoint
        validate_and_keep_best(0)
        checkpoints.save(0)  # again, holding the step-0 score: a run resumed from here keeps it as the best so far
    train(
        accelerator,
        trained,
        loader,
        optimizer,
        scheduler,
        state,
        checkpoints,
        args,
        compute_loss,
        validate_and_keep_best,
        ema=ema,
    )

    accelerator.wait_for_everyone()
    if old_validation:  # the exported (best) model on the checkpoint's own tasks, next to where they started
        best = MedformerForMultiTask.from_pretrained(output_dir, dtype="float32").to(accelerator.device)
        old_after, _ = evaluate_tasks(accelerator, best, old_validation, old_task_collators(processor), args.batch_size)
        before_file = output_dir / "old_tasks_before.json"
        if accelerator.is_main_process and not before_file.is_file():  # resumed from a copied checkpoint folder
            accelerator.print(f"no {before_file.name} from this run's start: the before/after report is skipped")
        elif accelerator.is_main_process:
            report = old_tasks_report(json.loads(before_file.read_text()), old_after)
            (output_dir / "old_tasks_validation.md").write_text(report + "\n")
            accelerator.print(f"the checkpoint's own tasks, validation split, before and after:\n{report}")
    if accelerator.is_main_process:
        training = (
            f"Multi-task fine-tuning on {', '.join(args.datasets)} at {describe_input_size(args.size, processor)} "
            f"({args.label_fraction * 100:.3g}% of the training labels) from {args.init_from or 'scratch'}: "
            f"{args.max_steps} steps of {describe_batch(args, accelerator.num_processes)}, learning rate "
            f"{args.learning_rate}, {'label-safe augmentation, ' if args.augment else ''}"
            f"{f'EMA {args.ema_decay}, ' if args.ema_decay else ''}"
            f"{f'label smoothing {args.label_smoothing}, ' if args.label_smoothing else ''}"
            f"{f'stochastic depth {model_config.drop_path_rate}, ' if model_config.drop_path_rate else ''}"
            f"{f'mixup alpha {args.mixup_alpha}, ' if args.mixup_alpha else ''}"
            f"{f'layer-wise lr decay {args.layer_decay}, ' if args.layer_decay < 1 else ''}"
            f"{f'its pretext tasks on the unlabeled images, weight {args.pretext_weight}, ' if with_pretexts else ''}"
            f"{f'--train {args.train}, ' if args.train != 'all' else ''}seed {args.seed}; "
            f"the checkpoint with the best mean validation AUC ({state.best_metric:.4f}; ties broken by mean "
            f"validation ACC) was kept."
        )
        # Test metrics beside the model describe these weights (an export of new ones removes them), e.g. when a
        # finished run is resumed to push it: the card keeps them.
        recorded = output_dir / "metrics.json"
        evaluation = json.loads(recorded.read_text()) if recorded.is_file() else {}
        write_model_card(
            output_dir,
            repo_id=args.hub_model_id,
            metrics=evaluation.get("metrics"),
            datasets=args.datasets,
            base_model=args.init_from if args.init_from and not Path(args.init_from).exists() else None,
            tasks=task_names,
            training=training,
            split=evaluation.get("split", "test"),
        )
        accelerator.print(f"best mean validation AUC {state.best_metric:.4f}; model folder: {output_dir.resolve()}")
        if args.push_to_hub:
            url = push_or_exit(output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
            accelerator.print(f"pushed: {url}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
