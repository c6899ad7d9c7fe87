"""Medformer image processor: 2D images and 3D volumes -> `pixel_values`, `modality_ids`, `body_part_ids`.

This file is shipped with every checkpoint (Hub remote code): it imports only numpy, torch, transformers and the
sibling `configuration_medformer.py`. nibabel and pydicom (the `[medical]` extra) are imported when a file is read.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

from .configuration_medformer import (
    DEFAULT_BODY_PART_NAMES,
    DEFAULT_MODALITY_NAMES,
    ORIENTATION_PAIRS,
    UNSPECIFIED_ID,
    closest_option,
    orientation_problem,
)

logger = logging.get_logger(__name__)

# Hounsfield-unit windows (level, width) used in radiology reading.
CT_WINDOWS = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
# Dtypes whose full range is the natural intensity scale; others need a window or range: int16 CT in HU, and uint16
# (12-bit detectors store 0-4095 in it, CT stores HU + 1024).
DTYPE_RANGES = {np.dtype("uint8"): (0, 255), np.dtype("bool"): (0, 1)}
# Built-in modalities whose values are not Hounsfield units: a CT window on them is refused. Names added to a config's
# vocabulary are not listed, so a CT variant (e.g. "cbct") keeps its window.
NON_HOUNSFIELD_MODALITIES = frozenset(DEFAULT_MODALITY_NAMES) - {"unknown", "ct"}
SUPPORTED_CHANNELS = (1, 3)
# Channel counts of common image formats Medformer does not take (gray+alpha, RGBA): at either end of a 3-axis array
# they are refused, not read as the depth of a thin volume (pass spatial_dims=3 for one).
OTHER_CHANNELS = (2, 4)
# Resizing beyond this many voxels per image and channel (512^3, or 11585^2) is refused before memory runs out.
MAX_RESIZE_VOXELS = 2**27
# Float images without a window or range are taken as already in [0, 1]; this much rounding slack is tolerated.
UNIT_RANGE_SLACK = 1e-3

# Keys transformers writes (or once wrote) into a saved preprocessor_config.json besides the settings.
SAVED_METADATA_KEYS = frozenset({"image_processor_type", "auto_map", "processor_class", "feature_extractor_type"})
# transformers' usual image-processor options, and what does their job here.
HF_OPTION_EQUIVALENTS = {
    "do_resize": "size_2d=[H, W] / size_3d=[D, H, W] (None: no resize)",
    "size": "size_2d=[H, W] / size_3d=[D, H, W]",
    "resample": "nothing (bilinear 2D / trilinear 3D)",
    "do_center_crop": "nothing: crop before processing",
    "crop_size": "nothing: crop before processing",
    "do_rescale": "rescale_range=[low, high] or window= (intensities reach [0, 1] by dtype otherwise)",
    "rescale_factor": "rescale_range=[low, high]",
    "do_normalize": "normalization='modality' | 'image' | 'none'",
    "image_mean": "modality_statistics={'default': [mean, std], <modality>: [mean, std]}",
    "image_std": "modality_statistics={'default': [mean, std], <modality>: [mean, std]}",
}


def unknown_options_message(unknown: set[str], options: list[str], owner: str = "MedformerImageProcessor") -> str:
    """Names the options that do not exist (with the real one each most likely misspells), what does the job of
    transformers' usual ones, and the real ones."""
    named = ", ".join(
        f"{name!r}" + (f" (did you mean {close!r}?)" if (close := closest_option(name, options)) else "")
        for name in sorted(unknown)
    )
    hints = "; ".join(
        f"for {name} use {HF_OPTION_EQUIVALENTS[name]}" for name in sorted(unknown & HF_OPTION_EQUIVALENTS.keys())
    )
    return f"Unknown option(s) {named} for {owner}{f' ({hints})' if hints else ''}. Its options: {options}."


class MedformerImageProcessorKwargs(ImagesKwargs, total=False):
    """Per-call options of `MedformerImageProcessor` (also its saved attributes)."""

    modality: str | list[str] | None
    body_part: str | list[str] | None
    spatial_dims: int | None
    orientation: str | None
    window: str | list[float] | None
    rescale_range: list[float] | None
    normalization: str | None
    modality_statistics: dict[str, list[float]] | None
    size_2d: list[int] | None
    size_3d: list[int] | None
    group_by_shape: bool | None
    modality_names: list[str] | None
    body_part_names: list[str] | None


