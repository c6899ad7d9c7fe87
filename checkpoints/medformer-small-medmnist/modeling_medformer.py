"""Medformer: one network for 2D and 3D medical images and many tasks.

    pixel_values -> InputAdaptformer (patches + coordinates, latents read them under a context embedding)
                 -> MainBody (self-attention over the latents)
                 -> OutputAdaptformer (each task's queries read the latents) -> task head

This file is shipped with every checkpoint (Hub remote code): it imports only torch, transformers and the sibling
`configuration_medformer.py`, never the `medformer_hf` package.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import ModelOutput
from transformers.utils import logging as hf_logging
from transformers.utils.generic import can_return_tuple

from .configuration_medformer import TASK_TYPES, UNSPECIFIED_ID, MedformerConfig, num_task_outputs

logger = hf_logging.get_logger(__name__)

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"Medformer needs transformers>=5, found {transformers.__version__}: pip install -U transformers")


# ---------------------------------------------------------------------------------------------------------- outputs


@dataclass
class MedformerModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_latents, hidden_size)`):
            The Main Body's latents, after its final LayerNorm.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Mean of `last_hidden_state` over the latents.
        context_embedding (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Sum of the dimensionality, modality and body-part embeddings that conditioned the latents.
        mask (`torch.FloatTensor` of shape `(batch_size, num_patches)`, *optional*):
            1 for patch tokens that were dropped before the Input Adaptformer, 0 for kept ones (masking only).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Latents after the Input Adaptformer and after each Main Body layer.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Attention weights of each Input Adaptformer block (latents x patches) and each Main Body layer.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    context_embedding: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MedformerMultiTaskOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Mean over the batch of each sample's task loss (returned when `labels` is given).
        logits (`torch.FloatTensor` of shape `(batch_size, num_outputs)`, *optional*):
            Raw logits when the task is given by name (or the model has one task); per-sample task ids, even all of
            one task, give `task_logits` only, so the output's fields do not depend on the batch.
        task_logits (`dict[str, torch.FloatTensor]`, *optional*):
            Logits per task present in the batch, each for the samples listed in `task_indices`.
        task_indices (`dict[str, torch.LongTensor]`, *optional*):
            Batch positions of each task's samples.
        task_losses (`dict[str, torch.FloatTensor]`, *optional*):
            Mean loss of each task present in the batch.
        pooler_output, hidden_states, attentions:
            As in [`MedformerModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    task_logits: dict[str, torch.FloatTensor] | None = None
    task_indices: dict[str, torch.LongTensor] | None = None
    task_losses: dict[str, torch.FloatTensor] | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MedformerForPreTrainingOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`):
            Weighted sum of the pretext losses (`config.ssl_loss_weights`).
        reconstruction_loss (`torch.FloatTensor` of shape `()`):
            Mean squared error on the masked patches (normalised per patch when `config.norm_pix_loss`).
        agreement_loss (`torch.FloatTensor` of shape `()`, *optional*):
            InfoNCE loss between the two masked views of each image (`"view_agreement"`).
        slice_consistency_loss (`torch.FloatTensor` of shape `()`, *optional*):
            InfoNCE loss between each 3D volume and one of its own 2D slices (`"slice_consistency"`, 3D batches).
        logits (`torch.FloatTensor` of shape `(batch_size, num_patches, channels * patch_size**spatial_dims)`):
            Predicted patches of the first view, in the target's space (see `MedformerForPreTraining.reconstruct`).
        mask (`torch.FloatTensor` of shape `(batch_size, num_patches)`):
            1 where the first view's patch was masked.
        hidden_states, attentions:
            As in [`MedformerModelOutput`], for both views stacked on the batch axis.
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    agreement_loss: torch.FloatTensor | None = None
    slice_consistency_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ---------------------------------------------------------------------------------------------------------- helpers


def embedding_key(spatial_dims: int, num_channels: int) -> str:
    """Name of the patch embedding (and pixel decoder) for one kind of input, e.g. `"3d_1ch"`."""
    return f"{spatial_dims}d_{num_channels}ch"


def patch_size_for(config: MedformerConfig, spatial_dims: int) -> int:
    return config.patch_size_2d if spatial_dims == 2 else config.patch_size_3d


def fourier_position_features(
    grid_shape: tuple[int, ...], num_bands: int, max_frequency: float, device: torch.device
) -> torch.Tensor:
    """Fourier features of patch-centre coordinates in [-1, 1]: `(prod(grid_shape), 3 * (2 * num_bands + 1))`.

    Coordinates are relative to the image extent, so any size works without interpolation. 2D grids get a depth
    coordinate of 0, so 2D and 3D share one feature space.
    """
    axes = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n * 2 - 1 for n in grid_shape]
    axes = [torch.zeros(1, device=device)] * (3 - len(axes)) + axes
    coordinates = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3, 1)
    frequencies = torch.linspace(1.0, max_frequency / 2, num_bands, device=device)
    angles = math.pi * coordinates * frequencies
    return torch.cat([coordinates, angles.sin(), angles.cos()], dim=-1).flatten(1)


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(B, C, *spatial)` -> `(B, num_patches, patch_size**dims * C)`, patches in the patch embedding's order."""
    batch_size, channels, *spatial = pixel_values.shape
    dims = len(spatial)
    grid = [size // patch_size for size in spatial]
    split = [value for g in grid for value in (g, patch_size)]
    patches = pixel_values.reshape(batch_size, channels, *split)
    order = [0, *range(2, 2 + 2 * dims, 2), *range(3, 3 + 2 * dims, 2), 1]
    return patches.permute(order).reshape(batch_size, math.prod(grid), patch_size**dims * channels)


def unpatchify(patches: torch.Tensor, image_shape: tuple[int, ...], patch_size: int) -> torch.Tensor:
    """Inverse of `patchify`: `(B, num_patches, patch_size**dims * C)` -> `(B, C, *spatial)` of `image_shape`."""
    batch_size, channels, *spatial = image_shape
    dims = len(spatial)
    grid = [size // patch_size for size in spatial]
    patches = patches.reshape(batch_size, *grid, *([patch_size] * dims), channels)
    order = [0, 1 + 2 * dims, *[value for i in range(dims) for value in (1 + i, 1 + dims + i)]]
    return patches.permute(order).reshape(batch_size, channels, *spatial)


def pixel_mask(mask: torch.Tensor, image_shape: tuple[int, ...], patch_size: int) -> torch.Tensor:
    """Patch mask `(B, num_patches)` -> a `(B, 1, *spatial)` pixel mask (1 inside masked patches)."""
    patches = mask[..., None].expand(-1, -1, patch_size ** (len(image_shape) - 2))
    return unpatchify(patches, (image_shape[0], 1, *image_shape[2:]), patch_size)


def block_noise(batch_size: int, grid: tuple[int, ...], unit: int, device: torch.device) -> torch.Tensor:
    """Masking noise `(B, num_patches)` that orders whole blocks of `unit` patches per axis: every patch of a block
    sorts before every patch of a later block, so blocks are kept or dropped together (at most one block is split,
    at random within it). Blocks at the far edges of a grid that `unit` does not divide are smaller."""
    coarse = tuple(math.ceil(size / unit) for size in grid)
    ranks = torch.rand(batch_size, math.prod(coarse), device=device).argsort(dim=1).argsort(dim=1).float()
    ranks = ranks.view(batch_size, *coarse)
    for axis, size in enumerate(grid, start=1):
        ranks = ranks.repeat_interleave(unit, dim=axis).narrow(axis, 0, size)
    return ranks.flatten(1) + torch.rand(batch_size, math.prod(grid), device=device)  # integer rank + tie-break


def random_masking(
    batch_size: int,
    grid: tuple[int, ...],
    mask_ratio: float,
    noise: torch.Tensor | None,
    device: torch.device,
    unit: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the patches of a `grid` to keep (lowest noise first, as in ViTMAE). Returns `(keep_indices, mask)`;
    mask 1 = dropped. `unit` > 1 masks blocks of `unit` patches per axis (`block_noise`).

    Pass `noise` of shape `(batch_size, num_patches)` for a reproducible mask (it then decides alone).
    """
    num_patches = math.prod(grid)
    if noise is None:  # unit 1: ViTMAE's one draw per patch (block_noise: same mask distribution, other draws)
        noise = (
            torch.rand(batch_size, num_patches, device=device)
            if unit == 1
            else block_noise(batch_size, grid, unit, device)
        )
    elif noise.shape != (batch_size, num_patches):
        raise ValueError(f"noise must have shape {(batch_size, num_patches)}, got {tuple(noise.shape)}.")
    num_keep = max(1, int(num_patches * (1 - mask_ratio)))
    keep_indices = noise.argsort(dim=1)[:, :num_keep]
    mask = torch.ones(batch_size, num_patches, device=device)
    mask.scatter_(1, keep_indices, 0.0)
    return keep_indices, mask


class GatherRows(torch.autograd.Function):
    """Every process's rows in rank order (`all_gather`), with gradients: each process's rows get the sum of their
    gradients over the processes that used them (an `all_reduce`, which gloo and NCCL both have)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.contiguous()
        counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, torch.tensor([len(rows)], device=rows.device))
        if len({int(count) for count in counts}) > 1:
            raise ValueError(
                f"The contrastive pretexts need batches of one size on every process, got {[int(c) for c in counts]}: "
                "use the package's TaskBatchSampler (examples/pretrain.py does) or equal per-process batches."
            )
        gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, rows)
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        gradient = gradient.contiguous().clone()
        dist.all_reduce(gradient)
        return gradient.chunk(dist.get_world_size())[dist.get_rank()]


def info_nce(
    first: torch.Tensor, second: torch.Tensor, temperature: float, across_processes: bool = False
) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `first` must pick row i of `second` among the batch, and vice versa.

    `across_processes` (a training step, which every process runs in step): in a process group of several processes
    the candidates are every process's rows, gathered with gradients, as in SimCLR, so the loss and the DDP-averaged
    gradients are those of one process with the whole global batch. Otherwise (previews and evaluation, which may run
    on one process only) each process scores its own rows.
    """
    first, second = F.normalize(first, dim=-1), F.normalize(second, dim=-1)
    candidates_first, candidates_second, offset = first, second, 0
    if across_processes and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # One gather (and one batch-size check) for both sides: the rows are pairs.
        candidates_first, candidates_second = GatherRows.apply(torch.stack([first, second], dim=1)).unbind(1)
        offset = dist.get_rank() * first.shape[0]  # the processes' batches are of one size (checked)
    targets = torch.arange(first.shape[0], device=first.device) + offset
    return (
        F.cross_entropy(first @ candidates_second.T / temperature, targets)
        + F.cross_entropy(second @ candidates_first.T / temperature, targets)
    ) / 2


def random_slices(volumes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One 2D slice of each `(B, C, D, H, W)` volume: along one axis drawn for the batch, at an index drawn per volume
    from the middle half of that axis (the outer slices of MedMNIST volumes are mostly background). `(B, C, *plane)`."""
    axis = int(torch.randint(0, 3, (), generator=generator))
    length = volumes.shape[2 + axis]
    low = length // 4
    indices = torch.randint(low, max(length - low, low + 1), (volumes.shape[0],), generator=generator)
    moved = volumes.movedim(2 + axis, 2)
    return moved[torch.arange(volumes.shape[0], device=volumes.device), :, indices.to(volumes.device)]


def fill_unspecified(ids: torch.Tensor | None, defaults: torch.Tensor) -> torch.Tensor:
    """Metadata ids with what the caller did not give (None, or `UNSPECIFIED_ID` per sample) taken from `defaults`."""
    if ids is None:
        return defaults
    if not isinstance(ids, torch.Tensor) or ids.shape != defaults.shape:
        return ids  # left for `check_inputs` to refuse with a clear message
    return torch.where(ids == UNSPECIFIED_ID, defaults.to(ids.device), ids)


def _check_ids(ids: torch.Tensor | None, name: str, vocabulary: list[str], batch_size: int, device) -> torch.Tensor:
    """Validated ids; not given (None or `UNSPECIFIED_ID`) is "unknown" (0) here, where no task says otherwise."""
    if ids is None:
        return torch.zeros(batch_size, dtype=torch.long, device=device)
    if not isinstance(ids, torch.Tensor) or ids.shape != (batch_size,) or ids.is_floating_point():
        got = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be an integer tensor of shape ({batch_size},), got {got}.")
    ids = fill_unspecified(ids.long(), torch.zeros_like(ids, dtype=torch.long))
    if not torch.compiler.is_compiling() and ((ids < 0) | (ids >= len(vocabulary))).any():
        raise ValueError(
            f"{name} has ids outside 0..{len(vocabulary) - 1} (vocabulary {vocabulary}; {UNSPECIFIED_ID} = not "
            "given); map names to ids with the image processor or the config's vocabulary."
        )
    return ids


def require_tensor(pixel_values: Any) -> None:
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(
            f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}; the image processor makes one."
        )


