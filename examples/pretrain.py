"""Self-supervised pre-training of Medformer on MedMNIST, 2D and 3D together (labels unused).

    accelerate launch examples/pretrain.py --data_dir ../shared/data/medmnist

Each step draws one dataset (p ~ n^alpha, the same draw on every process), so a batch has one input shape. Writes
a Hub-ready folder (model, image processor, model card) to --output_dir, resumable checkpoints to
<output_dir>/checkpoints, TensorBoard logs to <output_dir>/runs and reconstruction PNGs to <output_dir>/reconstructions.
"""

import argparse
from pathlib import Path

from accelerate.utils import set_seed

from medformer_hf import MedformerConfig, MedformerForPreTraining, MedformerImageProcessor
from medformer_hf.data import MedformerCollator, build_multitask_dataset, multitask_dataloader
from medformer_hf.hub import push_or_exit, write_model_card
from medformer_hf.training import (
    CheckpointManager,
    TrainState,
    add_common_arguments,
    add_model_arguments,
    check_common_arguments,
    create_accelerator,
    create_ema,
    create_optimizer,
    export_model_folder,
    exported_state_dict,
    model_config_kwargs,
    resolve_budget,
    train,
)
from medformer_hf.visualization import save_reconstruction_grid


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_common_arguments(parser, default_output_dir="outputs/pretrain")
    add_model_arguments(parser)
    parser.add_argument("--mask_ratio", type=float, default=0.75)
    args = parser.parse_args()
    check_common_arguments(parser, args)
    return args


def main() -> None:
    args = parse_args()
    accelerator = create_accelerator(args, "medformer-pretrain")
    set_seed(args.seed)
    with accelerator.main_process_first():
        dataset = build_multitask_dataset(
            args.datasets, split="train", with_labels=False, size=args.size, data_dir=args.data_dir
        )
    config = MedformerConfig(**model_config_kwargs(args), mask_ratio=args.mask_ratio)
    processor = MedformerImageProcessor.from_model_config(config, training_size=args.size)
    collator = MedformerCollator(dataset, processor)
    loader = multitask_dataloader(
        dataset, collator, args.batch_size, args.sampling_alpha, args.seed, num_workers=args.num_workers
    )
    resolve_budget(accelerator, args, loader)
    model = MedformerForPreTraining(config)
    optimizer, scheduler = create_optimizer(model, args, accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState()
    ema = create_ema(accelerator, model, args.ema_decay)
    # What is previewed and saved: the EMA of the weights when it is on.
    evaluated = accelerator.unwrap_model(model) if ema is None else ema.module
    checkpoints = CheckpointManager(
        accelerator, Path(args.output_dir) / "checkpoints", args.checkpoints_total_limit, state, ema
    )
    checkpoints.resume(args.resume_from_checkpoint)

    def compute_loss(model, batch):
        output = model(batch["pixel_values"], modality_ids=batch["modality_ids"], body_part_ids=batch["body_part_ids"])
        scalars = {"train/reconstruction_loss": output.reconstruction_loss.item()}
        if output.agreement_loss is not None:
            scalars["train/agreement_loss"] = output.agreement_loss.item()
        return output.loss, scalars

    start = dict(zip(dataset.names, dataset.offsets, strict=False))
    previews = {name: collator(dataset.__getitems__(list(range(start[name], start[name] + 8)))) for name in start}

    def save_previews(step: int) -> None:
        if accelerator.is_main_process:
            for name, batch in previews.items():
                path = Path(args.output_dir) / "reconstructions" / f"step_{step:08d}_{name}.png"
                save_reconstruction_grid(evaluated, batch["pixel_values"].to(accelerator.device), path)

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
            f"Self-supervised pre-training (masked reconstruction + view agreement) on the train splits of "
            f"{', '.join(args.datasets)} at {args.size} px: {args.max_steps} steps of {args.batch_size} x "
            f"{accelerator.num_processes} images, learning rate {args.learning_rate}, seed {args.seed}."
        )
        write_model_card(args.output_dir, repo_id=args.hub_model_id, datasets=args.datasets, training=training)
        accelerator.print(
            f"model folder: {Path(args.output_dir).resolve()} (reconstructions/*.png, runs/ for TensorBoard)"
        )
        if args.push_to_hub:
            url = push_or_exit(args.output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
            accelerator.print(f"pushed: {url}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