class MedformerImageProcessor(BaseImageProcessor):
    r"""
    Turns 2D images and 3D volumes into Medformer inputs, in torch, without forcing RGB or 8 bits.

    Steps, in order: layout to channels-first -> intensity to [0, 1] (CT window, explicit range, or by dtype) ->
    optional grayscale to RGB -> optional resize (bilinear 2D / trilinear 3D) -> normalisation (per modality or per
    image) -> stacking. Metadata names become ids with the same vocabularies as `MedformerConfig`.

    Args:
        window (`str` or `[level, width]`, *optional*):
            CT window in Hounsfield units, a preset (lung, mediastinum, soft_tissue, liver, bone, brain) or
            `[level, width]`. Values are clipped to the window and mapped to [0, 1].
        rescale_range (`[low, high]`, *optional*):
            Intensity range mapped to [0, 1] (clipped). Without it, uint8/bool images are scaled by their dtype's
            range and float images are taken as already in [0, 1]; other integer dtypes (uint16: 12 or 16 bits?
            int16: CT?) need a window or range.
        normalization (`str`, *optional*, defaults to `"modality"`):
            `"modality"`: `(x - mean) / std` with the modality's entry of `modality_statistics` (or `"default"`);
            `"image"`: z-score of each image and channel (MRI, whose units are arbitrary); `"none"`.
        modality_statistics (`dict[str, [mean, std]]`, *optional*):
            Mean and std of [0, 1]-scaled images per modality name; `"default"` serves the others (and images
            whose modality was not given).
        do_convert_rgb (`bool`, *optional*, defaults to `False`):
            Repeat 1-channel images to 3 channels (only when asked).
        size_2d, size_3d (`list[int]`, *optional*):
            Resize 2D images to `[H, W]` / volumes to `[D, H, W]`. The processor the training scripts save records
            the training size here, so images of any size are brought to what the checkpoint knows.
        spatial_dims (`int`, *optional*):
            2 or 3, when the array layout alone cannot tell (see `to_channels_first`).
        orientation (`str`, *optional*):
            The orientation the model's volumes had in training (e.g. "LPS", a task's `config.tasks` entry records
            it): volumes read from files (`MedicalImage`, which know their own) are turned to it. Plain arrays
            cannot say which way they point and are taken as given.
        input_data_format (`str`, *optional*):
            `"channels_first"` or `"channels_last"`, when the channel axis cannot be told from its size.
        modality, body_part (`str` or `list[str]`, *optional*):
            Names per batch or per image. Not given: the ids are `UNSPECIFIED_ID` (-1), which the model replaces by
            the task's registered modality / body part (or "unknown" where there is no task). Pass "unknown" to
            say that it is not known.
        group_by_shape (`bool`, *optional*, defaults to `False`):
            Return one `BatchFeature` per input shape (with `indices` into the inputs) instead of raising on a batch
            whose images differ in shape.
        modality_names, body_part_names (`list[str]`, *optional*):
            Vocabularies; must equal the model config's (`from_model_config` copies them).
    """

    valid_kwargs = MedformerImageProcessorKwargs
    model_input_names = ["pixel_values", "modality_ids", "body_part_ids"]

    def __init__(
        self,
        window: str | list[float] | None = None,
        rescale_range: list[float] | None = None,
        normalization: str = "modality",
        modality_statistics: dict[str, list[float]] | None = None,
        do_convert_rgb: bool = False,
        size_2d: list[int] | None = None,
        size_3d: list[int] | None = None,
        spatial_dims: int | None = None,
        orientation: str | None = None,
        input_data_format: str | None = None,
        modality: str | list[str] | None = None,
        body_part: str | list[str] | None = None,
        group_by_shape: bool = False,
        modality_names: list[str] | None = None,
        body_part_names: list[str] | None = None,
        **kwargs,
    ):
        unknown = set(kwargs) - SAVED_METADATA_KEYS
        if unknown:
            raise ValueError(unknown_options_message(unknown, self._setting_names()))
        super().__init__(**kwargs)
        self.window = window
        self.rescale_range = rescale_range
        self.normalization = normalization
        self.modality_statistics = modality_statistics or {"default": [0.5, 0.5]}
        self.do_convert_rgb = do_convert_rgb
        self.size_2d = size_2d
        self.size_3d = size_3d
        self.spatial_dims = spatial_dims
        self.orientation = orientation
        self.input_data_format = input_data_format
        self.modality = modality
        self.body_part = body_part
        self.group_by_shape = group_by_shape
        self.modality_names = list(modality_names or DEFAULT_MODALITY_NAMES)
        self.body_part_names = list(body_part_names or DEFAULT_BODY_PART_NAMES)
        self._check_settings(vars(self))

    @classmethod
    def from_dict(cls, image_processor_dict: dict[str, Any], **kwargs) -> Any:
        """transformers' `from_dict` (behind `from_pretrained`), which passes the options it knows and drops the rest
        silently: a misspelt option (`size2d=`) is refused here, naming the real one. Other leftovers (a pipeline's
        model arguments) stay transformers' to handle."""
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        processor, unused = super().from_dict(image_processor_dict, return_unused_kwargs=True, **kwargs)
        settings = processor._setting_names()
        misspelt = {key for key in unused if closest_option(key, settings, cutoff=0.8)}
        if misspelt:
            raise ValueError(unknown_options_message(misspelt, settings))
        return (processor, unused) if return_unused_kwargs else processor

    @classmethod
    def from_model_config(cls, config: Any, training_size: int | None = None, **kwargs) -> MedformerImageProcessor:
        """A processor whose vocabularies are the model config's, so names map to the ids the model was trained on,
        and whose sizes are the ones the config records its weights were trained at (`image_size_2d` /
        `image_size_3d`), so images of any size reach the model at those.

        `training_size` (the side of the training images) sets `size_2d` / `size_3d` instead; `size_2d=` /
        `size_3d=` override either.
        """
        sizes = {"size_2d": getattr(config, "image_size_2d", None), "size_3d": getattr(config, "image_size_3d", None)}
        if training_size is not None:
            sizes = {"size_2d": [training_size] * 2, "size_3d": [training_size] * 3}
        kwargs = {**{key: size for key, size in sizes.items() if size is not None}, **kwargs}
        return cls(modality_names=config.modality_names, body_part_names=config.body_part_names, **kwargs)

    # ------------------------------------------------------------------------------------------ settings

    def _check_settings(self, settings: dict[str, Any]) -> None:
        window = settings["window"]
        statistics = settings["modality_statistics"]
        if not isinstance(statistics, dict) or "default" not in statistics:
            raise ValueError(
                "modality_statistics must be a dict of [mean, std] pairs with a 'default' entry (for images of any "
                f"other modality), got {statistics!r}."
            )
        misspelt = sorted(set(statistics) - {"default", *settings["modality_names"]})
        if misspelt:
            raise ValueError(
                f"modality_statistics has entries for unknown modalities {misspelt}; the modalities are "
                f"{settings['modality_names']} (or 'default')."
            )
        for name, values in statistics.items():
            if not isinstance(values, (list, tuple)) or len(values) != 2:
                raise ValueError(f"modality_statistics[{name!r}] must be [mean, std], got {values!r}.")
        numeric_options = {
            "window": [] if window is None or isinstance(window, str) else window,
            "rescale_range": settings["rescale_range"] or [],
            **{f"modality_statistics[{name!r}]": values for name, values in settings["modality_statistics"].items()},
        }
        for name, values in numeric_options.items():
            if not all(isinstance(value, numbers.Real) and math.isfinite(value) for value in values):
                raise ValueError(f"{name} must hold finite numbers, got {values!r}.")
        if isinstance(window, str) and window not in CT_WINDOWS:
            raise ValueError(f"Unknown CT window {window!r}; presets are {sorted(CT_WINDOWS)}, or pass [level, width].")
        if window is not None and not isinstance(window, str) and (len(window) != 2 or window[1] <= 0):
            raise ValueError(f"window must be a preset name or [level, width] with width > 0, got {window!r}.")
        low_high = settings["rescale_range"]
        if low_high is not None and (len(low_high) != 2 or low_high[1] <= low_high[0]):
            raise ValueError(f"rescale_range must be [low, high] with high > low, got {low_high!r}.")
        if settings["normalization"] not in ("modality", "image", "none"):
            raise ValueError(f"normalization must be 'modality', 'image' or 'none', got {settings['normalization']!r}.")
        for name, (_, std) in settings["modality_statistics"].items():
            if std <= 0:
                raise ValueError(f"modality_statistics[{name!r}] has std {std}; it must be > 0.")
        if settings["spatial_dims"] not in (None, 2, 3):
            raise ValueError(f"spatial_dims must be 2, 3 or None, got {settings['spatial_dims']!r}.")
        if settings["orientation"] is not None and (problem := orientation_problem(settings["orientation"])):
            raise ValueError(f"orientation: {problem}.")
        if settings["input_data_format"] not in (None, "channels_first", "channels_last"):
            raise ValueError(
                f"input_data_format must be 'channels_first' or 'channels_last', got {settings['input_data_format']!r}."
            )
        for key, length in (("size_2d", 2), ("size_3d", 3)):
            size = settings[key]
            if size is None:
                continue
            if not isinstance(size, (list, tuple)) or len(size) != length:
                raise ValueError(f"{key} must be a list of {length} positive integers, got {size!r}.")
            if not all(isinstance(side, numbers.Integral) and side >= 1 for side in size):
                raise ValueError(f"{key} must be {length} positive integers, got {size!r}.")
            if math.prod(size) > MAX_RESIZE_VOXELS:
                raise ValueError(
                    f"{key}={list(size)} asks for {math.prod(size):,} pixels per image and channel; the limit is "
                    f"{MAX_RESIZE_VOXELS:,} (512^3). Resize to the checkpoint's training size, or crop first."
                )

    # ------------------------------------------------------------------------------------------ preprocess

    def preprocess(self, images: Any, **kwargs) -> BatchFeature | list[BatchFeature]:
        """Process one image or a list of them (numpy, torch, PIL; 2D or 3D). Options override the saved settings.

        `return_tensors="np"` gives numpy arrays; otherwise torch tensors.
        """
        return_tensors = kwargs.pop("return_tensors", None)
        unknown = set(kwargs) - set(self._setting_names())
        if unknown:
            raise ValueError(unknown_options_message(unknown, self._setting_names()))
        settings = {key: kwargs.get(key, getattr(self, key)) for key in self._setting_names()}
        self._check_settings(settings)

        for key in ("modality", "body_part"):  # files that know what they are fill in what the call leaves out
            files = images if isinstance(images, (list, tuple)) else [images]
            if settings[key] is None and any(_is_medical_image(image) for image in files):
                settings[key] = [_known(getattr(image, key, None)) for image in files]
        images = turned_to(images, settings["orientation"])
        groups = to_channels_first(images, settings["spatial_dims"], settings["input_data_format"])
        count = sum(len(group) for group in groups)
        modality_ids = self._ids(settings["modality"], count, settings["modality_names"], "modality")
        body_part_ids = self._ids(settings["body_part"], count, settings["body_part_names"], "body_part")
        _check_window_modality(settings["window"], modality_ids, settings["modality_names"])
        processed = [self._process_group(group, settings) for group in groups]
        offsets = np.cumsum([0] + [len(pixels) for pixels in processed])

        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, pixels in enumerate(processed):
            by_shape.setdefault(tuple(pixels.shape[1:]), []).append(index)
        if len(by_shape) > 1 and not settings["group_by_shape"]:
            shapes = sorted(str(list(shape)) for shape in by_shape)
            hint = (
                "the batch mixes 2D and 3D images: process them in separate calls"
                if len({len(shape) for shape in by_shape}) > 1
                else "pass size_2d=[H, W] / size_3d=[D, H, W] to resize them to one shape"
            )
            raise ValueError(
                f"Images have different shapes (channels, *spatial) {shapes}; {hint}, or pass group_by_shape=True to "
                "get one batch per shape."
            )

        outputs = []
        for members in by_shape.values():
            indices = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in members])
            pixel_values = torch.cat([processed[i] for i in members]) if len(members) > 1 else processed[members[0]]
            data = {
                "pixel_values": self._normalize(pixel_values, modality_ids[indices], settings),
                "modality_ids": modality_ids[indices],
                "body_part_ids": body_part_ids[indices],
            }
            if settings["group_by_shape"]:
                data["indices"] = indices
            outputs.append(BatchFeature(data=data, tensor_type=return_tensors))
        return outputs if settings["group_by_shape"] else outputs[0]

    def _setting_names(self) -> list[str]:
        return [
            "window",
            "rescale_range",
            "normalization",
            "modality_statistics",
            "do_convert_rgb",
            "size_2d",
            "size_3d",
            "spatial_dims",
            "orientation",
            "input_data_format",
            "modality",
            "body_part",
            "group_by_shape",
            "modality_names",
            "body_part_names",
        ]

    @staticmethod
    def _ids(names: str | list[str] | None, count: int, vocabulary: list[str], field_name: str) -> torch.Tensor:
        """Names -> ids; a name that was not given (None) -> UNSPECIFIED_ID, for the model to fill from the task."""
        names = [names] * count if names is None or isinstance(names, str) else list(names)
        if len(names) != count:
            raise ValueError(f"{field_name} has {len(names)} names for {count} images; pass one name or one per image.")
        unknown = sorted({name for name in names if name is not None and name not in vocabulary})
        if unknown:
            raise ValueError(
                f"Unknown {field_name} {unknown}. Known names: {vocabulary}. To add one, build the model config with "
                f"`{field_name}_names=[..., 'new']` and the processor with `from_model_config(config)`."
            )
        ids = [UNSPECIFIED_ID if name is None else vocabulary.index(name) for name in names]
        return torch.tensor(ids, dtype=torch.long)

    def _process_group(self, group: RawGroup, settings: dict[str, Any]) -> torch.Tensor:
        """Intensity, channels and size for images that share dtype and shape: `(N, C, *spatial)` float32."""
        pixels = to_unit_range(
            group.array,
            group.source_dtype,
            settings["window"],
            settings["rescale_range"],
            normalised_per_image=settings["normalization"] == "image",
        )
        if pixels.shape[1] not in SUPPORTED_CHANNELS:
            raise ValueError(
                f"{pixels.shape[1]}-channel image: Medformer takes 1 or 3 channels. Drop alpha (PIL: .convert('RGB')) "
                "or pick channels; if this axis is depth, pass spatial_dims=3."
            )
        if settings["do_convert_rgb"] and pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, *pixels.shape[2:])
        dims = pixels.ndim - 2
        size = settings["size_2d"] if dims == 2 else settings["size_3d"]
        if size is not None and list(pixels.shape[2:]) != list(size):
            if dims == 2:
                pixels = F.interpolate(pixels, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
            else:  # trilinear has no antialiasing: shrink by box averages ("area"), then grow any axis that must
                shrunk = tuple(min(side, target) for side, target in zip(pixels.shape[2:], size, strict=True))
                if shrunk != tuple(pixels.shape[2:]):
                    pixels = F.interpolate(pixels, size=shrunk, mode="area")
                if shrunk != tuple(size):
                    pixels = F.interpolate(pixels, size=tuple(size), mode="trilinear", align_corners=False)
        return pixels.contiguous()

    @staticmethod
    def _normalize(pixels: torch.Tensor, modality_ids: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
        if settings["normalization"] == "none":
            return pixels
        reduce_dims = tuple(range(2, pixels.ndim))
        if settings["normalization"] == "image":
            mean = pixels.mean(dim=reduce_dims, keepdim=True)
            std = pixels.std(dim=reduce_dims, keepdim=True).clamp_min(1e-6)
            return (pixels - mean) / std
        statistics = settings["modality_statistics"]
        names = settings["modality_names"]
        not_given = modality_ids == UNSPECIFIED_ID
        per_modality = sorted(set(statistics) - {"default"})
        if per_modality and bool(not_given.any()):
            logger.warning_once(
                "Images without modality= are normalised with modality_statistics['default'], but this processor "
                f"also holds statistics for {per_modality}, and the task models read a missing modality as their "
                "task's: pass modality= so that the normalisation matches what the model assumes."
            )
        table = torch.tensor([statistics.get(name, statistics["default"]) for name in names] + [statistics["default"]])
        rows = torch.where(not_given, len(names), modality_ids)  # not given: "default"
        mean_std = table.to(pixels.dtype)[rows].reshape(-1, 2, *([1] * (pixels.ndim - 1)))
        return (pixels - mean_std[:, 0]) / mean_std[:, 1]


# ---------------------------------------------------------------------------------------------- layouts


@dataclass
class RawGroup:
    """Images of one dtype and shape, channels first: `(N, C, *spatial)`, not yet rescaled."""

    array: torch.Tensor
    source_dtype: np.dtype

    def __len__(self) -> int:
        return len(self.array)


def _is_medical_image(image: Any) -> bool:
    """By structure, not isinstance: remote code can import this module twice (the pipeline's copy and the
    processor's), and a `MedicalImage` from one copy must still be recognised by the other."""
    return hasattr(image, "array") and hasattr(image, "spatial_dims") and hasattr(image, "layout")


def _as_array(image: Any) -> np.ndarray | torch.Tensor | MedicalImage:
    if isinstance(image, (np.ndarray, torch.Tensor)) or _is_medical_image(image):
        return image
    if hasattr(image, "mode") and hasattr(image, "size"):  # PIL without importing it
        if image.mode not in ("1", "L", "RGB", "I", "I;16", "I;16L", "I;16B", "F"):  # not alpha, palettes, CMYK
            raise ValueError(f"PIL image in mode {image.mode}: convert it first, e.g. image.convert('RGB') or ('L').")
        return np.array(image)  # a writable copy: torch refuses to share read-only buffers
    raise ValueError(f"Unsupported image type {type(image).__name__}; pass numpy arrays, torch tensors or PIL images.")


def _image_layout(shape: tuple[int, ...], spatial_dims: int | None, data_format: str | None) -> str:
    """Layout of one image's axes: "HW", "CHW", "HWC", "DHW", "CDHW" or "DHWC". Raises when it cannot be told."""
    rank = len(shape)
    if rank == 2 and spatial_dims != 3:
        return "HW"
    if rank == 3 and spatial_dims == 3:
        return "DHW"
    if rank not in (3, 4) or (rank == 4 and spatial_dims == 2):
        raise ValueError(
            f"Cannot read an image of shape {shape} as {spatial_dims or 'a 2D or 3'}D: expected (H, W), (C, H, W), "
            "(H, W, C), (D, H, W), (C, D, H, W) or (D, H, W, C)."
        )
    first_layout, last_layout = ("CHW", "HWC") if rank == 3 else ("CDHW", "DHWC")
    if data_format is not None:
        return first_layout if data_format == "channels_first" else last_layout
    first, last = shape[0], shape[-1]
    if first in SUPPORTED_CHANNELS and last in SUPPORTED_CHANNELS:
        raise ValueError(
            f"Cannot tell the channel axis of shape {shape}: both ends could be channels. Pass "
            "input_data_format='channels_first' or 'channels_last' (or spatial_dims=3 for a volume)."
        )
    if first in SUPPORTED_CHANNELS:
        return first_layout
    if last in SUPPORTED_CHANNELS:
        return last_layout
    if rank == 3 and spatial_dims is None and (first in OTHER_CHANNELS) != (last in OTHER_CHANNELS):
        channels = first if first in OTHER_CHANNELS else last
        raise ValueError(
            f"Shape {shape} looks like a {channels}-channel image (gray+alpha or RGBA?): Medformer takes 1 or 3 "
            "channels. Drop alpha (PIL: .convert('RGB') or ('L')) or pick channels; if that axis is the depth of a "
            "volume, pass spatial_dims=3."
        )
    if rank == 4 and data_format is None and last in OTHER_CHANNELS:
        raise ValueError(
            f"Shape {shape} looks like a volume with {last} channels: Medformer takes 1 or 3. Pick channels, or pass "
            "input_data_format='channels_first' if the first axis holds them."
        )
    if rank == 3 and spatial_dims is None:
        return "DHW"
    if rank == 3:  # spatial_dims=2: MedMNIST stores 2D grayscale sets as such stacks
        hint = (
            f"a stack of {first} grayscale 2D images (N, H, W)? Pass them as a list (list(images)), or as "
            "images[:, None] (N, 1, H, W) with spatial_dims=2"
        )
    else:
        volumes = "give volumes without a channel axis as (D, H, W), several as a list or an (N, C, D, H, W) array"
        batch = f"a batch of {first} 2D images (N, C, H, W) or (N, H, W, C)? Pass spatial_dims=2. Otherwise "
        hint = (batch if spatial_dims is None else "") + volumes
    raise ValueError(
        f"Shape {shape} has no 1- or 3-channel axis at either end: {hint}. Or pass input_data_format= to name the "
        "channel axis."
    )


def _numpy_dtype(array: np.ndarray | torch.Tensor) -> np.dtype:
    if isinstance(array, np.ndarray):
        return array.dtype
    if array.dtype == torch.bfloat16:
        return np.dtype("float32")
    return torch.empty(0, dtype=array.dtype).numpy().dtype


def to_channels_first(images: Any, spatial_dims: int | None = None, data_format: str | None = None) -> list[RawGroup]:
    """Bring one image, a list of images, or a batched array to channels-first groups of equal dtype and shape.

    One image: (H, W), (C, H, W), (H, W, C) -> 2D; (D, H, W), (C, D, H, W), (D, H, W, C) -> 3D. The channel axis is
    the end with size 1 or 3; a 3-axis array with neither is a volume. Batched arrays: rank 5 is a batch of volumes,
    rank 4 with `spatial_dims=2` a batch of 2D images (a rank-4 array is otherwise one volume with a channel axis).
    A `MedicalImage` (from `load_dicom` / `load_nifti`) knows its own layout.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("Got an empty list of images.")
        batches = [(_as_array(image), False) for image in images]
    else:
        array = _as_array(images)
        batched = not _is_medical_image(array) and (array.ndim == 5 or (array.ndim == 4 and spatial_dims == 2))
        batches = [(array, batched)]
    groups = []
    for item, batched in batches:
        array = item.array if _is_medical_image(item) else item
        dtype = _numpy_dtype(array)
        if dtype.kind not in "biuf":
            raise ValueError(f"Unsupported pixel dtype {dtype}; use integer or real floating-point images.")
        if 0 in array.shape:
            raise ValueError(f"Got an empty image of shape {tuple(array.shape)}.")
        if _is_medical_image(item):
            layout = item.layout
        else:
            layout = _image_layout(tuple(array.shape[1:] if batched else array.shape), spatial_dims, data_format)
        if isinstance(array, np.ndarray):  # torch cannot share read-only buffers (memmaps, Arrow views): copy those
            array = np.ascontiguousarray(array) if array.flags.writeable else np.array(array)
        tensor = torch.as_tensor(array)
        tensor = tensor if batched else tensor[None]
        if layout in ("HW", "DHW"):
            tensor = tensor[:, None]
        elif layout in ("HWC", "DHWC"):
            tensor = tensor.movedim(-1, 1)
        groups.append(RawGroup(tensor, dtype))
    return groups


def _check_window_modality(
    window: str | list[float] | None, modality_ids: torch.Tensor, modality_names: list[str]
) -> None:
    """A CT window on images named as another built-in modality (MRI, X-ray, ...) maps units they do not have."""
    names = [modality_names[i] for i in modality_ids.tolist() if i != UNSPECIFIED_ID]
    other = [name for name in names if name in NON_HOUNSFIELD_MODALITIES]
    if window is not None and other:
        count = len(modality_ids)
        which = "the images are" if len(other) == count else f"{len(other)} of the {count} images are"
        raise ValueError(
            f"window={window!r} maps CT Hounsfield units, but {which} {sorted(set(other))}. Drop window= for them "
            "(MRI and other arbitrary units: normalization='image'; a known stored range: rescale_range=[low, "
            "high]; a mixed batch: one call for the CT images, one for the others), or pass modality='ct' if they "
            "are CT."
        )


def _known(name: str | None) -> str | None:
    """A file's "unknown" tag says nothing: treat it as not given, so the model falls back to the task's."""
    return None if name in (None, "unknown") else name


def to_unit_range(
    pixels: torch.Tensor,
    source_dtype: np.dtype,
    window: str | list[float] | None,
    rescale_range: list[float] | None,
    normalised_per_image: bool = False,
) -> torch.Tensor:
    """Intensities to [0, 1]: CT window, else an explicit range, else the dtype's range; NaN/inf raise.

    Float images without a window or range are taken as already scaled, so they must lie in [0, 1] (unless
    `normalised_per_image`: per-image normalisation follows, as for MRI, so floats and integers of any range pass as
    they are): physical units such as
    Hounsfield units from `load_dicom` raise instead of reaching the model unscaled.
    """
    pixels = pixels.to(torch.float32)
    if source_dtype.kind == "f" and not torch.isfinite(pixels).all():
        raise ValueError("Image contains NaN or inf values; clean it (e.g. np.nan_to_num) before processing.")
    if window is not None and source_dtype in (np.dtype("uint8"), np.dtype("bool")):
        raise ValueError(
            f"window= maps Hounsfield units, but this is a {source_dtype} image: display values, windowed already "
            "(as MedMNIST's are). Drop window= here, or pass the original CT values (e.g. from load_dicom)."
        )
    if window is not None and source_dtype.kind == "u":
        raise ValueError(
            f"window= maps Hounsfield units, but this is a {source_dtype} image, which cannot hold them (air is "
            "-1000 HU): these are stored values (CT files keep HU + 1024 or apply a RescaleSlope/Intercept). Pass "
            "the image in Hounsfield units (load_dicom applies the rescale), or rescale_range=[low, high] instead."
        )
    if window is not None and rescale_range is not None:
        raise ValueError(
            f"window={window!r} and rescale_range={list(rescale_range)} both map intensities to [0, 1]: pass one "
            "(window= for CT in Hounsfield units), and rescale_range=None where the processor has one set."
        )
    if window is not None and source_dtype.kind == "f" and -UNIT_RANGE_SLACK <= pixels.min() <= pixels.max() <= 1:
        raise ValueError(
            f"window={window!r} maps Hounsfield units, but this float image lies in [{float(pixels.min()):.4g}, "
            f"{float(pixels.max()):.4g}]: scaled already, so the window would make it one flat value. Drop window=, "
            "or pass the CT values in Hounsfield units (load_dicom gives those)."
        )
    if rescale_range is not None and source_dtype in DTYPE_RANGES and rescale_range[1] > DTYPE_RANGES[source_dtype][1]:
        raise ValueError(
            f"rescale_range={list(rescale_range)} maps stored values up to {rescale_range[1]:g}, but this is a "
            f"{source_dtype} image (at most {DTYPE_RANGES[source_dtype][1]}): it would come out dark and flat. Pass "
            "rescale_range=None for it (its dtype's range applies), or the range its values were stored in."
        )
    if (
        rescale_range is not None
        and source_dtype.kind == "f"
        and rescale_range[1] > 1 + UNIT_RANGE_SLACK
        and -UNIT_RANGE_SLACK <= pixels.min() <= pixels.max() <= 1 + UNIT_RANGE_SLACK
    ):
        raise ValueError(
            f"rescale_range={list(rescale_range)} maps stored values, but this float image lies in "
            f"[{float(pixels.min()):.4g}, {float(pixels.max()):.4g}]: scaled already, so it would come out dark and "
            "flat. Pass rescale_range=None for it, or the image in its stored values."
        )
    if window is not None:
        level, width = CT_WINDOWS[window] if isinstance(window, str) else window
        low, high = level - width / 2, level + width / 2
    elif rescale_range is not None:
        low, high = rescale_range
    elif source_dtype.kind == "f":
        low, high = float(pixels.min()), float(pixels.max())
        if not normalised_per_image and (low < -UNIT_RANGE_SLACK or high > 1 + UNIT_RANGE_SLACK):
            raise ValueError(
                f"Float image values span [{low:.4g}, {high:.4g}], but float images without a window are taken as "
                f"already scaled to [0, 1]. CT in Hounsfield units (load_dicom gives those): pass window= (a preset "
                f"of {sorted(CT_WINDOWS)} or [level, width]); other physical ranges: rescale_range=[low, high]; "
                "MRI and other arbitrary units: normalization='image'."
            )
        return pixels
    elif source_dtype in DTYPE_RANGES:
        return pixels / DTYPE_RANGES[source_dtype][1]
    elif normalised_per_image:  # per-image normalisation follows, which no stored range would change
        return pixels
    else:
        raise ValueError(
            f"{source_dtype} images have no agreed intensity range (this one spans [{float(pixels.min()):.6g}, "
            f"{float(pixels.max()):.6g}]): pass rescale_range=[low, high], the range the values were stored in "
            "(12-bit X-ray: [0, 4095]; full 16-bit: [0, 65535]; 8-bit values widened on the way, as datasets' "
            "with_format('numpy') gives them: [0, 255]), or for CT in Hounsfield units window= (a preset of "
            f"{sorted(CT_WINDOWS)} or [level, width])."
        )
    return ((pixels - low) / (high - low)).clamp_(0.0, 1.0)


# ---------------------------------------------------------------------------------------------- medical files

# DICOM Modality (0008,0060) -> our modality vocabulary.
DICOM_MODALITIES = {
    "CT": "ct",
    "MR": "mri",
    "CR": "xray",
    "DX": "xray",
    "RF": "xray",
    "XA": "xray",
    "MG": "mammography",
    "US": "ultrasound",
    "PT": "pet",
    "OP": "fundus",
    "OPT": "oct",
    "SM": "pathology",
    "ES": "endoscopy",
}
# DICOM BodyPartExamined (0018,0015) -> our body-part vocabulary.
DICOM_BODY_PARTS = {
    "HEAD": "head",
    "SKULL": "head",
    "BRAIN": "brain",
    "EYE": "eye",
    "NECK": "neck",
    "CHEST": "chest",
    "THORAX": "chest",
    "LUNG": "chest",
    "BREAST": "breast",
    "ABDOMEN": "abdomen",
    "LIVER": "abdomen",
    "PELVIS": "pelvis",
    "SPINE": "spine",
    "CSPINE": "spine",
    "TSPINE": "spine",
    "LSPINE": "spine",
    "ARM": "upper_limb",
    "HAND": "upper_limb",
    "SHOULDER": "upper_limb",
    "ELBOW": "upper_limb",
    "WRIST": "upper_limb",
    "LEG": "lower_limb",
    "KNEE": "lower_limb",
    "FOOT": "lower_limb",
    "ANKLE": "lower_limb",
    "HIP": "lower_limb",
    "SKIN": "skin",
    "COLON": "colon",
    "KIDNEY": "kidney",
    "WHOLEBODY": "whole_body",
}


@dataclass
class MedicalImage:
    """Voxels as read from a medical file, with what the file says about them."""

    array: np.ndarray
    spatial_dims: int
    modality: str = "unknown"
    body_part: str = "unknown"
    spacing: tuple[float, ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    orientation: str | None = None  # of a volume: where each spatial axis points ("SPL"), None where unknown

    @property
    def layout(self) -> str:
        """Axes of `array`: spatial axes, then a channel axis when there is one more axis than spatial ones."""
        spatial = "HW" if self.spatial_dims == 2 else "DHW"
        return spatial + "C" if self.array.ndim == self.spatial_dims + 1 else spatial


def reorient(array: np.ndarray, source: str, target: str) -> tuple[np.ndarray, list[int]]:
    """`array` (spatial axes first) turned from orientation `source` to `target`, and the source axis of each new one.

    E.g. "SPL" (`load_nifti`'s (z, y, x)) to "LPS" is a transpose; "RAS" to "LPS" flips the first two axes.
    """
    for code in (source, target):
        if problem := orientation_problem(code):
            raise ValueError(f"{problem}.")
    pair_of = {letter: pair for pair in ORIENTATION_PAIRS for letter in pair}
    axis_of = {pair_of[letter]: axis for axis, letter in enumerate(source)}
    order = [axis_of[pair_of[wanted]] for wanted in target]
    array = np.transpose(array, order + list(range(3, array.ndim)))
    flips = [axis for axis, wanted in enumerate(target) if source[order[axis]] != wanted]
    return (np.flip(array, flips) if flips else array), order


def turned_to(images: Any, orientation: str | None) -> Any:
    """The volumes read from files among `images` turned to `orientation` (None: as they are); other images as given.

    A file volume whose orientation is unknown (a DICOM series without ImageOrientationPatient) is warned about."""
    if orientation is None:
        return images

    def turn(image: Any) -> Any:
        if not _is_medical_image(image) or image.spatial_dims != 3 or image.orientation == orientation:
            return image
        if image.orientation is None:
            logger.warning_once(
                f"A volume whose file records no orientation is taken as stored, not turned to {orientation!r} (the "
                "orientation the model's volumes had): check which way its axes point."
            )
            return image
        array, order = reorient(image.array, image.orientation, orientation)
        spacing = None if image.spacing is None else tuple(image.spacing[axis] for axis in order)
        return replace(image, array=np.ascontiguousarray(array), orientation=orientation, spacing=spacing)

    return [turn(image) for image in images] if isinstance(images, (list, tuple)) else turn(images)


def _import_optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(
            f"Reading this file needs {name}: pip install 'medformer-hf[medical]' (or {name})."
        ) from error


def load_nifti(
    path: str | os.PathLike, modality: str = "unknown", body_part: str = "unknown", volume: int | None = None
) -> MedicalImage:
    """Read a NIfTI volume as (D, H, W) float32 (axes reversed from NIfTI's x, y, z), scaled by the header's slope.

    The voxels are first turned to the closest LPS+ orientation of the file's affine (x to the patient's left, y to
    posterior, z to superior), so a scan gives the same array whatever axis order and direction it was stored in (left
    stays left), and the same array as `load_dicom` gives for its axial DICOM series: slices from inferior to superior,
    rows from anterior to posterior, columns from the patient's right to left (the radiological view). A single slice
    (one axis of size 1, in any plane) is a 2D image, shown as a radiologist sees it: a coronal or sagittal slice has
    its rows from superior to inferior (head at the top, as its DICOM is stored). NIfTI has no modality tag: pass
    `modality=` (e.g. "mri") when you know it. For a 4D series (fMRI, DWI), `volume` picks the volume.
    """
    nibabel = _import_optional("nibabel")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No NIfTI file at {path}.")
    image = nibabel.load(str(path))
    orientations = nibabel.orientations
    to_lps = orientations.ornt_transform(orientations.io_orientation(image.affine), orientations.axcodes2ornt("LPS"))
    image = image.as_reoriented(to_lps)
    array = np.asarray(image.get_fdata(dtype=np.float32))
    if volume is not None and array.ndim != 4:
        raise ValueError(f"volume={volume} picks a volume of a 4D series, but {path} holds one {array.shape}: drop it.")
    if volume is not None and not 0 <= volume < array.shape[-1]:
        raise ValueError(f"volume={volume} is out of range: {path} holds volumes 0 to {array.shape[-1] - 1}.")
    if array.ndim == 4 and (volume is not None or array.shape[-1] == 1):
        array = array[..., volume or 0]
    axes = list(range(array.ndim))
    if array.ndim == 3 and array.shape.count(1) == 1:  # one slice, in any plane: a 2D image, not a volume 1 thick
        axes.remove(array.shape.index(1))
        array = array.squeeze(array.shape.index(1))
    if array.ndim not in (2, 3):
        raise ValueError(f"{path} holds a {array.ndim}-D array {array.shape}; pass volume=<index> to pick one volume.")
    spacing = tuple(float(image.header.get_zooms()[axis]) for axis in axes)
    array = array.transpose()
    if array.ndim == 2 and axes[-1] == 2:  # a coronal or sagittal slice: rows superior to inferior, as it is shown
        array = array[::-1]
    return MedicalImage(
        array=np.ascontiguousarray(array),
        spatial_dims=array.ndim,
        modality=modality,
        body_part=body_part,
        spacing=spacing[::-1],
        orientation="SPL" if array.ndim == 3 else None,  # LPS's (x, y, z), reversed
        metadata={
            "affine": image.affine.tolist(),
            "description": image.header["descrip"].item().decode(errors="replace"),
        },
    )


def _dicom_slice(dataset: Any) -> np.ndarray:
    pixels = _stored_pixels(dataset)
    slope = float(getattr(dataset, "RescaleSlope", 1) or 1)
    intercept = float(getattr(dataset, "RescaleIntercept", 0) or 0)
    return pixels * slope + intercept


def _stored_pixels(dataset: Any) -> np.ndarray:
    """The stored values as float32, with MONOCHROME1 (low values shown white) mirrored within the range its stored
    bits hold, before any rescale: one stored value then gives one intensity in every image and slice."""
    pixels = dataset.pixel_array.astype(np.float32)
    if getattr(dataset, "PhotometricInterpretation", "") != "MONOCHROME1":
        return pixels
    bits = int(getattr(dataset, "BitsStored", 0) or getattr(dataset, "BitsAllocated", 0) or 16)
    signed = int(getattr(dataset, "PixelRepresentation", 0) or 0) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return np.float32(low + high) - pixels


def _frame_attribute(dataset: Any, frame: int, sequence: str, attribute: str) -> Any:
    """An attribute of an enhanced (multi-frame) DICOM's functional groups: the frame's own, else the shared one."""
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    shared = dataset.get("SharedFunctionalGroupsSequence")
    for group in (per_frame[frame] if per_frame else None, shared[0] if shared else None):
        if group is not None and sequence in group and attribute in group[sequence][0]:
            return group[sequence][0][attribute].value
    return None


def _enhanced_frames(dataset: Any) -> tuple[np.ndarray, float | None]:
    """The frames of an enhanced (multi-frame) DICOM, each rescaled by its functional groups' slope/intercept (where
    Enhanced CT keeps them, so it comes out in Hounsfield units) and sorted by position along the slice normal, and
    the spacing of the frames (None without plane positions)."""
    frames = _stored_pixels(dataset)
    for index in range(len(frames)):
        slope = _frame_attribute(dataset, index, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _frame_attribute(dataset, index, "PixelValueTransformationSequence", "RescaleIntercept")
        frames[index] = frames[index] * float(slope or 1) + float(intercept or 0)
    positions = [
        _frame_attribute(dataset, i, "PlanePositionSequence", "ImagePositionPatient") for i in range(len(frames))
    ]
    orientation = _frame_attribute(dataset, 0, "PlaneOrientationSequence", "ImageOrientationPatient")
    if orientation is None or any(position is None for position in positions):
        return frames, None
    depths = np.asarray([_along_normal(position, orientation) for position in positions])
    order = np.argsort(depths, kind="stable")
    return frames[order], abs(float(depths[order[1]] - depths[order[0]]))


def load_dicom(path: str | os.PathLike) -> MedicalImage:
    """Read one DICOM file (an enhanced multi-frame file is a volume), or a folder of one series' single-slice files
    stacked into a volume sorted by slice position (several series, or slices that share a position, are refused).

    Rows and columns stay as stored; slices run along the slice normal. For the usual axial series that is what
    `load_nifti` gives for the same scan: inferior to superior, anterior to posterior, patient's right to left.

    Rescale slope/intercept are applied (CT comes out in Hounsfield units); Modality and BodyPartExamined map to the
    Medformer vocabularies ("unknown" where a tag is missing or has no counterpart).
    """
    pydicom = _import_optional("pydicom")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No DICOM file or folder at {path}.")
    frame_spacing = orientation = None  # an enhanced multi-frame file's, from its functional groups
    if path.is_dir():  # hidden files (.DS_Store) are not slices; any other file must be DICOM
        files = [file for file in sorted(path.iterdir()) if file.is_file() and not file.name.startswith(".")]
        datasets = [_read_dicom(pydicom, file) for file in files]
        datasets = [dataset for dataset in datasets if "PixelData" in dataset]
        if not datasets:
            raise ValueError(f"{path} holds no DICOM files with pixel data.")
        _check_one_series(path, datasets)
        datasets.sort(key=_slice_position)
        array = np.stack([_dicom_slice(dataset) for dataset in datasets])
        first, spatial_dims = datasets[0], 3
        if len(datasets) == 1:  # a one-file "series" is a 2D image, not a volume of depth 1
            array, spatial_dims = array[0], 2
    else:
        first = _read_dicom(pydicom, path)
        if "PixelData" not in first:
            raise ValueError(f"{path} has no pixel data (is it a report or a structure set?).")
        spatial_dims = 3 if int(getattr(first, "NumberOfFrames", 1) or 1) > 1 else 2
        enhanced = spatial_dims == 3 and (
            "PerFrameFunctionalGroupsSequence" in first or "SharedFunctionalGroupsSequence" in first
        )
        array, frame_spacing = _enhanced_frames(first) if enhanced else (_dicom_slice(first), None)
        if enhanced and frame_spacing is not None:  # its frames were sorted along the slice normal
            orientation = _frame_attribute(first, 0, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = [float(s) for s in getattr(first, "PixelSpacing", [])]
    if path.is_dir() and len(datasets) > 1:
        spacing = [abs(_slice_position(datasets[1]) - _slice_position(datasets[0]))] + spacing
        if all(getattr(dataset, "ImagePositionPatient", None) is not None for dataset in datasets):
            orientation = getattr(first, "ImageOrientationPatient", None)  # then sorted along the slice normal
    elif frame_spacing is not None:
        pixel_spacing = _frame_attribute(first, 0, "PixelMeasuresSequence", "PixelSpacing")
        spacing = [frame_spacing, *map(float, pixel_spacing)] if pixel_spacing else []
    return MedicalImage(
        array=array,
        spatial_dims=spatial_dims,
        modality=DICOM_MODALITIES.get(str(getattr(first, "Modality", "")).upper(), "unknown"),
        body_part=DICOM_BODY_PARTS.get(str(getattr(first, "BodyPartExamined", "")).upper().replace(" ", ""), "unknown"),
        spacing=tuple(spacing) or None,
        orientation=_volume_orientation(orientation) if spatial_dims == 3 else None,
        metadata={
            "Modality": getattr(first, "Modality", None),
            "BodyPartExamined": getattr(first, "BodyPartExamined", None),
        },
    )


def _read_dicom(pydicom: Any, file: Path) -> Any:
    try:
        return pydicom.dcmread(str(file))
    except pydicom.errors.InvalidDicomError as error:
        raise ValueError(
            f"{file} is not a DICOM file ({error}). Pass PNG/JPEG/TIFF images as arrays or PIL images (the medical "
            "pipeline also takes their paths), NIfTI as .nii/.nii.gz; in a DICOM series folder, move other files out."
        ) from error


def _check_one_series(path: Path, datasets: list[Any]) -> None:
    """A folder is read as one volume: refuse several series (kernels, phases) and slices that share a position, which
    stacking would interleave into one scan."""
    series: dict[str, list[Any]] = {}
    for dataset in datasets:
        series.setdefault(str(getattr(dataset, "SeriesInstanceUID", "") or "(no SeriesInstanceUID)"), []).append(
            dataset
        )
    if len(series) > 1:
        described = "; ".join(
            f"{uid} ({getattr(members[0], 'SeriesDescription', '') or 'no description'}): {len(members)} files"
            for uid, members in series.items()
        )
        raise ValueError(
            f"{path} holds {len(series)} DICOM series, and a folder is read as one volume: {described}. Move each "
            "series into a folder of its own and load the one you mean."
        )
    positions = sorted(_slice_position(dataset) for dataset in datasets)
    shared = sorted({low for low, high in zip(positions, positions[1:], strict=False) if low == high})
    if shared:
        raise ValueError(
            f"{path}: {len(datasets)} files but several share a slice position ({shared[:3]}): echoes, phases or "
            "repeats of one series (or slices without ImagePositionPatient and InstanceNumber). Put one image per "
            "position in a folder (e.g. split by EchoNumbers or TemporalPositionIdentifier) and load that."
        )


def _slice_position(dataset: Any) -> float:
    """Position along the slice normal (from ImagePositionPatient and ImageOrientationPatient), else InstanceNumber."""
    position = getattr(dataset, "ImagePositionPatient", None)
    orientation = getattr(dataset, "ImageOrientationPatient", None)
    if position is not None and orientation is not None:
        return _along_normal(position, orientation)
    return float(getattr(dataset, "InstanceNumber", 0))


def _volume_orientation(image_orientation: Any) -> str | None:
    """Where the axes of a volume stacked along the slice normal point (slices, rows, columns), from its slices'
    ImageOrientationPatient (row then column direction cosines, in DICOM's LPS patient axes); None without it."""
    if image_orientation is None:
        return None
    row, column = np.asarray(image_orientation[:3], float), np.asarray(image_orientation[3:], float)
    vectors = np.stack([np.cross(row, column), column, row])  # array axis x patient axis
    directions = np.abs(vectors)
    letters = [""] * 3
    for _ in range(3):  # the closest pair first, then the next among those left: an oblique scan gets each pair once
        axis, patient = np.unravel_index(int(np.argmax(directions)), directions.shape)
        letters[axis] = ("LPS" if vectors[axis, patient] > 0 else "RAI")[patient]
        directions[axis, :], directions[:, patient] = -1.0, -1.0
    return "".join(letters)


def _along_normal(position: Any, orientation: Any) -> float:
    """A DICOM ImagePositionPatient projected on the normal of its ImageOrientationPatient (row x column cosines)."""
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    return float(np.dot(normal, np.asarray(position, float)))


MedformerImageProcessor.register_for_auto_class()

__all__ = ["MedformerImageProcessor", "MedicalImage", "load_dicom", "load_nifti", "CT_WINDOWS"]
