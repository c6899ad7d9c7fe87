"""What the example scripts share: arguments, model sizes, the optimizer, checkpoints that survive a kill, the training
loop and evaluation. The scripts in `examples/` stay thin layers over these."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import partial, wraps
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration
from huggingface_hub import file_exists, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.utils import IMAGE_PROCESSOR_NAME, logging

from .configuration_medformer import TOKENIZERS, WEIGHT_INITS, MedformerConfig
from .data import CATALOGUE, MedformerCollator, MultiTaskDataset
from .data.medmnist import find_local, local_datasets, search_folders
from .hub import EVALUATION_SPLITS, EXPORT_PARTIAL, TEST_TIME_FLIPS_FOLDER
from .image_processing_medformer import MedformerImageProcessor
from .metrics import medmnist_metrics
from .modeling_medformer import (
    MedformerForImageClassification,
    MedformerForPreTraining,
    classifier_probabilities,
    mean_over_flips,
    patch_size_for,
    task_probabilities,
)

logger = logging.get_logger(__name__)

MODEL_SIZES = {
    "tiny": {"hidden_size": 64, "num_latents": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
    "small": {"hidden_size": 128, "num_latents": 48, "num_hidden_layers": 4, "num_attention_heads": 4},
    "base": {},  # the MedformerConfig defaults
}


# ---------------------------------------------------------------------------------------------- arguments


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, except where it is None or the help text already says what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


MODEL_FLAGS = ("model_size", "tokenizer", "weight_init", "num_latents", "conv_stem_blocks")  # add_model_arguments'


# add_model_arguments' flags when not given. They default to None in the parser, so that a flag given with its default
# value still counts as given (and is refused next to --init_from, whose checkpoint brings its own architecture).
MODEL_FLAG_DEFAULTS = {"model_size": "tiny", "tokenizer": "conv", "weight_init": "fan_in", "conv_stem_blocks": 0}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Architecture flags of a model built from scratch."""
    model = parser.add_argument_group("model (from scratch)")
    default = MODEL_FLAG_DEFAULTS
    model.add_argument("--model_size", choices=sorted(MODEL_SIZES), help=f"(default: {default['model_size']})")
    model.add_argument(
        "--tokenizer",
        choices=list(TOKENIZERS),
        help=f"Input Adaptformer tokenizer (MedformerConfig; default: {default['tokenizer']})",
    )
    model.add_argument(
        "--weight_init", choices=list(WEIGHT_INITS), help=f"see MedformerConfig (default: {default['weight_init']})"
    )
    model.add_argument("--num_latents", type=int, help="latents of the Input Adaptformer (default: the size's)")
    model.add_argument(
        "--conv_stem_blocks",
        type=int,
        help=f"residual blocks per conv stem stage (default: {default['conv_stem_blocks']})",
    )


def given_model_flags(args: argparse.Namespace) -> list[str]:
    """The `add_model_arguments` flags given on the command line, whatever their value."""
    return [f"--{name}" for name in MODEL_FLAGS if getattr(args, name) is not None]


def model_config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`MedformerConfig` keyword arguments from `add_model_arguments`' flags."""
    flags = {
        name: default if getattr(args, name) is None else getattr(args, name)
        for name, default in MODEL_FLAG_DEFAULTS.items()
    }
    kwargs = {**MODEL_SIZES[flags.pop("model_size")], **flags}  # the other flags are MedformerConfig fields
    if args.num_latents is not None:
        kwargs["num_latents"] = args.num_latents
    return kwargs


DEFAULT_MAX_STEPS = 300  # the scripts' budget when neither --max_steps nor --num_train_epochs is given


def add_common_arguments(parser: argparse.ArgumentParser, default_output_dir: str) -> None:
    """Data, optimisation, checkpointing, tracking and Hub flags shared by pre-training and fine-tuning."""
    data = parser.add_argument_group("data")
    data.add_argument("--data_dir", default=os.environ.get("MEDMNIST_ROOT"), help="folder of MedMNIST .npz files")
    data.add_argument("--datasets", nargs="+", help="MedMNIST names (default: every catalogued .npz in --data_dir)")
    data.add_argument("--size", type=int, default=28, help="MedMNIST image size: 28, 64, 128 or 224")
    for dims, shape in (("2d", "images to N x N"), ("3d", "volumes to N x N x N")):
        data.add_argument(
            f"--input_size_{dims}",
            type=int,
            metavar="N",
            help=f"resize {dims.upper()} {shape} for the model, recorded in the saved processor (default: the "
            "--init_from checkpoint's, else --size)",
        )
    data.add_argument("--sampling_alpha", type=float, default=0.5, help="dataset i is drawn with p ~ n_i^alpha")
    data.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default=default_output_dir, help="where the model, checkpoints and logs go")
    train.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="write into a non-empty --output_dir (otherwise refused, unless resuming)",
    )
    train.add_argument(
        "--max_steps", type=int, help=f"optimizer steps (default: {DEFAULT_MAX_STEPS}, or what --num_train_epochs sets)"
    )
    train.add_argument(
        "--num_train_epochs",
        type=float,
        help="budget in passes over the whole training pool; sets --max_steps (each set's epochs are printed)",
    )
    train.add_argument("--batch_size", type=int, default=64, help="per process")
    # With ViT's 0.02 init, 1e-3 left small models at the class prior; with the fan-in init (config.weight_init) it
    # learns, and 3e-4 is no better (BENCHMARKS.md, recipe ablation).
    train.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW's peak, after warm-up (cosine decay)")
    train.add_argument("--weight_decay", type=float, default=0.05, help="AdamW's")
    train.add_argument("--warmup_ratio", type=float, default=0.05, help="share of the steps with linear warm-up")
    train.add_argument(
        "--ema_decay", type=float, default=0.999, help="EMA of the weights, evaluated and saved; 0 turns it off"
    )
    train.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    train.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="gradient-norm clipping; 0 turns it off (as in Trainer)"
    )
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: accelerate's")
    train.add_argument("--seed", type=int, default=0, help="of the weights, the sampling, masks and augmentation")
    train.add_argument(
        "--checkpointing_steps",
        type=int,
        default=100,
        help="steps between resumable checkpoints (fine-tuning validates there, pre-training draws reconstructions)",
    )
    train.add_argument("--checkpoints_total_limit", type=int, default=2, help="checkpoints kept; older ones go")
    train.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest' in --output_dir")
    train.add_argument("--report_to", default="tensorboard", help="accelerate tracker, or 'none'")
    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="upload the model folder at the end")
    hub.add_argument("--hub_model_id", help="user/name of the model repo")
    hub.add_argument("--hub_token", help="default: $HF_TOKEN or the stored login")
    hub.add_argument("--hub_private_repo", action="store_true")


