"""Self-supervised pre-training of Medformer on MedMNIST, 2D and 3D together (labels unused).

    accelerate launch examples/pretrain.py --data_dir ../shared/data/medmnist

Each step draws one dataset (p ~ n^alpha, the same draw on every process), so a batch has one input shape. Writes
a Hub-ready folder (model, image processor, model card) to --output_dir, resumable checkpoints to
<output_dir>/checkpoints, TensorBoard logs to <output_dir>/runs and reconstruction PNGs to <output_dir>/reconstructions.
"""

import argparse
from pathlib import Path

from accelerate.utils import set_seed

from medformer_hf import MedformerConfig, MedformerForPreTraining
from medformer_hf.configuration_medformer import SSL_TASKS
from medformer_hf.data import MedformerCollator, build_multitask_dataset, multitask_dataloader
from medformer_hf.hub import push_or_exit, write_model_card
from medformer_hf.training import (
    CheckpointManager,
    HelpFormatter,
    TrainState,
    add_common_arguments,
    add_model_arguments,
    check_common_arguments,
    create_accelerator,
    create_ema,
    create_optimizer,
    describe_batch,
    describe_input_size,
    export_model_folder,
    exported_state_dict,
    input_size_problem,
    model_config_kwargs,
    refusals_in_one_line,
    resolve_budget,
    train,
    training_processor,
)
from medformer_hf.visualization import save_reconstruction_grid


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    add_common_arguments(parser, default_output_dir="outputs/pretrain")
    add_model_arguments(parser)
    pretext = parser.add_argument_group("pretext tasks (MedformerConfig)")
    pretext.add_argument("--mask_ratio", type=float, default=0.75, help="share of the patch tokens masked")
    pretext.add_argument(
        "--mask_unit", type=int, default=1, help="mask blocks of this many patches per axis (1: single patches)"
    )
    pretext.add_argument(
        "--ssl_tasks", nargs="+", choices=list(SSL_TASKS), default=MedformerConfig().ssl_tasks, help="pretext tasks"
    )
    pretext.add_argument(
        "--ssl_loss_weights",
        nargs="+",
        default=[],
        metavar="TASK=WEIGHT",
        help="weight of a pretext loss in the total, e.g. slice_consistency=0.2 (default: MedformerConfig's)",
    )
    pretext.add_argument("--norm_pix_loss", action="store_true", help="reconstruct per-patch normalised pixels")
    pretext.add_argument(
        "--num_decoder_layers",
        type=int,
        help="cross-attention blocks of the pixel decoder (default: num_output_layers, 1)",
    )
    pretext.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="augment every image (each set's catalogue policy); view agreement then compares two augmentations",
    )
    args = parser.parse_args()
    check_common_arguments(parser, args)
    if problem := input_size_problem(args, MedformerConfig(**model_config_kwargs(args))):
        parser.error(problem)
    if "masked_reconstruction" not in args.ssl_tasks:
        parser.error("--ssl_tasks must include masked_reconstruction (the other pretexts use its masked views).")
    weights = {}
    for item in args.ssl_loss_weights:
        task, _, weight = item.partition("=")
        if task not in args.ssl_tasks:
            parser.error(f"--ssl_loss_weights {item!r}: {task!r} is not among --ssl_tasks {args.ssl_tasks}.")
        try:
            weights[task] = float(weight)
        except ValueError:
            parser.error(f"--ssl_loss_weights {item!r}: write TASK=WEIGHT with a number, e.g. {task}=0.1.")
    args.ssl_loss_weights = weights
    return args


@refusals_in_one_line
def main() -> None:
    args = parse_args()
    accelerator = create_accelerator(args, "medformer-pretrain")
    set_seed(args.seed)
    with accelerator.main_process_first():
        dataset = build_multitask_dataset(
            args.datasets, split="train", with_labels=False, size=args.size, data_dir=args.data_dir
        )
    config = MedformerConfig(
        **model_config_kwargs(args),
        mask_ratio=args.mask_ratio,
        mask_unit=args.mask_unit,
        ssl_tasks=args.ssl_tasks,
        ssl_loss_weights=args.ssl_loss_weights,
        norm_pix_loss=args.norm_pix_loss,
        num_decoder_layers=args.num_decoder_layers,
    )
    processor = training_processor(config, args)
    model = MedformerForPreTraining(config)
    # With augmentation, the collator draws view agreement's second view as another augmentation of each image.
    views = model.num_views if args.augment else 1
    collator = MedformerCollator(dataset, processor, augment=args.augment, views=views)
    preview_collator = MedformerCollator(dataset, processor)
    loader = multitask_dataloader(
        dataset, collator, args.batch_size, args.sampling_alpha, args.seed, num_workers=args.num_workers
    )
    resolve_budget(accelerator, args, loader)
    optimizer, scheduler = create_optimizer(model, args, accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # From here each process draws its own masks, augmentations and dropout (seed + process index): one seed for all
    # would give every process's i-th image the same ones. The sampler keeps its shared generator.
    set_seed(args.seed, device_specific=True)
    state = TrainState()
    ema = create_ema(accelerator, model, args.ema_decay)
    # What is previewed and saved: the EMA of the weights when it is on.
    evaluated = accelerator.unwrap_model(model) if ema is None else ema.module
    checkpoints = CheckpointManager.for_run(accelerator, args, state, ema)
    checkpoints.resume(args.resume_from_checkpoint)

    def compute_loss(model, batch):
        output = model(
            batch["pixel_values"],
            modality_ids=batch["modality_ids"],
            body_part_ids=batch["body_part_ids"],
            view_pixel_values=batch.get("view_pixel_values"),
        )
        losses = ("reconstruction_loss", "agreement_loss", "slice_consistency_loss")
        scalars = {f"train/{name}": output[name].item() for name in losses if output.get(name) is not None}
        return output.loss, scalars

    start = dict(zip(dataset.names, dataset.offsets, strict=False))
    previews = {
        name: preview_collator(dataset.__getitems__(list(range(start[name], start[name] + 8)))) for name in start
    }

    def save_previews(step: int) -> None:
        if accelerator.is_main_process:
            for name, batch in previews.items():
                path = Path(args.output_dir) / "reconstructions" / f"step_{step:08d}_{name}.png"
                pixels = batch["pixel_values"].to(accelerator.device)
                save_reconstruction_grid(evaluated, pixels, path, title=f"{name}, step {step}")

    train(
        accelerator, model, loader, optimizer, scheduler, state, checkpoints, args, compute_loss, save_previews, ema=ema
    )

    weights = exported_state_dict(accelerator, model, ema)

    def write(folder: Path) -> None:
        evaluated.save_pretrained(folder, state_dict=weights)
        processor.save_pretrained(folder)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export_model_folder(args.output_dir, write)
        training = (
            f"Self-supervised pre-training ({' + '.join(task.replace('_', ' ') for task in args.ssl_tasks)}"
            f"{', augmented views' if args.augment else ''}) on the train splits of "
            f"{', '.join(args.datasets)} at {describe_input_size(args.size, processor)}: {args.max_steps} steps of "
            f"{describe_batch(args, accelerator.num_processes)}, learning rate {args.learning_rate}, seed "
            f"{args.seed}."
        )
        write_model_card(args.output_dir, repo_id=args.hub_model_id, datasets=args.datasets, training=training)
        logs = "" if args.report_to == "none" else f", runs/ for {args.report_to}"
        accelerator.print(f"model folder: {Path(args.output_dir).resolve()} (reconstructions/*.png{logs})")
        if args.push_to_hub:
            url = push_or_exit(args.output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
            accelerator.print(f"pushed: {url}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