def record_size_when_trained(config: MedformerConfig, pixel_values: torch.Tensor, output: torch.Tensor) -> None:
    """Record the input size of a forward in `config` (`image_size_2d` / `image_size_3d`) once its `output` is
    back-propagated: the weights then learn at that size, so a checkpoint saved by any training loop (Trainer's too)
    knows it, `MedformerImageProcessor.from_model_config` resizes to it, and the model warns away from it. A forward
    without a backward (a shape check in training mode) records nothing."""
    dims, spatial = pixel_values.ndim - 2, list(pixel_values.shape[2:])
    name = f"image_size_{dims}d"
    if torch.compiler.is_compiling() or not output.requires_grad or list(getattr(config, name) or []) == spatial:
        return

    def record(grad: torch.Tensor) -> None:
        if list(getattr(config, name) or []) != spatial:
            logger.info(f"Trained at {dims}D input size {tuple(spatial)}: recorded as config.{name}.")
            setattr(config, name, spatial)

    output.register_hook(record)


def check_inputs(
    config: MedformerConfig,
    pixel_values: torch.Tensor,
    modality_ids: torch.Tensor | None,
    body_part_ids: torch.Tensor | None,
    dtype: torch.dtype,
    training: bool = False,
    check_size: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raise a ValueError that names the problem and the fix; return `pixel_values` in the model's `dtype` (as
    transformers' vision models cast them) and the (defaulted) metadata ids.

    An input of another size than the recorded training size (`config.image_size_2d` / `image_size_3d`) is warned
    about once, unless `training` (a forward that may train: `record_size_when_trained` records it if it does) or
    not `check_size` (an auxiliary input, such as pre-training's 2D slices of volumes).
    """
    require_tensor(pixel_values)
    if pixel_values.ndim not in (4, 5):
        raise ValueError(
            f"pixel_values must be (batch, channels, height, width) for 2D or (batch, channels, depth, height, width) "
            f"for 3D, got rank {pixel_values.ndim} with shape {tuple(pixel_values.shape)}. Add the batch/channel axis."
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be floating point, got {pixel_values.dtype}; rescale images with the image processor."
        )
    dims = pixel_values.ndim - 2
    channels = pixel_values.shape[1]
    supported = config.input_channels_2d if dims == 2 else config.input_channels_3d
    if channels not in supported:
        raise ValueError(
            f"This Medformer has no {dims}D patch embedding for {channels}-channel input (it has {supported}). "
            f"Convert the image to one of those channel counts, or build the config with {channels} in "
            f"`input_channels_{dims}d` (and train that embedding)."
        )
    patch_size = patch_size_for(config, dims)
    spatial = tuple(pixel_values.shape[2:])
    if any(size < patch_size or size % patch_size for size in spatial):
        raise ValueError(
            f"Spatial size {spatial} is not a multiple of the {dims}D patch size {patch_size}; resize or pad each "
            f"axis to a multiple of {patch_size} (the image processor resizes with size_{dims}d=[...]; the one saved "
            "with a trained checkpoint records its training size)."
        )
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values holds no images (batch size 0); skip empty batches before the model.")
    trained = config.image_size_2d if dims == 2 else config.image_size_3d
    if check_size and not training and trained is not None and list(trained) != list(spatial):
        # Any size runs, but a checkpoint is accurate at the size it learned (the released one: OrganMNIST3D test
        # ACC 0.95 at 28^3, 0.47 at 64^3), so say so once instead of answering worse in silence.
        logger.warning_once(
            f"{dims}D input of spatial size {spatial}, but this model was trained at {tuple(trained)} "
            f"(config.image_size_{dims}d): expect lower accuracy. Prepare images with the processor saved with the "
            "model (MedformerImageProcessor.from_pretrained(<model folder>)), which resizes them to that size."
        )
    pixel_values = pixel_values.to(dtype)
    if not torch.compiler.is_compiling() and not torch.isfinite(pixel_values).all():
        raise ValueError(
            f"pixel_values contains NaN or inf (in {dtype}); clean the image (e.g. np.nan_to_num) and keep its values "
            "in the range the image processor gives before the model."
        )
    batch_size, device = pixel_values.shape[0], pixel_values.device
    return (
        pixel_values,
        _check_ids(modality_ids, "modality_ids", config.modality_names, batch_size, device),
        _check_ids(body_part_ids, "body_part_ids", config.body_part_names, batch_size, device),
    )


def flip_views(axes: list[int] | tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every combination of the given spatial flip axes, the identity `()` first: the views that test-time flip
    averaging takes of an image (up to 8 for a volume)."""
    return [combo for count in range(len(axes) + 1) for combo in itertools.combinations(axes, count)]


def mean_over_flips(
    pixel_values: torch.Tensor, views: list[tuple[int, ...]], probabilities_of: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Mean of `probabilities_of(view)` over the flipped views of a `(B, C, *spatial)` batch (`flip_views`; spatial
    axes from 0). Probabilities, not logits, are averaged: each view is one calibrated guess."""
    mean = 0
    for axes in views:
        mean = mean + probabilities_of(pixel_values.flip([axis + 2 for axis in axes])) / len(views)
    return mean


def match_task_images(config: MedformerConfig, pixel_values: torch.Tensor, task_names: list[str]) -> torch.Tensor:
    """Check the batch is the kind of image its tasks were trained on (`spatial_dims` / `num_channels` of their
    `config.tasks` entries, where recorded) and raise an error naming the mismatch otherwise. A grayscale image given
    as three identical channels (what RGB loaders, such as transformers' pipelines, make of one) is passed on as the
    one channel it is: nothing is lost. While compiling (no data-dependent checks, as in `check_inputs`) three
    channels for a grayscale task are taken to be such a copy."""
    if pixel_values.ndim not in (4, 5):
        return pixel_values  # check_inputs names the problem
    dims, channels = pixel_values.ndim - 2, pixel_values.shape[1]
    recorded = {name: config.tasks[name] for name in task_names if config.tasks[name].get("spatial_dims") is not None}
    for name, spec in recorded.items():
        if spec["spatial_dims"] != dims:
            hint = (
                "a stack of 2D images? Pass them as a list to the image processor (or spatial_dims=2)"
                if dims == 3
                else "pass the whole volume (the image processor: spatial_dims=3)"
            )
            raise ValueError(
                f"Task {name!r} was trained on {spec['spatial_dims']}D images, got a {dims}D batch of shape "
                f"{tuple(pixel_values.shape)}: {hint}."
            )
    wanted = {spec["num_channels"] for spec in recorded.values()}
    if len(wanted) > 1:
        raise ValueError(
            f"Tasks {sorted(recorded)} take images of {sorted(wanted)} channels, which one batch tensor cannot hold: "
            "batch them by task."
        )
    if not wanted or channels in wanted:
        return pixel_values
    (expected,) = wanted
    only_grayscale_tasks = expected == 1 and len(recorded) == len(task_names)
    if channels == 3 and only_grayscale_tasks:
        if torch.compiler.is_compiling() or (pixel_values == pixel_values[:, :1]).all():
            return pixel_values[:, :1]
    kind = {1: "grayscale (1-channel)", 3: "RGB (3-channel)"}.get(expected, f"{expected}-channel")
    differ = (
        " whose channels differ: a colour image (convert it to grayscale, PIL: .convert('L')), or three grayscale "
        "images read as one RGB image (pass them to the image processor as a list)"
        if channels == 3
        else ""
    )
    names = ", ".join(repr(name) for name in sorted(recorded))
    raise ValueError(f"Task {names} was trained on {kind} images, got a {channels}-channel batch{differ}.")


def require_label_rows(labels: Any, batch_size: int) -> None:
    """Labels must be a tensor with one row per image."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.ndim == 0 or labels.shape[0] != batch_size:
        raise ValueError(f"labels has shape {list(labels.shape)}: it needs one row per image ({batch_size}).")


LABEL_PADDING = -100  # in a mixed batch's (B, W) label matrix, the columns past a task's width hold this
CLASS_TASKS = ("multiclass", "binary", "ordinal")


def check_labels(
    labels: torch.Tensor, task_type: str, num_labels: int, task_name: str, padded: bool = False
) -> torch.Tensor:
    """Labels in the shape the task's loss expects: `(B,)` integer classes, or `(B, num_labels)` floats for
    multilabel and regression. Anything else raises: a wrong width, non-integer classes, values out of range, NaN.

    `padded`: a mixed batch's `(B, W)` matrix, where each task reads its first columns (class index in column 0) and
    every column past them must be `LABEL_PADDING` (-100), so that no label is silently dropped.
    """
    batch_size = labels.shape[0]
    width = 1 if task_type in CLASS_TASKS else num_labels
    expected = f"({batch_size},)" if task_type in CLASS_TASKS else f"({batch_size}, {num_labels})"
    if labels.ndim == 1 and width == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[1] < width or (labels.shape[1] != width and not padded):
        raise ValueError(
            f"Task {task_name!r} ({task_type}) needs labels of shape {expected}, got {list(labels.shape)}"
            + (" (a mixed batch: at least that many columns)." if padded else ".")
        )
    compiling = torch.compiler.is_compiling()
    if padded and not compiling and (labels[:, width:] != LABEL_PADDING).any():
        raise ValueError(
            f"Task {task_name!r} reads {width} label column(s); in a mixed batch the columns after them must be "
            f"{LABEL_PADDING} (padding), but some hold labels: give each task's labels its own width."
        )
    labels = labels[:, :width]
    if labels.is_floating_point() and not compiling and not torch.isfinite(labels).all():
        raise ValueError(f"Task {task_name!r} has NaN or inf labels; drop or fix those samples.")
    if task_type in CLASS_TASKS:
        if labels.is_floating_point() and (not padded or (not compiling and (labels != labels.round()).any())):
            raise ValueError(f"Task {task_name!r} ({task_type}) needs integer class labels, got {labels.dtype}.")
        labels = labels[:, 0].long()
        if not compiling and ((labels < 0) | (labels >= num_labels)).any():
            bad = labels[(labels < 0) | (labels >= num_labels)].unique().tolist()
            raise ValueError(f"Task {task_name!r} has labels {bad} outside 0..{num_labels - 1}.")
        return labels
    if task_type == "multilabel" and not compiling and ((labels != 0) & (labels != 1)).any():
        raise ValueError(f"Task {task_name!r} (multilabel) needs 0/1 labels, got values outside {{0, 1}}.")
    return labels.float()


def task_loss(
    logits: torch.Tensor, labels: torch.Tensor, task_type: str, num_labels: int, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Loss of one task's raw logits against labels already checked by `check_labels`.

    `label_smoothing` (training only) moves each target `label_smoothing` of the way to uniform: over the classes for
    multiclass (as `F.cross_entropy`), towards 1/2 for each sigmoid output (binary, ordinal, multilabel); regression
    targets are left as they are."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
    if task_type == "multiclass":
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if task_type == "regression":
        return F.mse_loss(logits.float(), labels.float())  # in float32: bf16 would round the targets
    if task_type == "binary":
        logits, targets = logits[:, 0], labels.to(logits.dtype)
    elif task_type == "ordinal":  # cumulative link: logit k predicts P(label > k)
        thresholds = torch.arange(num_labels - 1, device=labels.device)
        targets = (labels[:, None] > thresholds).to(logits.dtype)
    else:  # multilabel
        targets = labels.to(logits.dtype)
    targets = targets.float() * (1 - label_smoothing) + label_smoothing / 2  # float32: bf16 would round 0.95
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


def multitask_loss(
    config: MedformerConfig,
    task_logits: dict[str, torch.Tensor],
    task_indices: dict[str, torch.Tensor],
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    padded: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A batch's loss from `MedformerForMultiTask`'s per-task logits and rows: each task's `task_loss` on its rows'
    `labels` (checked by `check_labels`), weighted by its share of the batch; also each task's own loss.

    The model's forward uses it, and so can a training loop that scores the same logits against other labels
    (mixup's partner labels)."""
    batch_size = sum(len(rows) for rows in task_indices.values())
    loss, task_losses = None, {}
    for name, logits in task_logits.items():
        spec = config.tasks[name]
        task_labels = check_labels(labels[task_indices[name]], spec["type"], spec["num_labels"], name, padded=padded)
        task_losses[name] = task_loss(logits, task_labels, spec["type"], spec["num_labels"], label_smoothing)
        weighted = task_losses[name] * len(logits) / batch_size
        loss = weighted if loss is None else loss + weighted
    return loss, task_losses


def task_probabilities(logits: torch.Tensor, task_type: str, num_labels: int | None = None) -> torch.Tensor:
    """Per-class scores of a task's raw logits, as MedMNIST's evaluator reads them.

    multiclass: softmax; binary: `[1 - p, p]`; ordinal: class probabilities from the cumulative logits;
    multilabel: per-label sigmoid; regression: the logits themselves. `num_labels` (the task's), when given, is
    checked against the logits' width, so a binary task read as multiclass fails instead of scoring 1.0 everywhere.
    Other names (MedMNIST's own "binary-class", "multi-class", ...) are refused: read as regression, their logits
    would pass for probabilities.
    """
    if task_type not in TASK_TYPES:
        raise ValueError(
            f"Unknown task type {task_type!r}; choose one of {list(TASK_TYPES)} (a task's config.tasks[name]['type'])."
        )
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, outputs), got shape {tuple(logits.shape)}.")
    if num_labels is not None and logits.shape[-1] != num_task_outputs(task_type, num_labels):
        raise ValueError(
            f"A {task_type} task of {num_labels} labels has {num_task_outputs(task_type, num_labels)} logits, got "
            f"{logits.shape[-1]}: pass the task's own type (config.tasks[name]['type'])."
        )
    if task_type == "binary" and logits.shape[-1] != 1:
        raise ValueError(
            f"A binary task has one logit (the positive class), got {logits.shape[-1]}. A single-task classifier "
            "(MedformerForImageClassification.from_multi_task) gives a binary task as the two logits [0, z]: read "
            "those with task_type='multiclass' (their softmax is [1 - p, p])."
        )
    if task_type == "multiclass":
        return logits.softmax(-1)
    if task_type == "binary":
        positive = logits[:, :1].sigmoid()
        return torch.cat([1 - positive, positive], dim=-1)
    if task_type == "ordinal":
        exceed = logits.sigmoid()
        ones, zeros = exceed.new_ones(len(exceed), 1), exceed.new_zeros(len(exceed), 1)
        cumulative = torch.cat([ones, exceed, zeros], dim=-1)
        probabilities = (cumulative[:, :-1] - cumulative[:, 1:]).clamp_min(0)
        return probabilities / probabilities.sum(-1, keepdim=True).clamp_min(1e-12)
    if task_type == "multilabel":
        return logits.sigmoid()
    return logits  # regression


def classifier_probabilities(logits: torch.Tensor, config: MedformerConfig) -> torch.Tensor:
    """Per-class scores of a `MedformerForImageClassification`'s logits, by transformers' conventions: softmax over
    class logits (a binary or ordinal task's too: the classifier gives them one logit per class), sigmoid for
    multi-label heads and a single logit; a regression head's values stay raw."""
    if config.problem_type == "regression":
        return task_probabilities(logits, "regression")
    sigmoid = config.problem_type == "multi_label_classification" or config.num_labels == 1
    return task_probabilities(logits, "multilabel" if sigmoid else "multiclass")


# ---------------------------------------------------------------------------------------------------------- layers


class MedformerAttention(nn.Module):
    """Multi-head attention through `F.scaled_dot_product_attention`; cross-attention when a context is given."""

    def __init__(self, config: MedformerConfig, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = config.hidden_size // num_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = config.attention_probs_dropout_prob
        self.is_causal = False

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        return states.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None = None,
        output_attentions: bool = False,
        adapter: MedformerLayerAdapter | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        context = hidden_states if context is None else context
        query = self._heads(_adapted(self.q_proj, hidden_states, adapter, "q_proj"))
        key = self._heads(_adapted(self.k_proj, context, adapter, "k_proj"))
        value = self._heads(_adapted(self.v_proj, context, adapter, "v_proj"))
        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions:  # SDPA does not expose its weights
            weights = (query @ key.transpose(-2, -1) * self.head_dim**-0.5).softmax(-1)
            attended = F.dropout(weights, dropout, self.training) @ value
        else:
            attended = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=False)
        return _adapted(self.o_proj, attended.transpose(1, 2).flatten(2), adapter, "o_proj"), weights


class MedformerMLP(nn.Module):
    def __init__(self, config: MedformerConfig):
        super().__init__()
        intermediate = int(config.hidden_size * config.mlp_ratio)
        self.fc1 = nn.Linear(config.hidden_size, intermediate)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(intermediate, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, adapter: MedformerLayerAdapter | None = None) -> torch.Tensor:
        hidden_states = self.act(_adapted(self.fc1, hidden_states, adapter, "fc1"))
        return self.dropout(_adapted(self.fc2, hidden_states, adapter, "fc2"))


class MedformerLowRank(nn.Module):
    """LoRA update of one linear map, `x -> up(down(x))`; `up` starts at zero, so a new adapter changes nothing."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(hidden_states))


# Where each adapted linear map sits inside a `MedformerLayer`.
ADAPTED_LINEARS = {
    "q_proj": "attention.q_proj",
    "k_proj": "attention.k_proj",
    "v_proj": "attention.v_proj",
    "o_proj": "attention.o_proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}


class MedformerLayerAdapter(nn.Module):
    """One block's low-rank updates, one per linear map (`ADAPTED_LINEARS`), shaped like the block's."""

    def __init__(self, layer: MedformerLayer, rank: int):
        super().__init__()
        linears = {name: layer.get_submodule(path) for name, path in ADAPTED_LINEARS.items()}
        self.deltas = nn.ModuleDict(
            {name: MedformerLowRank(linear.in_features, linear.out_features, rank) for name, linear in linears.items()}
        )


class MedformerTaskAdapter(nn.Module):
    """A task's adapters: one per Main Body block (`config.adapter_tasks`) and, for `config.input_adapter_tasks`, one
    per Input Adaptformer cross-attention layer (`input_layers`, empty otherwise)."""

    def __init__(self, config: MedformerConfig, task: str, body: nn.ModuleList, input_layers: nn.ModuleList):
        super().__init__()
        rank = config.adapter_tasks[task]
        adapted_input = input_layers if task in config.input_adapter_tasks else []
        self.layers = nn.ModuleList(MedformerLayerAdapter(layer, rank) for layer in body)
        self.input_layers = nn.ModuleList(MedformerLayerAdapter(layer, rank) for layer in adapted_input)


def _adapted(linear: nn.Linear, hidden_states: torch.Tensor, adapter: MedformerLayerAdapter | None, name: str):
    """`linear(hidden_states)`, plus the adapter's low-rank update when a task's adapter is active."""
    output = linear(hidden_states)
    return output if adapter is None else output + adapter.deltas[name](hidden_states)


class MedformerDropPath(nn.Module):
    """Stochastic depth (timm's DropPath): in training, drops whole samples' residual branch, rescaling the rest."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, branch: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return branch
        keep = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(1 - self.rate)
        return branch * keep / (1 - self.rate)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class MedformerLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block. As cross-attention (Perceiver), `hidden_states` read a separately normed context.
    `drop_path` is this block's stochastic-depth rate (the Main Body's grow with depth)."""

    def __init__(self, config: MedformerConfig, cross_attention: bool, drop_path: float = 0.0):
        super().__init__()
        heads = config.num_cross_attention_heads if cross_attention else config.num_attention_heads
        self.norm_attention = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm_context = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if cross_attention else None
        self.attention = MedformerAttention(config, heads)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.norm_mlp = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MedformerMLP(config)
        self.drop_path = MedformerDropPath(drop_path)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None = None,
        output_attentions: bool = False,
        adapter: MedformerLayerAdapter | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        normed_context = None if self.norm_context is None else self.norm_context(context)
        attended, weights = self.attention(
            self.norm_attention(hidden_states), normed_context, output_attentions, adapter
        )
        hidden_states = hidden_states + self.drop_path(self.dropout(attended))
        hidden_states = hidden_states + self.drop_path(self.mlp(self.norm_mlp(hidden_states), adapter))
        return hidden_states, weights


class MedformerChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each position of a `(B, C, *spatial)` map (ConvNeXt's channels-first norm).

    Unlike BatchNorm it has no batch statistics (one-task batches of different sets, batch size 1, DDP and export all
    behave the same), and unlike GroupNorm it mixes no positions, so masked pixels cannot reach visible tokens
    through it."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states.movedim(1, -1)).movedim(-1, 1)


class MedformerConvBlock(nn.Module):
    """Residual stride-1 3x3(x3) convolution + channel LayerNorm + activation: depth at a stem stage's resolution."""

    def __init__(self, config: MedformerConfig, spatial_dims: int, width: int):
        super().__init__()
        self.conv = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(width, width, kernel_size=3, padding=1)
        self.norm = MedformerChannelLayerNorm(width, eps=config.layer_norm_eps)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.act(self.norm(self.conv(hidden_states)))


class MedformerConvStem(nn.Sequential):
    """Stride-2 3x3(x3) convolutions, each but the last followed by channel LayerNorm, GELU and
    `config.conv_stem_blocks` residual stride-1 blocks: one token per `2 ** num_convs` pixels per axis, the same grid
    as linear patches of that size."""

    def __init__(self, config: MedformerConfig, spatial_dims: int, in_channels: int):
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        widths = [in_channels, *config.conv_stem_channels, config.hidden_size]
        layers = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(conv(width_in, width_out, kernel_size=3, stride=2, padding=1))
            if index < len(widths) - 2:
                layers += [MedformerChannelLayerNorm(width_out, eps=config.layer_norm_eps), ACT2FN[config.hidden_act]]
                layers += [MedformerConvBlock(config, spatial_dims, width_out) for _ in range(config.conv_stem_blocks)]
        super().__init__(*layers)


class MedformerPatchEmbeddings(nn.Module):
    """Tokenize with the input kind's (dimensionality, channels) conv stem or linear patch projection, and add
    coordinate features."""

    def __init__(self, config: MedformerConfig):
        super().__init__()
        self.config = config
        projections = {}
        kinds = ((2, nn.Conv2d, config.input_channels_2d), (3, nn.Conv3d, config.input_channels_3d))
        for dims, conv, channel_counts in kinds:
            patch_size = patch_size_for(config, dims)
            for channels in channel_counts:
                projections[embedding_key(dims, channels)] = (
                    MedformerConvStem(config, dims, channels)
                    if config.tokenizer == "conv"
                    else conv(channels, config.hidden_size, kernel_size=patch_size, stride=patch_size)
                )
        self.projections = nn.ModuleDict(projections)
        self.position_projection = nn.Linear(3 * (2 * config.num_position_bands + 1), config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dims, channels = pixel_values.ndim - 2, pixel_values.shape[1]
        patches = self.projections[embedding_key(dims, channels)](pixel_values)
        positions = fourier_position_features(
            tuple(patches.shape[2:]), self.config.num_position_bands, self.config.max_position_frequency, patches.device
        )
        return patches.flatten(2).transpose(1, 2) + self.position_projection(positions.to(patches.dtype))


class MedformerContextEmbeddings(nn.Module):
    """What the image is: embedding of its dimensionality + imaging modality + body part."""

    def __init__(self, config: MedformerConfig):
        super().__init__()
        self.dimensionality = nn.Embedding(2, config.hidden_size)
        self.modality = nn.Embedding(len(config.modality_names), config.hidden_size)
        self.body_part = nn.Embedding(len(config.body_part_names), config.hidden_size)

    def forward(self, spatial_dims: int, modality_ids: torch.Tensor, body_part_ids: torch.Tensor) -> torch.Tensor:
        dimensionality = self.dimensionality.weight[spatial_dims - 2]
        return dimensionality + self.modality(modality_ids) + self.body_part(body_part_ids)


class MedformerInputAdaptformer(nn.Module):
    """Reads an image of any size and kind into `num_latents` latents (Perceiver cross-attention)."""

    def __init__(self, config: MedformerConfig):
        super().__init__()
        self.patch_embeddings = MedformerPatchEmbeddings(config)
        self.context_embeddings = MedformerContextEmbeddings(config)
        self.latents = nn.Parameter(torch.empty(config.num_latents, config.hidden_size))
        self.layers = nn.ModuleList(
            MedformerLayer(config, cross_attention=True) for _ in range(config.num_input_layers)
        )


class MedformerMainBody(nn.Module):
    """Self-attention over the latents, shared by every input kind and task."""

    def __init__(self, config: MedformerConfig):
        super().__init__()
        depth = config.num_hidden_layers
        self.layers = nn.ModuleList(
            MedformerLayer(config, cross_attention=False, drop_path=config.drop_path_rate * index / max(depth - 1, 1))
            for index in range(depth)
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class MedformerOutputAdaptformer(nn.Module):
    """Queries (a task's latents, or pixel positions) read the body latents (Perceiver IO decoding)."""

    def __init__(self, config: MedformerConfig, num_layers: int | None = None):
        super().__init__()
        self.layers = nn.ModuleList(
            MedformerLayer(config, cross_attention=True) for _ in range(num_layers or config.num_output_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, queries: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            queries, _ = layer(queries, latents)
        return self.norm(queries)


class MedformerTaskHead(nn.Module):
    """What one task owns: its latent queries and a linear map of their pooled read-out to logits."""

    def __init__(self, config: MedformerConfig, num_outputs: int):
        super().__init__()
        self.queries = nn.Parameter(torch.empty(config.num_task_queries, config.hidden_size))
        self.projection = nn.Linear(config.hidden_size, num_outputs)


class MedformerPixelDecoder(nn.Module):
    """Decodes every patch position's pixels from the latents: position queries + context -> Output Adaptformer."""

    def __init__(self, config: MedformerConfig):
        super().__init__()
        self.config = config
        self.position_projection = nn.Linear(3 * (2 * config.num_position_bands + 1), config.hidden_size)
        self.output_adaptformer = MedformerOutputAdaptformer(config, config.num_decoder_layers)
        heads = {}
        for dims, channel_counts in ((2, config.input_channels_2d), (3, config.input_channels_3d)):
            for channels in channel_counts:
                heads[embedding_key(dims, channels)] = nn.Linear(
                    config.hidden_size, channels * patch_size_for(config, dims) ** dims
                )
        self.pixel_heads = nn.ModuleDict(heads)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, image_shape: tuple[int, ...]) -> torch.Tensor:
        dims, channels = len(image_shape) - 2, image_shape[1]
        grid = tuple(size // patch_size_for(self.config, dims) for size in image_shape[2:])
        positions = fourier_position_features(
            grid, self.config.num_position_bands, self.config.max_position_frequency, latents.device
        )
        queries = self.position_projection(positions.to(latents.dtype)) + context[:, None]
        decoded = self.output_adaptformer(queries, latents)
        return self.pixel_heads[embedding_key(dims, channels)](decoded)


# ---------------------------------------------------------------------------------------------------------- models


@contextmanager
def _quiet_transformers():
    """Without transformers' per-key load report and its progress bars, which for checkpoints of a few MB are
    noise: loading a backbone out of a bigger checkpoint is the expected path (`from_pretrained` says it in a line)."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    bars = hf_logging.is_progress_bar_enabled()
    report_logger.addFilter(_drop_load_report)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        report_logger.removeFilter(_drop_load_report)
        if bars:
            hf_logging.enable_progress_bar()


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


# Containers whose modules are named one level down (a task's head, a backbone part).
_TWO_LEVEL_MODULES = ("task_heads.", "medformer.", "private_output_adaptformers.")


def _module_names(keys: set[str]) -> list[str]:
    """Parameter names -> the modules they belong to, e.g. `task_heads.breastmnist`, `decoder`."""
    return sorted({".".join(key.split(".")[: 2 if key.startswith(_TWO_LEVEL_MODULES) else 1]) for key in keys})


class MedformerPreTrainedModel(PreTrainedModel):
    config_class = MedformerConfig
    base_model_prefix = "medformer"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MedformerLayer"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        """As transformers' `from_pretrained`, with one line instead of its per-key report: which modules were
        initialised anew (train them before use) and which checkpoint modules this class does not use.

        A single-task classifier refuses a multi-task folder (its head would be random): use
        `MedformerForImageClassification.from_multi_task(path, task=...)`. A keyword that nearly names a config option
        is refused naming it, as the config does.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        cls.config_class.refuse_near_misses(kwargs)  # `hidden_dim=` would end in "unexpected keyword" otherwise
        relabelling = sorted(key for key in ("num_labels", "id2label", "label2id", "problem_type") if key in kwargs)
        if cls.__name__ == "MedformerForMultiTask" and relabelling:
            raise ValueError(
                f"{relabelling} change no head of a MedformerForMultiTask: each task's labels live in config.tasks. "
                "For new labels add a task (model.add_task(name, type=..., labels=[...]), or finetune.py --datasets), "
                "or fine-tune one task as a classifier (MedformerForImageClassification.from_multi_task(path, task))."
            )
        # What the folder holds is checked before loading it, so a refusal is not preceded by the load's warnings.
        config = kwargs.get("config")
        if isinstance(config, transformers.PretrainedConfig):
            saved = config.to_dict()
        else:  # the folder's config.json, or the one `config=` names; the hub arguments (revision, ...) apply
            source = config if isinstance(config, (str, os.PathLike)) else pretrained_model_name_or_path
            saved = transformers.PretrainedConfig.get_config_dict(source, **kwargs)[0]
        saved_as = saved.get("architectures") or []
        if cls.__name__ == "MedformerForImageClassification" and "MedformerForMultiTask" in saved_as:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a multi-task model (tasks {list(saved.get('tasks') or {})}); "
                "as a single-task classifier its head would be random. Load it with MedformerForMultiTask (pass "
                "task=), or take one task as a classifier: "
                "MedformerForImageClassification.from_multi_task(path, task=...)."
            )
        if cls.__name__ == "MedformerForMultiTask" and "MedformerForImageClassification" in saved_as:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a single-task classifier (MedformerForImageClassification); "
                "as a multi-task model its trained head would go unused and its task's head would be random. Load it "
                "with MedformerForImageClassification or AutoModelForImageClassification."
            )
        with _quiet_transformers():
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        new, unused = _module_names(set(info["missing_keys"])), _module_names(set(info["unexpected_keys"]))
        if new:
            logger.warning(
                f"{cls.__name__} from {pretrained_model_name_or_path}: initialised anew (train before use): "
                f"{', '.join(new)}" + (f"; not used from the checkpoint: {', '.join(unused)}" if unused else "")
            )
        elif unused:
            logger.info(f"{cls.__name__} from {pretrained_model_name_or_path}: not used: {', '.join(unused)}")
        return (model, info) if output_loading_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Save as transformers does (config, weights, modeling code), plus the image-processing and pipeline code,
        so `pipeline("medical-image-classification", model=<folder>, trust_remote_code=True)` finds its class.
        Save the image processor into the same folder too, as for every vision model."""
        with _quiet_transformers():
            super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            for name in ("image_processing_medformer.py", "pipeline_medformer.py"):
                source = Path(__file__).with_name(name)
                if source.exists():  # absent beside a remote-code copy that was loaded without them
                    shutil.copy(source, Path(save_directory) / name)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if self.config.weight_init == "fan_in" and isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            init.trunc_normal_(module.weight, std=(module.weight[0].numel()) ** -0.5)
        if isinstance(module, MedformerInputAdaptformer):
            init.trunc_normal_(module.latents, std=self.config.initializer_range)
        elif isinstance(module, MedformerTaskHead):
            init.trunc_normal_(module.queries, std=self.config.initializer_range)
        elif isinstance(module, MedformerLowRank):
            init.zeros_(module.up.weight)

    def _task_metadata(
        self, task_ids: torch.Tensor, modality_ids: torch.Tensor | None, body_part_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Metadata the caller did not give, taken per sample from its task's registered modality and body part."""
        filled = []
        for field, ids, vocabulary in (
            ("modality", modality_ids, self.config.modality_names),
            ("body_part", body_part_ids, self.config.body_part_names),
        ):
            table = [vocabulary.index(spec[field]) for spec in self.config.tasks.values()]
            filled.append(fill_unspecified(ids, torch.tensor(table, device=task_ids.device)[task_ids]))
        return filled[0], filled[1]

    def _read_task(self, head: MedformerTaskHead, output_adaptformer, latents, context) -> torch.Tensor:
        """Logits of one task: its queries (plus the input's context) read the latents, pooled, then classified."""
        queries = head.queries.expand(latents.shape[0], -1, -1) + context[:, None]
        return head.projection(output_adaptformer(queries, latents).mean(dim=1))


class MedformerModel(MedformerPreTrainedModel):
    """Input Adaptformer + Main Body: any 2D image or 3D volume -> `(batch, num_latents, hidden_size)` latents."""

    def __init__(self, config: MedformerConfig):
        super().__init__(config)
        self.input_adaptformer = MedformerInputAdaptformer(config)
        self.main_body = MedformerMainBody(config)
        self.task_adapters = nn.ModuleDict({name: self.new_task_adapter(name) for name in config.adapter_tasks})
        self.post_init()

    def new_task_adapter(self, task: str) -> MedformerTaskAdapter:
        """Adapters shaped for `task` as `config.adapter_tasks` / `config.input_adapter_tasks` ask (untrained)."""
        return MedformerTaskAdapter(self.config, task, self.main_body.layers, self.input_adaptformer.layers)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        modality_ids: torch.LongTensor | None = None,
        body_part_ids: torch.LongTensor | None = None,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        adapter_rows: dict[str, torch.Tensor] | None = None,
        track_input_size: bool = True,
    ) -> MedformerModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)` or `(B, C, D, H, W)`):
                Normalised images (see `MedformerImageProcessor`); each spatial size a multiple of the patch size.
            modality_ids, body_part_ids (`torch.LongTensor` of shape `(B,)`, *optional*):
                Indices into `config.modality_names` / `config.body_part_names`; not given (None, or -1 per sample):
                0 ("unknown"). The task models fill them from the task's registered metadata instead.
            mask_ratio (`float`, *optional*):
                Drop this fraction of patch tokens at random before the Input Adaptformer (pre-training), in blocks
                of `config.mask_unit` patches per axis.
            noise (`torch.FloatTensor` of shape `(B, num_patches)`, *optional*):
                Makes the masking reproducible: the patches with the lowest noise are kept. Implies masking.
            adapter_rows (`dict[str, torch.LongTensor]`, *optional*):
                `{task: row indices}`: those samples run the Main Body (and, for `config.input_adapter_tasks`, the
                Input Adaptformer's layers) with that task's low-rank adapters (`config.adapter_tasks`); every
                other sample runs them as they are. The tokenizer runs once for the whole batch.
            track_input_size (`bool`, *optional*, defaults to `True`):
                Whether the input's size is the model's: recorded in the config when a backward trains on it
                (`record_size_when_trained`), warned about when it differs from the recorded one. False for auxiliary
                inputs, such as pre-training's 2D slices of volumes.

        Example:

        ```python
        >>> model = MedformerModel(MedformerConfig())
        >>> model(torch.randn(2, 1, 28, 28, 28)).last_hidden_state.shape
        torch.Size([2, 16, 256])
        ```
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        pixel_values, modality_ids, body_part_ids = check_inputs(
            self.config,
            pixel_values,
            modality_ids,
            body_part_ids,
            self.input_adaptformer.latents.dtype,
            training=self.training and torch.is_grad_enabled(),
            check_size=track_input_size,
        )
        unknown = sorted(set(adapter_rows or {}) - set(self.task_adapters))
        if unknown:
            raise ValueError(f"No adapters for tasks {unknown}; this model has them for {list(self.task_adapters)}.")
        adaptformer = self.input_adaptformer

        mask = None
        if mask_ratio is not None and not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio!r}; leave it out (None) for no masking.")
        if mask_ratio is not None or noise is not None:
            patch_size = patch_size_for(self.config, pixel_values.ndim - 2)
            keep_indices, mask = random_masking(
                pixel_values.shape[0],
                tuple(size // patch_size for size in pixel_values.shape[2:]),
                self.config.mask_ratio if mask_ratio is None else mask_ratio,
                noise,
                pixel_values.device,
                self.config.mask_unit,
            )
            # Blank the masked patches before tokenizing: a conv stem's receptive field crosses patch borders, so
            # visible tokens would otherwise see masked pixels and reconstruction would be a copy task.
            pixel_values = pixel_values * (1 - pixel_mask(mask, pixel_values.shape, patch_size)).to(pixel_values.dtype)
        tokens = adaptformer.patch_embeddings(pixel_values)
        if mask is not None:
            tokens = tokens.gather(1, keep_indices[..., None].expand(-1, -1, tokens.shape[-1]))
        context = adaptformer.context_embeddings(pixel_values.ndim - 2, modality_ids, body_part_ids)
        latents = adaptformer.latents.expand(tokens.shape[0], -1, -1) + context[:, None]

        hidden_states, attentions = self._run_layers(latents, tokens, adapter_rows or {}, output_attentions)
        latents = self.main_body.norm(hidden_states[-1])
        if track_input_size and self.training:
            record_size_when_trained(self.config, pixel_values, latents)

        return MedformerModelOutput(
            last_hidden_state=latents,
            pooler_output=latents.mean(dim=1),
            context_embedding=context,
            mask=mask,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )

    def _run_layers(
        self,
        latents: torch.Tensor,
        tokens: torch.Tensor,
        adapter_rows: dict[str, torch.Tensor],
        output_attentions: bool,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The latents after the Input Adaptformer's layers and after each Main Body block, and every layer's
        attention weights: one pass per group of rows (the rows of each task in `adapter_rows` with its adapters,
        the rest as they are), put back in batch order."""
        groups: list[tuple[MedformerTaskAdapter | None, torch.Tensor | None]] = [(None, None)]  # None: every row
        if adapter_rows:
            adapted = torch.zeros(latents.shape[0], dtype=torch.bool, device=latents.device)
            groups = []
            for task, rows in adapter_rows.items():
                adapted[rows] = True
                groups.append((self.task_adapters[task], rows))
            if not adapted.all():
                groups.append((None, (~adapted).nonzero().squeeze(1)))
            if len(groups) == 1:
                groups = [(groups[0][0], None)]
        input_layers, body = self.input_adaptformer.layers, self.main_body.layers
        results = []
        for adapter, rows in groups:
            hidden, context = (latents, tokens) if rows is None else (latents[rows], tokens[rows])
            if adapter is not None and torch.is_grad_enabled() and not hidden.requires_grad:
                # With the rest frozen, reentrant gradient checkpointing would give the adapters no gradient unless
                # the blocks' input requires one (as PEFT's enable_input_require_grads).
                hidden = hidden.detach().requires_grad_()
            # Each layer's adapter, None where there is none (no adapter, or one without `input_layers`).
            input_adapters = (adapter is not None and adapter.input_layers) or [None] * len(input_layers)
            body_adapters = adapter.layers if adapter is not None else [None] * len(body)
            weights = []
            for layer, layer_adapter in zip(input_layers, input_adapters, strict=True):
                hidden, layer_weights = layer(hidden, context, output_attentions, adapter=layer_adapter)
                weights.append(layer_weights)
            outputs = [hidden]
            for layer, layer_adapter in zip(body, body_adapters, strict=True):
                hidden, layer_weights = layer(hidden, output_attentions=output_attentions, adapter=layer_adapter)
                outputs.append(hidden)
                weights.append(layer_weights)
            results.append((rows, outputs, weights))
        if results[0][0] is None:
            return results[0][1], results[0][2]
        merged_outputs = [latents.new_empty((latents.shape[0], *out.shape[1:])) for out in results[0][1]]
        merged_weights = [None if w is None else w.new_empty((latents.shape[0], *w.shape[1:])) for w in results[0][2]]
        for rows, outputs, weights in results:
            for target, value in zip(merged_outputs + merged_weights, outputs + weights, strict=True):
                if target is not None:
                    target[rows] = value
        return merged_outputs, merged_weights


class MedformerForMultiTask(MedformerPreTrainedModel):
    """Medformer with the Output Adaptformer and one head per task of `config.tasks`.

    A saved multi-task folder loads with
    `AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True)`.
    """

    def __init__(self, config: MedformerConfig):
        super().__init__(config)
        self.medformer = MedformerModel(config)
        self.output_adaptformer = MedformerOutputAdaptformer(config)
        self.private_output_adaptformers = nn.ModuleDict(
            {name: MedformerOutputAdaptformer(config) for name in config.private_output_tasks}
        )
        self.task_heads = nn.ModuleDict(
            {name: MedformerTaskHead(config, config.task_output_size(name)) for name in config.tasks}
        )
        self._label_the_logits()
        self.post_init()

    def _label_the_logits(self) -> None:
        """With one task, `logits` is that task's: its labels go to the top-level `id2label` / `problem_type`, which
        transformers' `pipeline("image-classification")` reads. Sigmoid outputs are labelled by what their probability
        is of: a binary logit by the positive class, an ordinal logit k by "> label k" (P(label > k)). With no task or
        several (`task=` is needed, and forward asks for it) they are transformers' defaults, whatever was there."""
        labels, problem_type = ["LABEL_0", "LABEL_1"], None
        if len(self.config.tasks) == 1:
            spec = next(iter(self.config.tasks.values()))
            names = [spec["id2label"][index] for index in range(spec["num_labels"])]  # keys 0..n-1 (config checks)
            labels, problem_type = {
                "multiclass": (names, "single_label_classification"),
                "multilabel": (names, "multi_label_classification"),
                "regression": (names, "regression"),
                "binary": (names[1:], "multi_label_classification"),
                "ordinal": ([f"> {name}" for name in names[:-1]], "multi_label_classification"),
            }[spec["type"]]
        self.config.id2label = dict(enumerate(labels))
        self.config.label2id = {label: index for index, label in self.config.id2label.items()}
        self.config.problem_type = problem_type

    def add_task(
        self, name: str, private_output: bool = False, adapter_rank: int = 0, adapt_input: bool = False, **spec
    ) -> None:
        """Grow the model by one task (a new head and task queries); every existing weight stays as it is.

        `spec` takes the keys of a `config.tasks` entry: `type`, `num_labels` or `labels`/`id2label`, `modality`,
        `body_part`. `private_output` also gives the task an Output Adaptformer of its own, starting as a copy of
        the shared one; `adapter_rank` > 0 gives it low-rank adapters on the Main Body, starting at zero, and
        `adapt_input` on the Input Adaptformer's layers too. Either way training them changes no other task.
        """
        self.config.add_task(
            name, private_output=private_output, adapter_rank=adapter_rank, adapt_input=adapt_input, **spec
        )
        reference = next(self.parameters())

        def initialised(module: nn.Module) -> nn.Module:
            return module.to(device=reference.device, dtype=reference.dtype).apply(self._init_weights)

        self.task_heads[name] = initialised(MedformerTaskHead(self.config, self.config.task_output_size(name)))
        if adapter_rank:
            self.medformer.task_adapters[name] = initialised(self.medformer.new_task_adapter(name))
        if private_output:
            # A copy of the shared one that trains, even when the shared one was frozen before the task was added.
            self.private_output_adaptformers[name] = copy.deepcopy(self.output_adaptformer).requires_grad_(True)
        self._label_the_logits()

    def output_adaptformer_of(self, task: str) -> MedformerOutputAdaptformer:
        """The Output Adaptformer a task reads the latents with: its own (`config.private_output_tasks`) or the
        shared one."""
        return (
            self.private_output_adaptformers[task]
            if task in self.private_output_adaptformers
            else self.output_adaptformer
        )

    def _task_ids(self, task: str | torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
        names = list(self.config.tasks)
        if task is None:
            if len(names) != 1:
                raise ValueError(
                    f"This model has tasks {names}; pass task=<name> or per-sample task ids. Pipelines: "
                    "pipeline('medical-image-classification', ...)(image, task=<name>), or for "
                    "pipeline('image-classification') a one-task classifier from "
                    "MedformerForImageClassification.from_multi_task(model, task) (examples/extract_task.py)."
                )
            task = names[0]
        if isinstance(task, str):
            if task not in self.config.tasks:
                raise ValueError(f"Unknown task {task!r}; known tasks: {names}. Add one with model.add_task(...).")
            return torch.full((batch_size,), names.index(task), dtype=torch.long, device=device)
        try:
            task = torch.as_tensor(task, device=device)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"task must be a task name or per-sample task ids, got {type(task).__name__}.") from error
        if task.shape != (batch_size,) or task.is_floating_point() or task.dtype == torch.bool:
            raise ValueError(f"Per-sample task ids must be an integer tensor of shape ({batch_size},).")
        if ((task < 0) | (task >= len(names))).any():
            raise ValueError(f"Task ids must be in 0..{len(names) - 1} (the order of config.tasks: {names}).")
        return task

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        task: str | torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        modality_ids: torch.LongTensor | None = None,
        body_part_ids: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        target_smoothing: float = 0.0,
    ) -> MedformerMultiTaskOutput:
        r"""
        Args:
            task (`str` or `torch.LongTensor` of shape `(B,)`, *optional*):
                The task of the whole batch by name, or per-sample indices into `list(config.tasks)` for a batch that
                mixes tasks (all of one input shape). Optional when the model has a single task.
            labels (`torch.Tensor`, *optional*):
                `(B,)` class indices for multiclass, binary and ordinal tasks; `(B, num_labels)` for multilabel and
                regression. A mixed batch passes `(B, W)`: each task reads its first columns (class indices column 0)
                and the columns past them must be -100 (`LABEL_PADDING`).
            modality_ids, body_part_ids (`torch.LongTensor` of shape `(B,)`, *optional*):
                Default to each sample's task's registered modality and body part, also per sample where an id is
                `UNSPECIFIED_ID` (-1; what the image processor gives for metadata that was not passed).
            target_smoothing (`float`, *optional*, defaults to 0.0):
                Label smoothing of the loss (`task_loss`'s `label_smoothing`); a training choice, so not in the config.
                Not named `label_*`: transformers' Trainer takes every such argument for a label column.
        """
        require_tensor(pixel_values)
        if labels is not None:
            require_label_rows(labels, pixel_values.shape[0])
        names = list(self.config.tasks)
        task_ids = self._task_ids(task, pixel_values.shape[0], pixel_values.device)
        modality_ids, body_part_ids = self._task_metadata(task_ids, modality_ids, body_part_ids)
        single_task = isinstance(task, str) or task is None
        present = [names.index(task or names[0])] if single_task else task_ids.unique().tolist()
        task_rows = (  # each present task's rows of the batch
            {present[0]: torch.arange(len(task_ids), device=task_ids.device)}
            if single_task
            else {index: (task_ids == index).nonzero().squeeze(1) for index in present}
        )
        pixel_values = match_task_images(self.config, pixel_values, [names[index] for index in present])
        outputs = self.medformer(
            pixel_values,
            modality_ids=modality_ids,
            body_part_ids=body_part_ids,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,  # read by name below, whatever config.return_dict says
            adapter_rows={names[i]: rows for i, rows in task_rows.items() if names[i] in self.config.adapter_tasks},
        )
        latents, context = outputs.last_hidden_state, outputs.context_embedding

        task_logits, task_indices = {}, {}
        for index, rows in task_rows.items():
            name = names[index]
            task_latents, task_context = (latents, context) if single_task else (latents[rows], context[rows])
            task_logits[name] = self._read_task(
                self.task_heads[name], self.output_adaptformer_of(name), task_latents, task_context
            )
            task_indices[name] = rows
        if self.training:  # also when only the heads train (a frozen encoder's latents take no gradient)
            trained = next((logits for logits in task_logits.values() if logits.requires_grad), None)
            if trained is not None:
                record_size_when_trained(self.config, pixel_values, trained)
        loss, task_losses = None, None
        if labels is not None:
            loss, task_losses = multitask_loss(
                self.config, task_logits, task_indices, labels, target_smoothing, padded=not single_task
            )

        return MedformerMultiTaskOutput(
            loss=loss,
            logits=task_logits[names[present[0]]] if single_task else None,
            task_logits=task_logits,
            task_indices=task_indices,
            task_losses=task_losses,
            pooler_output=outputs.pooler_output,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class MedformerForImageClassification(MedformerPreTrainedModel):
    """One task from `config.num_labels` / `config.problem_type` / `config.id2label`, with transformers' standard
    `ImageClassifierOutput`, so `AutoModelForImageClassification` and `pipeline("image-classification")` work.

    Record the task in `config.tasks` (e.g. `MedformerConfig(tasks={"breastmnist": CATALOGUE["breastmnist"]
    .task_spec()})`): its labels and problem type then come from it, and the saved model knows the images it was
    trained on, so any pipeline feeds a grayscale image as one channel and fills in its modality and body part.
    Without it, a pipeline that makes RGB of every image feeds three channels and "unknown" metadata.
    """

    _problem_to_task_type = {
        "single_label_classification": "multiclass",
        "multi_label_classification": "multilabel",
        "regression": "regression",
    }

    def __init__(self, config: MedformerConfig):
        if len(config.tasks) > 1:  # e.g. a backbone saved from a multi-task model, loaded as a classifier to fine-tune
            logger.warning(
                f"config.tasks lists {list(config.tasks)}, but a classifier has one head, which none of them "
                "describes: they are dropped (with their adapters), so no task's modality, body part or image checks "
                "are taken for it. For one task's trained head use MedformerForImageClassification.from_multi_task."
            )
            config = copy.deepcopy(config)  # the caller's config, perhaps also a multi-task model's, keeps its tasks
            self._set_tasks(config, {})
        super().__init__(config)
        if len(config.tasks) == 1:
            self._label_by_task(config)
        self.medformer = MedformerModel(config)
        self.output_adaptformer = MedformerOutputAdaptformer(config)
        self.classifier = MedformerTaskHead(config, config.num_labels)
        self.post_init()

    @staticmethod
    def _set_tasks(config: MedformerConfig, tasks: dict[str, dict[str, Any]]) -> None:
        """Make `tasks` the config's tasks, without per-task adapters or Output Adaptformers: a classifier has one head
        and routes no task, so the entries naming other tasks would not describe it (and would fail its validation)."""
        config.tasks, config.private_output_tasks, config.adapter_tasks = tasks, [], {}
        config.input_adapter_tasks = []

    @classmethod
    def _label_by_task(cls, config: MedformerConfig) -> None:
        """Labels and problem type of the one task the config records, where the config has transformers' default
        labels. A binary task gets two class logits, an ordinal one a logit per grade (softmax; cumulative logits are
        `MedformerForMultiTask`'s). Other labels (a re-headed classifier: `from_pretrained(path, id2label=...)`) mean
        the entry no longer describes the head: it is dropped, with a warning. `LABEL_0` / `LABEL_1` count as not
        given. The config is the model's, which is the caller's object (as in transformers): it changes too."""
        name, spec = next(iter(config.tasks.items()))
        labels = {int(index): label for index, label in spec["id2label"].items()}
        if config.id2label == {0: "LABEL_0", 1: "LABEL_1"}:
            problem_types = {task_type: problem for problem, task_type in cls._problem_to_task_type.items()}
            problem_types["binary"] = problem_types["ordinal"] = problem_types["multiclass"]
            config.id2label, config.problem_type = labels, problem_types[spec["type"]]
            config.label2id = {label: index for index, label in labels.items()}
        elif config.id2label != labels:
            logger.warning(
                f"New labels {list(config.id2label.values())}, so the task entry {name!r} (labels "
                f"{list(labels.values())}, modality, body part, image checks, label-safe flips) no longer describes "
                "the head and is dropped; pass modality= and body_part= to the processor for the new data."
            )
            config.tasks = {}

    @classmethod
    def from_multi_task(
        cls, multi_task: MedformerForMultiTask | str | os.PathLike, task: str, **kwargs
    ) -> MedformerForImageClassification:
        """One task of a multi-task model (or folder; `kwargs` go to its `from_pretrained`) as a single-task
        classifier with the same predictions, for `pipeline("image-classification")`, ONNX export and any tool built
        for one head. The task's metadata defaults come along in `config.tasks`.

        Multiclass, multilabel and regression logits are kept; a binary task's one logit z becomes the two logits
        [0, z], whose softmax is [1 - sigmoid(z), sigmoid(z)]. Ordinal tasks (cumulative logits) have no such form:
        use the multi-task model with `task=`.
        """
        if not isinstance(multi_task, MedformerForMultiTask):
            multi_task = MedformerForMultiTask.from_pretrained(multi_task, **kwargs)
        tasks = multi_task.config.tasks
        if task not in tasks:
            raise ValueError(f"Unknown task {task!r}; this model's tasks are {list(tasks)}.")
        spec = tasks[task]
        if spec["type"] == "ordinal":
            raise ValueError(
                f"Task {task!r} is {spec['type']}: its cumulative logits are not a single-task classifier's. Use the "
                "multi-task model with task=, or pipeline('medical-image-classification') (which reads them right)."
            )
        config = MedformerConfig.from_dict(multi_task.config.to_dict())
        cls._set_tasks(config, {task: spec})
        config.id2label, config.problem_type = {0: "LABEL_0", 1: "LABEL_1"}, None  # the task's, from _label_by_task
        cls._label_by_task(config)
        config.architectures = [cls.__name__]
        renamed = {  # the task's head becomes the classifier; the Output Adaptformer it reads with, the only one
            f"task_heads.{task}.": "classifier.",
            f"private_output_adaptformers.{task}.": "output_adaptformer.",
        }
        own_reader = task in multi_task.config.private_output_tasks
        state = {}
        for key, value in multi_task.state_dict().items():
            prefix = next((old for old in renamed if key.startswith(old)), None)
            if prefix is not None:
                state[renamed[prefix] + key.removeprefix(prefix)] = value
            elif not key.startswith(("task_heads.", "private_output_adaptformers.", "medformer.task_adapters.")):
                if not (own_reader and key.startswith("output_adaptformer.")):
                    state[key] = value
        if task in multi_task.config.adapter_tasks:  # the task's adapters merged into the layers it runs: W + up @ down
            adapter = multi_task.medformer.task_adapters[task]
            for stage, adapters in (("main_body", adapter.layers), ("input_adaptformer", adapter.input_layers)):
                for index, layer in enumerate(adapters):
                    for name, path in ADAPTED_LINEARS.items():
                        delta = layer.deltas[name]
                        key = f"medformer.{stage}.layers.{index}.{path}.weight"
                        state[key] = state[key] + (delta.up.weight @ delta.down.weight).detach()
        if spec["type"] == "binary":  # [0, z]: softmax gives the same class-1 probability as sigmoid(z)
            for name in ("classifier.projection.weight", "classifier.projection.bias"):
                state[name] = torch.cat([torch.zeros_like(state[name]), state[name]])
        model = cls(config).to(dtype=next(multi_task.parameters()).dtype)
        model.load_state_dict(state, strict=True)
        return model.eval() if not multi_task.training else model

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        modality_ids: torch.LongTensor | None = None,
        body_part_ids: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> ImageClassifierOutput:
        r"""
        Args:
            modality_ids, body_part_ids (`torch.LongTensor` of shape `(B,)`, *optional*):
                Not given (None, or -1 per sample): the task's registered metadata when the config records its one
                task in `config.tasks` (as `from_multi_task` does), else "unknown".
        """
        require_tensor(pixel_values)
        if len(self.config.tasks) == 1:
            task_ids = torch.zeros(pixel_values.shape[0], dtype=torch.long, device=pixel_values.device)
            modality_ids, body_part_ids = self._task_metadata(task_ids, modality_ids, body_part_ids)
            pixel_values = match_task_images(self.config, pixel_values, list(self.config.tasks))
        outputs = self.medformer(
            pixel_values,
            modality_ids=modality_ids,
            body_part_ids=body_part_ids,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self._read_task(
            self.classifier, self.output_adaptformer, outputs.last_hidden_state, outputs.context_embedding
        )
        if self.training:  # also when only the head trains (a frozen encoder's latents take no gradient)
            record_size_when_trained(self.config, pixel_values, logits)
        loss = None
        if labels is not None:
            require_label_rows(labels, pixel_values.shape[0])
            if self.config.problem_type is None:  # the same inference as transformers' classification heads
                if self.config.num_labels == 1:
                    self.config.problem_type = "regression"
                elif not labels.is_floating_point():
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            task_type = self._problem_to_task_type[self.config.problem_type]
            labels = check_labels(labels, task_type, self.config.num_labels, "image-classification")
            loss = task_loss(logits, labels, task_type, self.config.num_labels)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class MedformerForPreTraining(MedformerPreTrainedModel):
    """Self-supervised pre-training on unlabeled 2D and 3D images.

    - masked reconstruction: a random `config.mask_ratio` of patch tokens is dropped before the Input Adaptformer;
      position queries decode every patch's pixels through an Output Adaptformer; MSE on the dropped patches.
    - view agreement: two differently masked views of each image (differently augmented too, when the caller passes
      `view_pixel_values`) go through the model together; their projected pooled latents must identify each other
      among the batch (InfoNCE), which asks the latents to carry what an image is, not only its pixels. The second
      view also adds reconstruction signal, so no compute is wasted.
    - slice consistency (3D batches): one 2D slice of each volume goes through the 2D path, and its projected latents
      must identify their own volume among the batch: the 2D and 3D paths learn one space.
    """

    def __init__(self, config: MedformerConfig):
        super().__init__(config)
        self.medformer = MedformerModel(config)
        self.decoder = MedformerPixelDecoder(config)
        self.projector = None
        if {"view_agreement", "slice_consistency"} & set(config.ssl_tasks):
            # BatchNorm, as in SimCLR's projector: the pooled latents of a masked sparse volume differ little
            # between images at first, and without it both agreement losses collapse to chance (measured).
            self.projector = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size),
                nn.BatchNorm1d(config.hidden_size),
                nn.GELU(),
                nn.Linear(config.hidden_size, config.projection_dim),
            )
        self.post_init()

    @property
    def num_views(self) -> int:
        """Views of each image in a forward pass: 2 with view agreement, else 1."""
        return 2 if "view_agreement" in self.config.ssl_tasks else 1

    def reconstruction_target(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-patch target and the mean/std used to normalise it (identity when `norm_pix_loss` is off)."""
        patches = patchify(pixel_values, patch_size_for(self.config, pixel_values.ndim - 2))
        if not self.config.norm_pix_loss:
            return patches, torch.zeros_like(patches[..., :1]), torch.ones_like(patches[..., :1])
        mean = patches.mean(dim=-1, keepdim=True)
        std = (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        return (patches - mean) / std, mean, std

    def reconstruct(self, logits: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Predicted patches back to an image shaped like `pixel_values` (pixel scale restored per patch)."""
        _, mean, std = self.reconstruction_target(pixel_values)
        patch_size = patch_size_for(self.config, pixel_values.ndim - 2)
        return unpatchify(logits * std + mean, tuple(pixel_values.shape), patch_size)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        modality_ids: torch.LongTensor | None = None,
        body_part_ids: torch.LongTensor | None = None,
        noise: torch.Tensor | None = None,
        view_pixel_values: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> MedformerForPreTrainingOutput:
        r"""
        Args:
            noise (`torch.FloatTensor` of shape `(views * B, num_patches)`, *optional*):
                Reproducible masks (lowest noise kept); `views` is `self.num_views`. Slice consistency still draws its
                slices from the global torch RNG.
            view_pixel_values (`torch.FloatTensor` shaped like `pixel_values`, *optional*):
                The second view of each image for view agreement (e.g. another augmentation of it, as
                `MedformerCollator(..., views=2)` gives); default: the same pixels, masked differently.
        """
        num_views = self.num_views
        dtype = self.medformer.input_adaptformer.latents.dtype
        training = self.training and torch.is_grad_enabled()
        pixel_values, modality_ids, body_part_ids = check_inputs(
            self.config, pixel_values, modality_ids, body_part_ids, dtype, training
        )
        batch_size = pixel_values.shape[0]
        if self.projector is not None and batch_size < 2:  # the projector exists for the contrastive pretexts
            contrastive = sorted(set(self.config.ssl_tasks) - {"masked_reconstruction"})
            raise ValueError(
                f"{contrastive} tell the images of a batch apart, so they need at least 2 images per batch, got 1: "
                f"raise the batch size or set config.ssl_tasks=['masked_reconstruction']."
            )
        if view_pixel_values is not None:
            if num_views == 1:
                raise ValueError("view_pixel_values needs 'view_agreement' in config.ssl_tasks.")
            if view_pixel_values.shape != pixel_values.shape:
                raise ValueError(
                    f"view_pixel_values must be shaped like pixel_values {tuple(pixel_values.shape)}, got "
                    f"{tuple(view_pixel_values.shape)}."
                )
            view_pixel_values = check_inputs(self.config, view_pixel_values, None, None, dtype, training)[0]
        views = pixel_values
        if num_views > 1:  # rows: image 0 view 1, image 0 view 2, image 1 view 1, ...
            second = pixel_values if view_pixel_values is None else view_pixel_values
            views = torch.stack([pixel_values, second], dim=1).flatten(0, 1)
        outputs = self.medformer(
            views,
            modality_ids=modality_ids.repeat_interleave(num_views),
            body_part_ids=body_part_ids.repeat_interleave(num_views),
            mask_ratio=self.config.mask_ratio,
            noise=noise,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        predicted = self.decoder(outputs.last_hidden_state, outputs.context_embedding, tuple(views.shape))
        target, _, _ = self.reconstruction_target(views)
        per_patch = ((predicted - target) ** 2).mean(dim=-1)
        reconstruction_loss = (per_patch * outputs.mask).sum() / outputs.mask.sum()
        weights = self.config.ssl_loss_weights
        loss = weights["masked_reconstruction"] * reconstruction_loss

        agreement_loss = slice_consistency_loss = None
        if self.projector is not None:
            pooled = outputs.pooler_output
            with_slices = "slice_consistency" in self.config.ssl_tasks and pixel_values.ndim == 5
            if with_slices:
                slices = self.medformer(
                    random_slices(pixel_values),
                    modality_ids=modality_ids,
                    body_part_ids=body_part_ids,
                    return_dict=True,
                    track_input_size=False,  # a volume's slices, not the 2D size the model is trained for
                )
                pooled = torch.cat([pooled, slices.pooler_output])
            # One projector call: its BatchNorm sees 2D and 3D rows together, so it cannot normalise away the
            # difference between the two paths that slice consistency asks the encoder to remove.
            embeddings = self.projector(pooled)
            views_embeddings = embeddings[: batch_size * num_views].unflatten(0, (batch_size, num_views))
            temperature = self.config.agreement_temperature
            training = self.training and torch.is_grad_enabled()  # every process runs a training step
            if num_views > 1:
                agreement_loss = info_nce(views_embeddings[:, 0], views_embeddings[:, 1], temperature, training)
                loss = loss + weights["view_agreement"] * agreement_loss
            if with_slices:
                slice_embeddings = embeddings[batch_size * num_views :]
                slice_consistency_loss = info_nce(views_embeddings[:, 0], slice_embeddings, temperature, training)
                loss = loss + weights["slice_consistency"] * slice_consistency_loss

        return MedformerForPreTrainingOutput(
            loss=loss,
            reconstruction_loss=reconstruction_loss,
            agreement_loss=agreement_loss,
            slice_consistency_loss=slice_consistency_loss,
            logits=predicted[::num_views],
            mask=outputs.mask[::num_views],
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


MedformerModel.register_for_auto_class("AutoModel")
MedformerForPreTraining.register_for_auto_class("AutoModelForPreTraining")
# Both classifiers map AutoModelForImageClassification to themselves when saved, so that auto class (and the
# pipelines built on it) loads whichever classifier a folder holds: one task, or many (then pass `task=`).
MedformerForImageClassification.register_for_auto_class("AutoModelForImageClassification")
MedformerForMultiTask.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "MedformerPreTrainedModel",
    "MedformerModel",
    "MedformerForMultiTask",
    "MedformerForImageClassification",
    "MedformerForPreTraining",
    "MedformerModelOutput",
    "MedformerMultiTaskOutput",
    "MedformerForPreTrainingOutput",
    "task_loss",
    "task_probabilities",
    "classifier_probabilities",
    "num_task_outputs",
]