def check_data_dir(parser: argparse.ArgumentParser, data_dir: str | None) -> None:
    """A mistyped --data_dir stops the script at once, not later as 'no such dataset' or a download attempt."""
    if data_dir is not None and not Path(data_dir).is_dir():
        parser.error(f"--data_dir {data_dir} does not exist; pass the folder that holds the MedMNIST .npz files.")


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Stop with a one-line error before anything is built; return the dataset names to use."""
    offline = any(
        os.environ.get(name, "0").lower() in ("1", "true") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    check_data_dir(parser, args.data_dir)
    if args.datasets is None:
        if args.data_dir is None:
            parser.error("pass --datasets (to download them) or --data_dir (a folder of MedMNIST .npz files).")
        args.datasets = local_datasets(args.data_dir, args.size)
        if not args.datasets:
            example = CATALOGUE["pneumoniamnist"].filename(args.size)
            parser.error(f"no MedMNIST files of size {args.size} in {args.data_dir} (e.g. {example}).")
    unknown = [name for name in args.datasets if name.lower() not in CATALOGUE]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; known: {', '.join(CATALOGUE)}.")
    args.datasets = [name.lower() for name in args.datasets]
    repeated = sorted({name for name in args.datasets if args.datasets.count(name) > 1})
    if repeated:
        parser.error(f"--datasets names {repeated} more than once; name each set once.")
    for name in args.datasets:
        info = CATALOGUE[name]
        if args.size not in info.sizes:
            parser.error(f"{name} comes in sizes {list(info.sizes)}, not --size {args.size}.")
        if offline and find_local(info, args.size, args.data_dir) is None:
            folders = ", ".join(map(str, search_folders(args.data_dir)))
            parser.error(f"{info.filename(args.size)} is not in {folders} and the Hub is offline.")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id user/name.")
    if args.push_to_hub and not (args.hub_token or get_token()):  # found now, not after hours of training
        parser.error("--push_to_hub needs a Hugging Face token: run `hf auth login`, set HF_TOKEN or pass --hub_token.")
    resume = args.resume_from_checkpoint
    if resume not in (None, "latest") and not Path(resume).is_dir():
        parser.error(f"--resume_from_checkpoint {resume} is not a folder (or pass 'latest').")
    if resume not in (None, "latest") and (Path(resume) / "checkpoints").is_dir():
        parser.error(
            f"--resume_from_checkpoint {resume} is a run's folder, not one of its checkpoints: pass "
            f"--output_dir {resume} --resume_from_checkpoint latest, or a folder in {Path(resume) / 'checkpoints'}."
        )
    output_dir = Path(args.output_dir)
    if resume is not None and args.overwrite_output_dir:
        parser.error("--resume_from_checkpoint continues a run and --overwrite_output_dir starts over: pass one.")
    if args.max_grad_norm < 0:
        parser.error(f"--max_grad_norm must be >= 0 (0 turns clipping off), got {args.max_grad_norm}.")
    entries = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
    held = [name for name in entries if name not in RUN_BY_PRODUCTS]  # a model, or files of someone else's
    has_checkpoints = bool(checkpoints_in(output_dir / "checkpoints"))
    if resume == "latest" and not has_checkpoints and held:
        what = "a model" if "config.json" in held else f"files ({', '.join(held[:3])})"
        parser.error(
            f"--output_dir {output_dir} holds {what} but no checkpoint of a run to continue, so "
            "--resume_from_checkpoint latest would train a new model over it: pass another --output_dir, or "
            "--overwrite_output_dir to replace it."
        )
    # Another run's checkpoint resumed into a folder holding a model or checkpoints would mix the two runs (a folder
    # of logs alone, such as a refused attempt leaves, is fine). A symlinked checkpoints/ still names its run folder.
    elsewhere = resume not in (None, "latest") and Path(resume).parent.parent.resolve() != output_dir.resolve()
    if elsewhere and (held or has_checkpoints):
        parser.error(
            f"--resume_from_checkpoint {resume} is not a checkpoint of the run in --output_dir {output_dir}, which "
            "holds a run of its own: continue that one with --resume_from_checkpoint latest, or resume this "
            "checkpoint into another --output_dir."
        )
    if entries and resume is None and not args.overwrite_output_dir:
        parser.error(
            f"--output_dir {output_dir} is not empty: pass --resume_from_checkpoint latest to continue that run, "
            "--overwrite_output_dir to write over it, or another --output_dir."
        )
    if args.max_steps is not None and args.num_train_epochs is not None:
        parser.error("--max_steps and --num_train_epochs both set the budget: pass one of them.")
    positive = ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpointing_steps", "input_size_2d")
    for name in (*positive, "input_size_3d", "checkpoints_total_limit"):  # a limit of 0 would keep every checkpoint
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.num_train_epochs is not None and not args.num_train_epochs > 0:
        parser.error(f"--num_train_epochs must be > 0, got {args.num_train_epochs}.")
    if args.max_steps is None and args.num_train_epochs is None:
        args.max_steps = DEFAULT_MAX_STEPS
    if not 0.0 <= args.warmup_ratio < 1.0:
        parser.error(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}.")
    if not 0.0 <= args.ema_decay < 1.0:
        parser.error(f"--ema_decay must be in [0, 1) (0 turns EMA off), got {args.ema_decay}.")
    return args.datasets


def input_size_problem(args: argparse.Namespace, config: MedformerConfig) -> str | None:
    """Why `--input_size_2d/3d` cannot feed `config`'s model (its patches must tile every axis), or None: found at
    start-up, before a checkpoint is written."""
    for dims in (2, 3):
        side = getattr(args, f"input_size_{dims}d")
        patch = patch_size_for(config, dims)
        if side is not None and side % patch:
            nearest = " or ".join(str(size) for size in (side // patch * patch, (side // patch + 1) * patch) if size)
            return (
                f"--input_size_{dims}d {side} is not a multiple of the model's {dims}D patch size {patch}: "
                f"pass {nearest}."
            )
    return None


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a Hub repo id (`name` or `owner/name`), rather than only of a local path."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def saved_processor(checkpoint: str | os.PathLike) -> MedformerImageProcessor | None:
    """The processor saved with a checkpoint (folder or Hub id); None for one saved without it. A Hub repo is asked
    whether it has the file, so a failed download is an error, not taken for a checkpoint without a processor."""
    try:
        return MedformerImageProcessor.from_pretrained(checkpoint)
    except OSError:
        if Path(checkpoint).is_dir() or not is_hub_id(str(checkpoint)):
            has_file = (Path(checkpoint) / IMAGE_PROCESSOR_NAME).is_file()
        else:
            has_file = file_exists(str(checkpoint), IMAGE_PROCESSOR_NAME)  # raises when the Hub cannot be asked
        if has_file:
            raise
        return None


def checkpoint_processor(checkpoint: str | os.PathLike, config: MedformerConfig) -> MedformerImageProcessor:
    """The processor to feed a checkpoint: its own (the normalisation is part of what its weights learned), else,
    with a warning, the one its config describes (`from_model_config`: the recorded input sizes, the default
    normalisation), as for a folder written by `model.save_pretrained` alone."""
    saved = saved_processor(checkpoint)
    if saved is None:
        logger.warning(
            f"{checkpoint} has no preprocessor_config.json: using MedformerImageProcessor.from_model_config(config) "
            "(its recorded input sizes, the default normalisation). Save the processor you trained with beside the "
            "model (processor.save_pretrained) to use it instead."
        )
        return MedformerImageProcessor.from_model_config(config)
    return saved


def training_processor(config: MedformerConfig, args: argparse.Namespace) -> MedformerImageProcessor:
    """The processor a run trains with and saves: it brings images of any size to the run's input sizes, which it
    also records in `config` (`image_size_2d` / `image_size_3d`), so the checkpoint knows them without its processor.

    A size not given (`--input_size_2d` / `--input_size_3d`) is what the `--init_from` checkpoint's processor records
    (the size its weights were trained at), else what its config records, else `--size`, the files' own. The
    normalisation (`normalization`, `modality_statistics`) is the checkpoint's too: its weights learned inputs on that
    scale. How raw intensities reach [0, 1] (`window`, `rescale_range`) belongs to the data, so it is not inherited.
    """
    sizes = {"size_2d": [args.size] * 2, "size_3d": [args.size] * 3}
    recorded = {"size_2d": config.image_size_2d, "size_3d": config.image_size_3d}  # set when loaded from a checkpoint
    sizes.update({key: size for key, size in recorded.items() if size is not None})
    init_from = getattr(args, "init_from", None)
    scale = {}
    if init_from is not None:
        saved = saved_processor(init_from)
        sizes.update({key: getattr(saved, key) for key in sizes if getattr(saved, key, None) is not None})
        if saved is not None:
            scale = {key: getattr(saved, key) for key in ("normalization", "modality_statistics")}
    for dims in (2, 3):
        side = getattr(args, f"input_size_{dims}d")
        if side is not None:
            sizes[f"size_{dims}d"] = [side] * dims
    config.image_size_2d, config.image_size_3d = sizes["size_2d"], sizes["size_3d"]
    return MedformerImageProcessor.from_model_config(config, **scale)


def describe_input_size(size: int, processor: MedformerImageProcessor) -> str:
    """The training size for a model card: the files' size, and any resize the processor applies."""
    parts = [f"{size} px"]
    for dims, target in (("2D", processor.size_2d), ("3D", processor.size_3d)):
        if target is not None and set(target) != {size}:
            parts.append(f"{dims} resized to {'x'.join(map(str, target))} px")
    return ", ".join(parts)


def log_line(accelerator: Accelerator, text: str) -> None:
    """One line on the main process's console, printed above the progress bar instead of through it."""
    if accelerator.is_main_process:
        tqdm.write(text)


# What a run writes about itself from its start, before any model: its logs, pictures and the before-run scores of
# the checkpoint's tasks (finetune.py). Removed when a run starts over, so that none reads as the new run's.
RUN_RECORDS = ("runs", "reconstructions", "old_tasks_before.json")
RUN_BY_PRODUCTS = ("checkpoints", *RUN_RECORDS)  # all a run killed before its first export leaves


def create_accelerator(args: argparse.Namespace, project_name: str) -> Accelerator:
    """Accelerator with TensorBoard (unless --report_to none) under output_dir/runs, and DDP that tolerates the
    parameters a step leaves unused (other tasks' heads, the other dimensionality's patch embedding)."""
    log_with = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "runs")
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if args.overwrite_output_dir and accelerator.is_main_process:
        # Starting over: the earlier run's records would otherwise read as this run's (two values per step in
        # TensorBoard). Its checkpoints go when the run starts (CheckpointManager.resume), its model at export.
        for name in RUN_RECORDS:
            leftover = Path(args.output_dir) / name
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    if log_with:
        hyperparameters = {
            key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))
        }
        accelerator.init_trackers(project_name, config=hyperparameters)
    return accelerator


def layer_depth(parameter_name: str, num_hidden_layers: int) -> int:
    """Depth of a parameter for layer-wise learning-rate decay: 0 for the Input Adaptformer (and a task's adapters
    of it), `i + 1` for Main Body block `i` (and a task's adapters of that block), `num_hidden_layers + 1` for
    everything after the body (its norm, Output Adaptformers, heads)."""
    if "input_adaptformer." in parameter_name or ".input_layers." in parameter_name:
        return 0
    if "main_body.layers." in parameter_name:
        return int(parameter_name.split("main_body.layers.")[1].split(".")[0]) + 1
    if "task_adapters." in parameter_name:
        return int(parameter_name.split("task_adapters.")[1].split(".layers.")[1].split(".")[0]) + 1
    return num_hidden_layers + 1


def create_optimizer(model: torch.nn.Module, args: argparse.Namespace, num_processes: int, layer_decay: float = 1.0):
    """AdamW without weight decay on biases, norms, context embeddings, latents and queries; cosine schedule with
    warm-up. `layer_decay` < 1 scales the learning rate of a parameter at `layer_depth` d by
    `layer_decay ** (num_hidden_layers + 1 - d)` (BEiT's layer-wise decay for fine-tuning a pre-trained model: the
    heads learn at the full rate, the tokenizer slowest).

    The schedule counts `max_steps * num_processes` because accelerate steps a prepared scheduler once per process.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}.")

    def decays(name: str, parameter: torch.nn.Parameter) -> bool:
        return parameter.ndim >= 2 and "context_embeddings" not in name and not name.endswith(("latents", "queries"))

    num_layers = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            depth = layer_depth(name, num_layers) if layer_decay < 1.0 else num_layers + 1
            groups.setdefault((depth, decays(name, parameter)), []).append(parameter)
    optimizer = torch.optim.AdamW(
        [
            {
                "params": parameters,
                "weight_decay": args.weight_decay if decay else 0.0,
                "lr": args.learning_rate * layer_decay ** (num_layers + 1 - depth),
            }
            # Decayed before not decayed at each depth: without layer decay that is the two groups' order of
            # checkpoints saved before layer decay existed, which resuming relies on.
            for (depth, decay), parameters in sorted(groups.items(), key=lambda item: (item[0][0], not item[0][1]))
        ],
        lr=args.learning_rate,
    )
    warmup_steps = round(args.warmup_ratio * args.max_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps * num_processes, args.max_steps * num_processes)
    return optimizer, scheduler


def describe_batch(args: argparse.Namespace, num_processes: int) -> str:
    """The images of one optimizer step, for a model card: per process x processes (x accumulated micro-batches)."""
    factors = [args.batch_size, num_processes] + [args.gradient_accumulation_steps] * (
        args.gradient_accumulation_steps > 1
    )
    total = math.prod(factors)
    return f"{' x '.join(map(str, factors))}{f' = {total}' if len(factors) > 2 else ''} images"


def resolve_budget(accelerator: Accelerator, args: argparse.Namespace, loader: torch.utils.data.DataLoader) -> None:
    """Turn `--num_train_epochs` into `args.max_steps` and print how many epochs of each set the budget gives.

    An epoch is one pass over the whole training pool; with sampling p_i ~ n_i^alpha small sets see more passes of
    their own data than large ones, which the printed table makes visible.
    """
    sampler = loader.batch_sampler
    global_batch = args.batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    if args.num_train_epochs is not None:
        args.max_steps = max(1, math.ceil(args.num_train_epochs * sum(sampler.sizes) / global_batch))
    names = loader.dataset.names
    epochs = [args.max_steps * p * global_batch / n for p, n in zip(sampler.probabilities, sampler.sizes, strict=True)]
    summary = ", ".join(f"{name} {value:.1f}" for name, value in zip(names, epochs, strict=True))
    accelerator.print(f"{args.max_steps} steps of {global_batch} images: epochs per set: {summary}")


def create_ema(
    accelerator: Accelerator, model: torch.nn.Module, decay: float
) -> torch.optim.swa_utils.AveragedModel | None:
    """Exponential moving average of the (unwrapped) weights; None when `decay` is 0. Give it to the
    `CheckpointManager`, which saves and restores it with every checkpoint.

    The decay ramps up as `min(decay, (1 + n) / (10 + n))` after `n` updates (timm's warm-up), so early evaluations
    are not dominated by the random initialisation.
    """
    if decay == 0:
        return None
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("EMA keeps a whole copy of the weights that FSDP shards: pass --ema_decay 0 with FSDP.")

    def average(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        rate = min(decay, (1 + float(num_averaged)) / (10 + float(num_averaged)))
        # The average of an unchanged (frozen) weight stays bit-identical instead of drifting by float rounding.
        return torch.where(averaged == current, averaged, rate * averaged + (1 - rate) * current)

    return torch.optim.swa_utils.AveragedModel(accelerator.unwrap_model(model), avg_fn=average, use_buffers=True)


class FineTuningWithPretexts(torch.nn.Module):
    """A model fine-tuned with the pretext tasks of the pre-training it starts from kept running on unlabeled images,
    through the same encoder (semi-supervised, as S4L: Zhai et al. 2019), so that a few labels do not pull the encoder
    away from what the unlabeled images taught it.

    `checkpoint`'s `MedformerForPreTraining` (its pretext tasks and mask ratio) runs with `model`'s encoder and its own
    decoder and projector, registered here as `pretext_heads`. One module, so that the optimizer, the EMA and the
    checkpoints carry them and one forward computes both losses: DDP needs every parameter a backward reaches to be
    used inside its forward. `exported_state_dict` exports `model`'s weights alone.
    """

    def __init__(self, model: torch.nn.Module, checkpoint: str | os.PathLike):
        super().__init__()
        pretrainer = MedformerForPreTraining.from_pretrained(checkpoint, dtype="float32")
        pretrainer.medformer = model.medformer
        self.model = model
        self.config = model.config
        heads = {"decoder": pretrainer.decoder, "projector": pretrainer.projector}
        self.pretext_heads = torch.nn.ModuleDict({name: head for name, head in heads.items() if head is not None})
        self._pretrainer = (pretrainer,)  # not a submodule: its weights are model's encoder and pretext_heads

    def forward(self, labelled: dict[str, Any], unlabeled: dict[str, torch.Tensor]) -> tuple[Any, Any]:
        """`model(**labelled)` and the pretext tasks' output (`MedformerForPreTrainingOutput`) on `unlabeled`."""
        pretrainer = self._pretrainer[0]
        pretrainer.training = self.training  # its contrastive losses gather across processes in training steps only
        return self.model(**labelled), pretrainer(**unlabeled)


def fine_tuned_model(module: torch.nn.Module) -> torch.nn.Module:
    """The model a (unwrapped) training module fine-tunes: the module itself, or a `FineTuningWithPretexts`' model."""
    return module.model if isinstance(module, FineTuningWithPretexts) else module


def endless_batches(loader: torch.utils.data.DataLoader, start: int = 0):
    """The batches of a `multitask_dataloader`, pass after pass, from the `start`-th on (a resumed run passes the
    number it had drawn, so it draws what the interrupted run would have)."""
    sampler = loader.batch_sampler
    epoch, start_batch = divmod(start, sampler.num_batches)
    while True:
        sampler.set_epoch(epoch, start_batch=start_batch)
        yield from loader
        epoch, start_batch = epoch + 1, 0


def mix_within_tasks(
    pixel_values: torch.Tensor, task_ids: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al. 2018) that only blends images of the same task: returns the mixed images
    `weight * x + (1 - weight) * x[partner]`, `partner` (each sample's random partner of its own task) and `weight`
    ~ Beta(alpha, alpha).

    Score the mixed batch as `weight * loss(labels) + (1 - weight) * loss(labels[partner])` (`multitask_loss` gives
    the second term from the same logits). Within a task, so two images always share a label space and an input shape.
    """
    weight = float(torch.distributions.Beta(alpha, alpha).sample())
    grouped = task_ids.argsort(stable=True)  # the batch's rows, task by task
    # The same groups in the same order, shuffled inside each: row grouped[i] is paired with row shuffled[i].
    shuffled = (task_ids.double() + torch.rand(len(task_ids), device=task_ids.device)).argsort()
    partner = torch.empty_like(grouped)
    partner[grouped] = shuffled
    return weight * pixel_values + (1 - weight) * pixel_values[partner], partner, weight


# ---------------------------------------------------------------------------------------------- checkpoints


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint so a resumed run continues at the same batch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float = -math.inf  # mean validation AUC of the kept checkpoint
    best_accuracy: float = -math.inf  # its mean validation ACC, the tie-break (see `validation_score`)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    def load(self, path: Path) -> None:
        """Read the JSON back, accepting only this class's fields, each a number. States saved before
        `best_accuracy` existed load with its default, so runs started by earlier versions resume."""
        saved = json.loads(path.read_text())
        names = {field.name for field in fields(self)}
        if not isinstance(saved, dict) or not names - {"best_accuracy"} <= set(saved) <= names:
            raise ValueError(f"{path} is not a training state: expected the keys {sorted(names)}.")
        for name, value in saved.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{path}: {name} must be a number, got {value!r}.")
            setattr(self, name, value)


class RunRefused(ValueError):
    """A checkpoint that this command line cannot continue; `refusals_in_one_line` prints it as argparse's errors."""


def refusals_in_one_line(main: Callable[[], None]) -> Callable[[], None]:
    """Wrap a script's `main`: a `RunRefused` found after start-up (at resume) ends the run with one line, not a
    traceback, like the command-line errors found before it."""

    @wraps(main)
    def run() -> None:
        try:
            main()
        except RunRefused as error:
            raise SystemExit(f"{Path(sys.argv[0]).name}: error: {error}") from None

    return run


def checkpoints_in(directory: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in a run's checkpoint folder, oldest first (saves in progress have another name)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        path for path in directory.iterdir() if path.is_dir() and path.name.startswith(CheckpointManager.prefix)
    )


class CheckpointManager:
    """`accelerator.save_state` into `<dir>/step_<n>`, written under a temporary name and renamed when complete, so
    a kill mid-write leaves the previous checkpoint as the latest usable one. Keeps the newest `total_limit`.

    Nothing is unpickled from a checkpoint folder: accelerate writes the model as safetensors and reads the optimizer,
    scheduler and RNG states with `weights_only=True`; the training state and the EMA weights are written here as
    `train_state.json` and `ema.safetensors` (accelerate would pickle registered objects and read them back with
    `weights_only=False`, so a crafted folder could run code).
    """

    prefix = "step_"
    state_file = "train_state.json"
    ema_file = "ema.safetensors"
    arguments_file = "run_arguments.json"

    def __init__(
        self,
        accelerator: Accelerator,
        directory: str | os.PathLike,
        total_limit: int,
        state: TrainState,
        ema: torch.optim.swa_utils.AveragedModel | None = None,
        arguments: dict[str, Any] | None = None,
    ):
        """`arguments` (`run_arguments(args, num_processes)`): saved with every checkpoint; a resume with other values
        is refused, since the optimizer, schedule and data order come back from the checkpoint whatever the new flags
        say."""
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.total_limit = total_limit
        self.state = state
        self.ema = ema
        self.arguments = arguments

    @classmethod
    def for_run(
        cls,
        accelerator: Accelerator,
        args: argparse.Namespace,
        state: TrainState,
        ema: torch.optim.swa_utils.AveragedModel | None = None,
    ) -> CheckpointManager:
        """A script's manager: `<output_dir>/checkpoints`, `--checkpoints_total_limit`, the run's arguments and script
        recorded."""
        directory = Path(args.output_dir) / "checkpoints"
        arguments = {**run_arguments(args, accelerator.num_processes), "script": Path(sys.argv[0]).name}
        return cls(accelerator, directory, args.checkpoints_total_limit, state, ema, arguments=arguments)

    def complete(self) -> list[Path]:
        return checkpoints_in(self.directory)

    def latest(self) -> Path | None:
        checkpoints = self.complete()
        return checkpoints[-1] if checkpoints else None

    def save(self, step: int) -> Path:
        final = self.directory / f"{self.prefix}{step:08d}"
        partial = self.directory / f".partial-{final.name}"
        if self.accelerator.is_main_process:
            for abandoned in self.directory.glob(".partial-*"):  # a killed save's leftovers, this one's included
                shutil.rmtree(abandoned, ignore_errors=True)
            partial.parent.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.state.save(partial / self.state_file)
            if self.arguments is not None:
                (partial / self.arguments_file).write_text(json.dumps(self.arguments, indent=2))
            if self.ema is not None:
                weights = {key: value.detach().cpu().contiguous() for key, value in self.ema.state_dict().items()}
                save_file(weights, partial / self.ema_file)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in self.complete()[: -self.total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def resume(self, spec: str | None) -> Path | None:
        """Load `spec` ('latest' or a folder) into the accelerator's registered objects; None when starting fresh."""
        if spec is None:  # a fresh start keeps no checkpoint of an earlier run (--overwrite_output_dir)
            if self.accelerator.is_main_process:
                shutil.rmtree(self.directory, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            return None
        path = self.latest() if spec == "latest" else Path(spec)
        if path is None:
            self.accelerator.print(f"no checkpoint in {self.directory} yet: starting from scratch")
            return None
        pickles = sorted(file.name for file in path.glob("custom_checkpoint_*.pkl"))
        if pickles:
            raise RunRefused(
                f"{path} carries pickled objects {pickles}, which are never loaded (unpickling them could run code); "
                "it was not written by this version of medformer-hf. Start a new run, or remove them if you wrote them."
            )
        expected = [self.state_file] + ([self.ema_file] if self.ema is not None else [])
        missing = [name for name in expected if not (path / name).is_file()]
        if missing:
            hint = " (pass --ema_decay 0 if the run had no EMA)" if self.ema_file in missing else ""
            raise RunRefused(f"{path} is not a checkpoint of this run: it lacks {', '.join(missing)}{hint}.")
        self.check_arguments(path)
        self.accelerator.load_state(str(path))
        self.state.load(path / self.state_file)
        if self.ema is not None:
            # Read on the CPU and copied into the EMA's tensors: a CPU process's device reads "cpu:0" under
            # several processes, which safetensors refuses.
            self.ema.load_state_dict(load_file(path / self.ema_file))
        return path

    def check_arguments(self, path: Path) -> None:
        """Refuse to resume `path` with arguments other than its run's. Checkpoints from before arguments were
        recorded resume unchecked, and only the flags both versions have are compared (a flag added or removed by an
        upgrade between the two runs has no value to compare on one side)."""
        record = path / self.arguments_file
        if self.arguments is None or not record.is_file():
            return
        saved = json.loads(record.read_text())
        now = json.loads(json.dumps(self.arguments))  # as JSON reads it back (tuples -> lists)
        if saved.get("script", now.get("script")) != now.get("script"):  # checkpoints before 2026-12-04 have none
            raise RunRefused(
                f"{path} is a checkpoint of {saved['script']}, not of {now['script']}: resume it with "
                f"{saved['script']}, or start a new run (--init_from a model folder to start from its weights)."
            )
        changed = [
            f"--{name} {saved[name]!r} -> {now[name]!r}"
            for name in sorted(set(saved) & set(now))
            if saved[name] != now[name]
        ]
        if changed:
            raise RunRefused(
                f"{path} was saved by a run with other arguments ({'; '.join(changed)}): the optimizer, schedule and "
                "data order would come back as they were. Resume with the run's own arguments, or start a new run in "
                "another --output_dir (--init_from a model folder to start from its weights)."
            )


# Arguments a resumed run may change: where things are read and written and how progress is reported, not what is
# trained (the token is never written down).
RESUME_MAY_CHANGE = (
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "output_dir",
    "data_dir",
    "num_workers",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "report_to",
    "push_to_hub",
    "hub_model_id",
    "hub_token",
    "hub_private_repo",
)


def run_arguments(args: argparse.Namespace, num_processes: int) -> dict[str, Any]:
    """What a script's checkpoints record of its arguments (for `CheckpointManager`): all but `RESUME_MAY_CHANGE`,
    and the process count (accelerate's `--num_processes`), which sets the global batch and the schedule's length."""
    recorded = {name: value for name, value in vars(args).items() if name not in RESUME_MAY_CHANGE}
    return dict(sorted({**recorded, "num_processes": num_processes}.items()))


def exported_state_dict(
    accelerator: Accelerator, model: torch.nn.Module, ema: torch.optim.swa_utils.AveragedModel | None
) -> dict[str, torch.Tensor] | None:
    """The weights to export, whole, of the fine-tuned model alone (`fine_tuned_model`); call it on every process
    (under FSDP gathering the shards is collective). None with EMA: `fine_tuned_model(ema.module)` is an ordinary
    module that `save_pretrained` reads itself."""
    if ema is not None:
        return None
    weights = accelerator.get_state_dict(model)
    if not isinstance(accelerator.unwrap_model(model), FineTuningWithPretexts):
        return weights
    return {name.removeprefix("model."): tensor for name, tensor in weights.items() if name.startswith("model.")}


# Files of a model folder that describe the weights they were written with (the card, evaluate.py's metrics).
DESCRIBES_OLD_WEIGHTS = (
    "README.md",
    "metrics.json",
    "metrics.md",
    TEST_TIME_FLIPS_FOLDER,
    "confusion_matrices",
    "validation_metrics.json",
    "validation_metrics.md",
    "old_tasks_validation.md",
) + tuple(split for split in EVALUATION_SPLITS if split != "test")


def carry_best_model(
    accelerator: Accelerator, resumed: Path | None, output_dir: str | os.PathLike, state: TrainState, max_steps: int
) -> None:
    """A run resumed from a checkpoint outside `output_dir` remembers its best validation score so far, but the model
    with that score is in the run's own folder: copy it (without checkpoints and logs) into `output_dir`. Where that
    model is not there for this checkpoint (a copied checkpoint folder, or the run went on and exported a later one),
    forget the score instead, so the next validation exports a model; a finished run has none left, so it is refused.
    """
    output_dir = Path(output_dir)
    source = resumed.parent.parent.resolve() if resumed is not None else None
    move = source is not None and source != output_dir.resolve() and not (output_dir / "config.json").is_file()
    accelerator.wait_for_everyone()  # every process has decided before the main one writes
    if not move:
        return
    kept = source / "validation_metrics.json"
    kept_step = json.loads(kept.read_text()).get("step") if kept.is_file() else None
    in_its_run = resumed.parent.name == "checkpoints" and (source / "config.json").is_file()
    if in_its_run and kept_step is not None and kept_step <= state.step:
        if accelerator.is_main_process:
            shutil.copytree(
                source, output_dir, ignore=shutil.ignore_patterns("checkpoints", "runs"), dirs_exist_ok=True
            )
    elif state.step < max_steps:
        accelerator.print(f"the best model of {resumed}'s run is not beside it: the next validation exports one")
        state.best_metric = state.best_accuracy = -math.inf
    else:
        raise RunRefused(
            f"{resumed} ends its run, and the best model of that run is not beside it, so {output_dir} would end "
            "without a model: resume in the run's own folder, or start a new run with --init_from <a model folder>."
        )
    accelerator.wait_for_everyone()


def export_model_folder(folder: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Write the Hub-ready model folder complete-or-absent (call on the main process only).

    `write` fills a temporary folder inside `folder`; then its files replace the folder's, with `config.json` removed
    first and put back last. A kill at any point leaves the previous complete model, or no loadable model (no
    `config.json`): never new weights beside an old processor, card or test metrics that look finished (the card and
    metrics of earlier weights are removed unless `write` replaces them).
    """
    folder = Path(folder)
    partial = folder / EXPORT_PARTIAL
    shutil.rmtree(partial, ignore_errors=True)  # what a killed export left
    partial.mkdir(parents=True)
    write(partial)
    (folder / "config.json").unlink(missing_ok=True)
    for name in DESCRIBES_OLD_WEIGHTS:  # an earlier card or test metrics must not sit beside new weights
        old = folder / name
        if (partial / name).exists():
            continue
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink(missing_ok=True)
    for entry in sorted(partial.iterdir(), key=lambda entry: entry.name == "config.json"):  # config.json last
        target = folder / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    partial.rmdir()


# Config fields that only act during training: models that differ in them alone can still be averaged.
TRAINING_ONLY_FIELDS = ("drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob")
# Config fields that record the input sizes of the weights; a config from before they were recorded has None.
RECORDED_INPUT_SIZES = ("image_size_2d", "image_size_3d")


def average_weights(models: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the weights of models of one architecture (a "uniform model soup", Wortsman et al.
    2022): fine-tunes of one pre-training with other seeds or settings often average to a better model than each.

    Raises ValueError when the models cannot be averaged: fewer than two, other classes, configs that differ beyond
    `TRAINING_ONLY_FIELDS` (architecture, tasks, labels), or integer buffers that differ.
    """
    if len(models) < 2:
        raise ValueError(f"averaging needs at least two models, got {len(models)}.")
    first = models[0]
    ignored = {"_name_or_path", "transformers_version", *TRAINING_ONLY_FIELDS}
    reference = {key: value for key, value in first.config.to_dict().items() if key not in ignored}
    for index, model in enumerate(models[1:], start=1):
        if type(model) is not type(first):
            raise ValueError(f"model {index} is a {type(model).__name__}, model 0 a {type(first).__name__}.")
        config = {key: value for key, value in model.config.to_dict().items() if key not in ignored}
        differing = sorted(
            key
            for key in reference.keys() | config.keys()
            if reference.get(key) != config.get(key)
            and not (key in RECORDED_INPUT_SIZES and None in (reference.get(key), config.get(key)))  # not recorded
        )
        if differing:
            raise ValueError(
                f"model {index}'s config differs from model 0's in {differing}: only fine-tunes of one architecture "
                f"and task set can be averaged (they may differ in {list(TRAINING_ONLY_FIELDS)})."
            )
    states = [model.state_dict() for model in models]
    averaged = {}
    for name, tensor in states[0].items():
        values = [state[name] for state in states]
        if tensor.is_floating_point():
            averaged[name] = torch.stack([value.float() for value in values]).mean(0).to(tensor.dtype)
        elif all(torch.equal(value, tensor) for value in values):
            averaged[name] = tensor.clone()
        else:
            raise ValueError(f"the integer buffer {name} differs between the models; it has no average.")
    return averaged


def greedy_soup(
    models: list[torch.nn.Module], score: Callable[[dict[str, torch.Tensor]], float]
) -> tuple[list[int], dict[str, torch.Tensor], float]:
    """Wortsman et al. 2022's greedy soup: the models in order of their own score (higher is better, e.g. mean
    validation AUC), each kept in the average only if the average's score does not drop. Unlike the uniform average
    it is never below the best single model on the score it was chosen by.

    Returns the indices of the models kept (best first), their averaged weights (new tensors) and its score. Raises
    ValueError as `average_weights` does, for every model, whether or not it would be kept. `score` must leave the
    models' weights unchanged.
    """
    average_weights(models)  # a clear ValueError for incompatible models before any scoring pass
    own_scores = [score(model.state_dict()) for model in models]
    order = sorted(range(len(models)), key=own_scores.__getitem__, reverse=True)
    best_weights = {name: tensor.detach().clone() for name, tensor in models[order[0]].state_dict().items()}
    kept, weights, best = [order[0]], best_weights, own_scores[order[0]]
    for index in order[1:]:
        candidate = average_weights([models[i] for i in [*kept, index]])
        candidate_score = score(candidate)
        if candidate_score >= best:
            kept, weights, best = [*kept, index], candidate, candidate_score
    return kept, weights, best


# ---------------------------------------------------------------------------------------------- training loop


def train(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    checkpoints: CheckpointManager,
    args: argparse.Namespace,
    compute_loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]],
    on_checkpoint: Callable[[int], None] | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
) -> None:
    """Run optimizer steps until `args.max_steps`, checkpointing every `args.checkpointing_steps`; update `ema`
    (see `create_ema`) after every optimizer step.

    `loader` must use a `TaskBatchSampler` (its epoch and start batch are set here, so a resumed run reads exactly the
    batches the interrupted one would have). `compute_loss(model, batch)` returns the loss and extra scalars to log.

    A run without a checkpoint of its own (a fresh one, or one resumed from another folder's checkpoint, whose best
    model `carry_best_model` brought along) first saves its state: `on_checkpoint` may export a model before the first
    periodic checkpoint is written, and a folder holding a model but no checkpoint is refused as a run to continue.
    """
    if checkpoints.latest() is None:
        checkpoints.save(state.step)
    sampler = loader.batch_sampler
    progress = tqdm(total=args.max_steps, initial=state.step, disable=not accelerator.is_local_main_process)
    model.train()
    while state.step < args.max_steps:
        sampler.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
        for batch in loader:
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            with accelerator.accumulate(model):
                loss, scalars = compute_loss(model, batch)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"loss became {loss.item()} at step {state.step}; lower --learning_rate.")
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:  # clipping to 0 would zero every step
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            if ema is not None:
                ema.update_parameters(accelerator.unwrap_model(model))
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            accelerator.log(
                {"train/loss": loss.item(), "train/lr": max(scheduler.get_last_lr()), **scalars}, step=state.step
            )
            if state.step % args.checkpointing_steps == 0 or state.step == args.max_steps:
                if on_checkpoint is not None:
                    on_checkpoint(state.step)
                checkpoints.save(state.step)
            if state.step >= args.max_steps:
                break
        else:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    progress.close()


# ---------------------------------------------------------------------------------------------- evaluation


def validation_score(metrics: dict[str, dict[str, float]]) -> tuple[float, float]:
    """What fine-tuning keeps a checkpoint on: the mean validation AUC over the sets, ties broken by the mean ACC.

    Without the tie-break a saturated AUC (OrganMNIST3D reaches 1.0 early) keeps the first checkpoint to reach it,
    however much its accuracy improves afterwards."""
    return (
        float(np.mean([values["auc"] for values in metrics.values()])),
        float(np.mean([values["acc"] for values in metrics.values()])),
    )


def head_mismatch(config: MedformerConfig, task: str) -> str | None:
    """Why MedMNIST's metric cannot read the model's head for MedMNIST set `task`; None when it can.

    A head is read with the model's own task type (a RetinaMNIST head trained as 5-way multiclass has 5 logits, not 4
    cumulative ones); every single-label type gives per-class probabilities, so only the label space must match."""
    spec, catalogue = config.tasks[task], CATALOGUE[task]
    multilabel = catalogue.task_type == "multilabel"
    if spec["type"] != "regression" and (spec["type"] == "multilabel") == multilabel:
        if spec["num_labels"] == len(catalogue.labels):
            return None
    return (
        f"the model's task {task!r} is {spec['type']} with {spec['num_labels']} labels, but MedMNIST's {task} is "
        f"{catalogue.task_type} with {len(catalogue.labels)} labels: MedMNIST's metric cannot read its scores (score "
        "it on your own data with `task_probabilities`)."
    )


def scorable_tasks(config: MedformerConfig, size: int, data_dir: str | os.PathLike | None) -> dict[str, list[str]]:
    """The model's tasks `evaluate_tasks` can score here, under "scored", and the others by why they are not: not a
    MedMNIST set, no local file of that size, or a head whose label space is not the set's (`head_mismatch`)."""
    groups = {
        "scored": [],
        "that are not MedMNIST sets": [],
        "without a local MedMNIST file": [],
        "whose head MedMNIST's metric cannot read": [],
    }
    for name in config.tasks:
        if name not in CATALOGUE:
            groups["that are not MedMNIST sets"].append(name)
        elif head_mismatch(config, name):
            groups["whose head MedMNIST's metric cannot read"].append(name)
        elif not find_local(CATALOGUE[name], size, data_dir):
            groups["without a local MedMNIST file"].append(name)
        else:
            groups["scored"].append(name)
    return groups


@torch.no_grad()
def predict(
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataset: MultiTaskDataset,
    collator: MedformerCollator,
    task: str,
    batch_size: int,
    test_time_flips: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class scores and labels of every sample of a one-task dataset, each counted once across processes, from a
    multi-task model's head for `task` or a single-task classifier of that task.

    With `test_time_flips` the scores are the mean probabilities over every combination of the flips the catalogue
    declares label-safe for the task (up to 8 views of a 3D volume; sets without safe flips get one view).
    """
    unwrapped = accelerator.unwrap_model(model)
    config = unwrapped.config
    problem = head_mismatch(config, task)
    if problem:
        raise ValueError(problem[0].upper() + problem[1:])
    spec = config.tasks[task]

    def probabilities_of(pixels: torch.Tensor, metadata: dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(unwrapped, MedformerForImageClassification):  # class logits, no task= to pass
            return classifier_probabilities(model(pixels, **metadata).logits.float(), config)
        logits = model(pixels, task=task, **metadata).logits.float()
        return task_probabilities(logits, spec["type"], spec["num_labels"])

    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(dataset), batch_size, drop_last=False)
    # Its own generator: starting an iterator would otherwise draw from the global torch RNG, so a validation would
    # change the augmentations after it, and how often a run validates would change the weights it ends with.
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collator, generator=torch.Generator()
    )
    loader = accelerator.prepare(loader)
    flips = CATALOGUE[task].augmentation.flip_combinations() if test_time_flips else [()]
    scores, labels = [], []
    was_training = model.training
    model.eval()
    # On a terminal only (disable=None): in a log file the nested bar's cursor codes would garble the lines around it.
    bar = None if accelerator.is_main_process else True
    for batch in tqdm(loader, desc=f"evaluating {task}", leave=False, disable=bar):
        metadata = {"modality_ids": batch["modality_ids"], "body_part_ids": batch["body_part_ids"]}
        probabilities = mean_over_flips(batch["pixel_values"], flips, partial(probabilities_of, metadata=metadata))
        gathered = accelerator.gather_for_metrics((probabilities, batch["labels"]))
        scores.append(gathered[0].cpu().numpy())
        labels.append(gathered[1].cpu().numpy())
    model.train(was_training)
    return np.concatenate(scores), np.concatenate(labels)


def evaluate_tasks(
    accelerator: Accelerator,
    model: torch.nn.Module,
    datasets: dict[str, MultiTaskDataset],
    collators: dict[str, MedformerCollator],
    batch_size: int,
    test_time_flips: bool = False,
) -> tuple[dict[str, dict[str, float]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """MedMNIST ACC/AUC per dataset (with the shipped `evaluate` metric) and the raw (scores, labels)."""
    metrics, predictions = {}, {}
    for name, dataset in datasets.items():
        scores, labels = predict(accelerator, model, dataset, collators[name], name, batch_size, test_time_flips)
        metrics[name] = {**medmnist_metrics(scores, labels, CATALOGUE[name].task_type), "samples": len(labels)}
        predictions[name] = (scores, labels)
    return metrics, predictions
