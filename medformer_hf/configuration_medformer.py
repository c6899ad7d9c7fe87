"""Medformer configuration.

This file is shipped with every checkpoint (Hub remote code): it may import only the standard library and
`transformers`, and nothing from the `medformer_hf` package.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import os
from typing import Any

from transformers import PretrainedConfig
from transformers.activations import ACT2FN

# Index 0 of every vocabulary is "unknown". A sample whose modality or body part was not given at all carries
# UNSPECIFIED_ID instead: the model then uses its task's registered one (or "unknown" where there is no task).
UNSPECIFIED_ID = -1
DEFAULT_MODALITY_NAMES = [
    "unknown",
    "xray",
    "ct",
    "mri",
    "mra",
    "pet",
    "ultrasound",
    "mammography",
    "pathology",
    "dermatoscopy",
    "oct",
    "fundus",
    "endoscopy",
    "microscopy",
    "electron_microscopy",
]
DEFAULT_BODY_PART_NAMES = [
    "unknown",
    "head",
    "brain",
    "eye",
    "neck",
    "chest",
    "breast",
    "abdomen",
    "pelvis",
    "spine",
    "upper_limb",
    "lower_limb",
    "skin",
    "colon",
    "kidney",
    "blood",
    "whole_body",
]
# Every class a checkpoint can be loaded as with `trust_remote_code=True`. `save_pretrained` would write only the
# saved class's entry, so the config carries the whole map.
AUTO_MAP = {
    "AutoConfig": "configuration_medformer.MedformerConfig",
    "AutoModel": "modeling_medformer.MedformerModel",
    "AutoModelForPreTraining": "modeling_medformer.MedformerForPreTraining",
    "AutoModelForImageClassification": "modeling_medformer.MedformerForImageClassification",
}
# The custom pipeline a saved folder offers to `transformers.pipeline(..., trust_remote_code=True)`.
CUSTOM_PIPELINES = {
    "medical-image-classification": {
        "impl": "pipeline_medformer.MedicalImageClassificationPipeline",
        "pt": ["AutoModelForImageClassification"],
        "tf": [],
        "type": "image",
    }
}
TASK_TYPES = ("multiclass", "multilabel", "binary", "ordinal", "regression")
TOKENIZERS = ("conv", "linear")
WEIGHT_INITS = ("fan_in", "fixed")
# A volume's orientation: for each spatial axis, the anatomical direction it points to (nibabel's axis codes), one
# letter of each pair, e.g. "LPS": axis 0 toward the patient's left, axis 1 toward posterior, axis 2 toward superior.
ORIENTATION_PAIRS = ("LR", "AP", "SI")


def orientation_problem(code: Any) -> str | None:
    """Why `code` is not a volume orientation ("LPS", "SPL", "RAS", ...); None when it is."""
    if isinstance(code, str) and len(code) == 3:
        if all(sum(letter in pair for letter in code) == 1 for pair in ORIENTATION_PAIRS):
            return None
    return (
        f"{code!r} is not a volume orientation: give 3 letters, one of each of L/R, A/P and S/I, naming the direction "
        "each axis points to (e.g. 'LPS': axis 0 toward the patient's left, 1 toward posterior, 2 toward superior)"
    )


def closest_option(name: str, options: list[str], cutoff: float = 0.75) -> str | None:
    """The option `name` most likely misspells (difflib's similarity at least `cutoff`), or None."""
    close = difflib.get_close_matches(name, options, n=1, cutoff=cutoff)
    return close[0] if close else None


# Keys every config.json that save_pretrained writes holds, and a config built in code does not.
SAVED_CONFIG_KEYS = frozenset({"transformers_version", "model_type", "architectures", "auto_map", "task_order"})
SSL_TASKS = ("masked_reconstruction", "view_agreement", "slice_consistency")


def num_task_outputs(task_type: str, num_labels: int) -> int:
    """Width of the logits a task head produces: binary has one logit, ordinal K-1 cumulative logits."""
    if task_type == "binary":
        return 1
    if task_type == "ordinal":
        return num_labels - 1
    return num_labels


class MedformerConfig(PretrainedConfig):
    r"""
    Configuration of a Medformer: Input Adaptformer -> Main Body -> Output Adaptformer.

    Args:
        hidden_size (`int`, *optional*, defaults to 256):
            Width of patch tokens, latents and task queries.
        num_latents (`int`, *optional*, defaults to 16):
            Number of learned latents the Input Adaptformer reads every image into. After it, compute no longer
            depends on the image size. 16 trained as well as 48 or 64 in 3-seed single-task runs (BENCHMARKS.md) and
            keeps a 28x28 image (49 patch tokens) cheaper than a ViT over its patches.
        num_hidden_layers (`int`, *optional*, defaults to 6):
            Self-attention layers of the Main Body.
        num_attention_heads (`int`, *optional*, defaults to 8):
            Heads of the Main Body's self-attention.
        num_cross_attention_heads (`int`, *optional*, defaults to 4):
            Heads of the cross-attention in the Input and Output Adaptformers.
        num_input_layers (`int`, *optional*, defaults to 1):
            Cross-attention blocks in which the latents read the patch tokens.
        num_output_layers (`int`, *optional*, defaults to 1):
            Cross-attention blocks in which task queries read the body latents.
        num_decoder_layers (`int`, *optional*):
            Cross-attention blocks of the pre-training pixel decoder (default: `num_output_layers`). From the second
            block on, each position's query depends on the image, so it can ask for that image's detail.
        num_task_queries (`int`, *optional*, defaults to 4):
            Learned queries owned by each task; their outputs are averaged before the task's linear head.
        mlp_ratio (`float`, *optional*, defaults to 4.0):
            MLP width relative to `hidden_size`.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the MLPs (any name in `transformers.activations.ACT2FN`).
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout after attention and MLP projections.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout on attention weights.
        drop_path_rate (`float`, *optional*, defaults to 0.0):
            Stochastic depth of the Main Body: its blocks drop their residual branches per sample in training with
            rates rising linearly from 0 (first block) to this value (last block), as in DeiT / timm.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of every LayerNorm.
        qkv_bias (`bool`, *optional*, defaults to `True`):
            Bias in the query/key/value projections.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the truncated normal used for embeddings, latents and queries (and for every weight when
            `weight_init="fixed"`).
        weight_init (`str`, *optional*, defaults to `"fan_in"`):
            Init of linear and convolution weights. `"fan_in"`: truncated normal with std `1 / sqrt(fan_in)`, so
            activations keep their scale at any width; `"fixed"`: std `initializer_range` (ViT's 0.02, made for width
            768: at width 128 it left small models at the class prior, see BENCHMARKS.md).
        patch_size_2d (`int`, *optional*, defaults to 4):
            Patch edge for 2D images; height and width must be multiples of it.
        patch_size_3d (`int`, *optional*, defaults to 4):
            Patch edge for 3D volumes; depth, height and width must be multiples of it.
        tokenizer (`str`, *optional*, defaults to `"conv"`):
            How the Input Adaptformer turns pixels into patch tokens. `"conv"`: a stem of stride-2 3x3(x3)
            convolutions with channel LayerNorm and GELU (Xiao et al. 2021, "Early convolutions help transformers see
            better"): the locality bias that lets the model learn from a few hundred images. `"linear"`: one linear
            map per patch (ViT).
            Both give the same token grid (one token per patch). Folders saved before this option existed load as
            `"linear"`.
        conv_stem_channels (`list[int]`, *optional*, defaults to `[32]`):
            Widths of the stem's intermediate convolutions; the stem has `len + 1` stride-2 convolutions, so patch
            sizes must equal `2 ** (len(conv_stem_channels) + 1)` (4 for the default).
        conv_stem_blocks (`int`, *optional*, defaults to 0):
            Residual stride-1 3x3(x3) convolution blocks after each of the stem's intermediate stride-2 convolutions:
            deeper local features at the same token grid (0: the plain stem).
        input_channels_2d (`list[int]`, *optional*, defaults to `[1, 3]`):
            Channel counts that get a 2D patch embedding (and a 2D pixel decoder for pre-training).
        input_channels_3d (`list[int]`, *optional*, defaults to `[1]`):
            Channel counts that get a 3D patch embedding.
        image_size_2d, image_size_3d (`list[int]`, *optional*):
            The input sizes the weights were trained at (what the processor saved with them resizes images to),
            recorded by the model itself whenever it trains at another size (in any training loop):
            `MedformerImageProcessor.from_model_config` takes them as its sizes, so a processor built from the
            config alone feeds the model what it learned from. None: not recorded (not trained at that
            dimensionality yet).
        num_position_bands (`int`, *optional*, defaults to 16):
            Fourier frequency bands per axis of the coordinate features; they work for any image size.
        max_position_frequency (`float`, *optional*, defaults to 32.0):
            Highest Fourier frequency (Nyquist-like: about half the largest patch-grid edge worth resolving).
        modality_names (`list[str]`, *optional*):
            Imaging modality vocabulary, index 0 = "unknown". Shared with the image processor.
        body_part_names (`list[str]`, *optional*):
            Body part vocabulary, index 0 = "unknown". Shared with the image processor.
        private_output_tasks (`list[str]`, *optional*):
            Tasks that read the latents through an Output Adaptformer of their own instead of the shared one: a task
            grown onto a trained checkpoint can then adapt what it reads while every other task stays unchanged.
        adapter_tasks (`dict[str, int]`, *optional*):
            Tasks whose samples go through the Main Body with low-rank adapters of their own (LoRA on every linear
            map of the body), `{task: rank}`: a task grown onto a trained checkpoint can then adapt the latents
            themselves while every other task still runs the body unchanged.
        input_adapter_tasks (`list[str]`, *optional*):
            Tasks of `adapter_tasks` whose adapters (same rank) also cover the Input Adaptformer's cross-attention
            layers: a grown task can then change what its latents read from the image, not only how they are mixed.
        tasks (`dict[str, dict]`, *optional*):
            Task registry `{name: {"type", "num_labels", "id2label", "modality", "body_part"}}`; `type` is one of
            multiclass, multilabel, binary, ordinal, regression. Per-sample task ids index `list(config.tasks)`,
            which keeps the order the tasks were given in; `add_task` appends, so a checkpoint's ids never change.
            Optional `spatial_dims` (2 or 3) and `num_channels` record the images a task was trained on; the models
            then refuse other inputs (a 2D stack given to a 3D task, colour given to a grayscale one). Optional
            `label_safe_flips` (spatial axes, with `spatial_dims`) are the mirrorings that keep the task's label: the
            views the medical pipeline averages over with `test_time_flips=True`. Optional `orientation` (3D tasks)
            names the anatomical direction each axis of the training volumes points to (e.g. "LPS"): the medical
            pipeline turns volumes read from NIfTI or DICOM to it.
        mask_ratio (`float`, *optional*, defaults to 0.75):
            Fraction of patch tokens dropped before the Input Adaptformer during masked reconstruction.
        mask_unit (`int`, *optional*, defaults to 1):
            Side, in patches, of the square (2D) or cubic (3D) blocks that masking keeps or drops together: 1 masks
            single patches (ViTMAE); 2 masks 2x2(x2) blocks, so a dropped patch's neighbours are mostly dropped too
            and it cannot be filled in from them.
        norm_pix_loss (`bool`, *optional*, defaults to `False`):
            Reconstruct per-patch normalised pixels (MAE). Off by default: on sparse volumes (VesselMNIST3D) most
            patches are near-constant and their normalised targets are amplified noise.
        ssl_tasks (`list[str]`, *optional*, defaults to `["masked_reconstruction", "view_agreement"]`):
            Pretext tasks of `MedformerForPreTraining`: `masked_reconstruction` (always on: the others build on its
            masked views), `view_agreement` (two views of each image identify each other) and `slice_consistency`
            (a 3D volume and one of its own 2D slices identify each other: what only a 2D+3D model can learn).
        ssl_loss_weights (`dict[str, float]`, *optional*):
            Weight of each pretext loss in the total; defaults to 1.0 for reconstruction and 0.1 for the others.
        projection_dim (`int`, *optional*, defaults to 128):
            Output width of the projector shared by the two agreement pretexts.
        agreement_temperature (`float`, *optional*, defaults to 0.1):
            Temperature of their InfoNCE losses.

    Example:

    ```python
    >>> from medformer_hf import MedformerConfig, MedformerModel
    >>> config = MedformerConfig(tasks={"pneumonia": {"type": "binary", "num_labels": 2, "modality": "xray"}})
    >>> model = MedformerModel(config)
    ```
    """

    model_type = "medformer"
    # Output fields that transformers.Trainer should not collect as predictions (it keeps `logits`).
    keys_to_ignore_at_inference = ["task_logits", "task_indices", "task_losses", "pooler_output"]

    def __init__(
        self,
        hidden_size: int = 256,
        num_latents: int = 16,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 8,
        num_cross_attention_heads: int = 4,
        num_input_layers: int = 1,
        num_output_layers: int = 1,
        num_decoder_layers: int | None = None,
        num_task_queries: int = 4,
        mlp_ratio: float = 4.0,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        initializer_range: float = 0.02,
        weight_init: str = "fan_in",
        patch_size_2d: int = 4,
        patch_size_3d: int = 4,
        tokenizer: str | None = None,
        conv_stem_channels: list[int] | None = None,
        conv_stem_blocks: int = 0,
        input_channels_2d: list[int] | None = None,
        input_channels_3d: list[int] | None = None,
        image_size_2d: list[int] | None = None,
        image_size_3d: list[int] | None = None,
        num_position_bands: int = 16,
        max_position_frequency: float = 32.0,
        modality_names: list[str] | None = None,
        body_part_names: list[str] | None = None,
        tasks: dict[str, dict[str, Any]] | None = None,
        mask_ratio: float = 0.75,
        mask_unit: int = 1,
        norm_pix_loss: bool = False,
        ssl_tasks: list[str] | None = None,
        ssl_loss_weights: dict[str, float] | None = None,
        projection_dim: int = 128,
        agreement_temperature: float = 0.1,
        private_output_tasks: list[str] | None = None,
        adapter_tasks: dict[str, int] | None = None,
        input_adapter_tasks: list[str] | None = None,
        **kwargs,
    ):
        if not SAVED_CONFIG_KEYS & set(kwargs):  # built here, not read from a saved config (which may hold old fields)
            self.refuse_near_misses(kwargs)
        self.hidden_size = hidden_size
        self.num_latents = num_latents
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_cross_attention_heads = num_cross_attention_heads
        self.num_input_layers = num_input_layers
        self.num_output_layers = num_output_layers
        self.num_decoder_layers = num_output_layers if num_decoder_layers is None else num_decoder_layers
        self.num_task_queries = num_task_queries
        self.mlp_ratio = mlp_ratio
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.initializer_range = initializer_range
        self.weight_init = weight_init
        self.patch_size_2d = patch_size_2d
        self.patch_size_3d = patch_size_3d
        if tokenizer is None:  # a saved config without the field predates the conv stem: it holds linear patches
            tokenizer = "linear" if "transformers_version" in kwargs else "conv"
        self.tokenizer = tokenizer
        self.conv_stem_channels = list(conv_stem_channels) if conv_stem_channels is not None else [32]
        self.conv_stem_blocks = conv_stem_blocks
        self.input_channels_2d = list(input_channels_2d) if input_channels_2d is not None else [1, 3]
        self.input_channels_3d = list(input_channels_3d) if input_channels_3d is not None else [1]
        self.image_size_2d = _listed(image_size_2d)
        self.image_size_3d = _listed(image_size_3d)
        self.num_position_bands = num_position_bands
        self.max_position_frequency = max_position_frequency
        self.modality_names = list(modality_names) if modality_names is not None else list(DEFAULT_MODALITY_NAMES)
        self.body_part_names = list(body_part_names) if body_part_names is not None else list(DEFAULT_BODY_PART_NAMES)
        self.mask_ratio = mask_ratio
        self.mask_unit = mask_unit
        self.norm_pix_loss = norm_pix_loss
        self.ssl_tasks = list(ssl_tasks) if ssl_tasks is not None else ["masked_reconstruction", "view_agreement"]
        # Only the active pretexts' weights are written, so a config without slice consistency still loads where
        # an older medformer_hf (which does not know that pretext) reads it.
        weights = {
            task: 1.0 if task == "masked_reconstruction" else 0.1 for task in self.ssl_tasks if task in SSL_TASKS
        }
        weights.update(ssl_loss_weights or {})
        self.ssl_loss_weights = weights
        self.projection_dim = projection_dim
        self.agreement_temperature = agreement_temperature
        self._validate_sizes()
        # In the order given (or recorded): task ids index it. config.json sorts its keys, so `to_dict` records the
        # order as `task_order`; folders saved before that field were saved (and trained) in sorted order.
        tasks = tasks or {}
        task_order = kwargs.pop("task_order", None) or list(tasks)
        if sorted(task_order) != sorted(tasks):
            raise ValueError(f"task_order {task_order} does not list the tasks {sorted(tasks)}.")
        self.tasks = {name: tasks[name] for name in task_order}  # checked and normalised by __setattr__
        self.private_output_tasks = list(private_output_tasks or [])
        unknown_private = set(self.private_output_tasks) - set(self.tasks)
        if unknown_private:
            raise ValueError(f"private_output_tasks names {sorted(unknown_private)}, which are not in tasks.")
        self.adapter_tasks = dict(adapter_tasks or {})
        unknown_adapted = set(self.adapter_tasks) - set(self.tasks)
        if unknown_adapted:
            raise ValueError(f"adapter_tasks names {sorted(unknown_adapted)}, which are not in tasks.")
        bad_ranks = {name: rank for name, rank in self.adapter_tasks.items() if not _is_positive_int(rank)}
        if bad_ranks:
            raise ValueError(f"adapter_tasks ranks must be positive integers, got {bad_ranks}.")
        self.input_adapter_tasks = list(input_adapter_tasks or [])
        without_rank = set(self.input_adapter_tasks) - set(self.adapter_tasks)
        if without_rank:
            raise ValueError(
                f"input_adapter_tasks names {sorted(without_rank)}, which have no rank in adapter_tasks "
                f"{self.adapter_tasks}; add them there too."
            )
        kwargs["auto_map"] = {**AUTO_MAP, **(kwargs.get("auto_map") or {})}
        kwargs["custom_pipelines"] = {**CUSTOM_PIPELINES, **(kwargs.get("custom_pipelines") or {})}
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ validation

    def _validate_sizes(self) -> None:
        positive_ints = (
            "hidden_size",
            "num_latents",
            "num_hidden_layers",
            "num_attention_heads",
            "num_cross_attention_heads",
            "num_input_layers",
            "num_output_layers",
            "num_decoder_layers",
            "num_task_queries",
            "patch_size_2d",
            "patch_size_3d",
            "num_position_bands",
            "projection_dim",
            "mask_unit",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(f"MedformerConfig.{name} must be a positive integer, got {value!r}.")
        if not (_is_int(self.conv_stem_blocks) and self.conv_stem_blocks >= 0):
            raise ValueError(
                f"MedformerConfig.conv_stem_blocks must be an integer >= 0, got {self.conv_stem_blocks!r}."
            )
        if self.conv_stem_blocks and (self.tokenizer != "conv" or not self.conv_stem_channels):
            raise ValueError(
                f"MedformerConfig.conv_stem_blocks={self.conv_stem_blocks} adds blocks after the conv stem's "
                f"intermediate convolutions, but tokenizer={self.tokenizer!r} with conv_stem_channels="
                f'{self.conv_stem_channels} has none: use tokenizer="conv" with at least one conv_stem_channels entry, '
                "or conv_stem_blocks=0."
            )
        for heads in ("num_attention_heads", "num_cross_attention_heads"):
            if self.hidden_size % getattr(self, heads):
                raise ValueError(
                    f"MedformerConfig.hidden_size ({self.hidden_size}) must be divisible by {heads} "
                    f"({getattr(self, heads)})."
                )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"MedformerConfig.{name} must be in [0, 1), got {getattr(self, name)!r}.")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"MedformerConfig.mask_ratio must be in (0, 1), got {self.mask_ratio!r}.")
        for name in ("mlp_ratio", "initializer_range", "layer_norm_eps", "max_position_frequency"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MedformerConfig.{name} must be > 0, got {getattr(self, name)!r}.")
        if self.agreement_temperature <= 0:
            raise ValueError(f"MedformerConfig.agreement_temperature must be > 0, got {self.agreement_temperature!r}.")
        for name in ("input_channels_2d", "input_channels_3d"):
            channels = getattr(self, name)
            if any(not isinstance(c, int) or c < 1 for c in channels) or len(set(channels)) != len(channels):
                raise ValueError(f"MedformerConfig.{name} must be distinct positive integers, got {channels!r}.")
        for name, length in (("image_size_2d", 2), ("image_size_3d", 3)):
            size = getattr(self, name)
            if size is not None and (
                not isinstance(size, list) or len(size) != length or not all(_is_int(s) and s >= 1 for s in size)
            ):
                raise ValueError(f"MedformerConfig.{name} must be {length} positive integers or None, got {size!r}.")
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"MedformerConfig.hidden_act must be one of transformers' activations {sorted(ACT2FN)}, got "
                f"{self.hidden_act!r}."
            )
        if self.weight_init not in WEIGHT_INITS:
            raise ValueError(
                f"MedformerConfig.weight_init must be one of {list(WEIGHT_INITS)}, got {self.weight_init!r}."
            )
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"MedformerConfig.tokenizer must be one of {list(TOKENIZERS)}, got {self.tokenizer!r}.")
        if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in self.conv_stem_channels):
            raise ValueError(
                f"MedformerConfig.conv_stem_channels must be positive integers, got {self.conv_stem_channels!r}."
            )
        stem_patch_size = 2 ** (len(self.conv_stem_channels) + 1)
        if self.tokenizer == "conv":
            for name in ("patch_size_2d", "patch_size_3d"):
                if getattr(self, name) != stem_patch_size:
                    raise ValueError(
                        f"MedformerConfig.{name} is {getattr(self, name)}, but a conv stem with conv_stem_channels="
                        f"{self.conv_stem_channels} makes {stem_patch_size}-pixel patches (one stride-2 conv per "
                        f"entry, plus one). Set {name}={stem_patch_size}, change conv_stem_channels, or use "
                        'tokenizer="linear".'
                    )
        if not self.input_channels_2d and not self.input_channels_3d:
            raise ValueError("MedformerConfig needs at least one entry in input_channels_2d or input_channels_3d.")
        for name in ("modality_names", "body_part_names"):
            vocabulary = getattr(self, name)
            if not vocabulary or vocabulary[0] != "unknown":
                raise ValueError(f"MedformerConfig.{name} must start with 'unknown' (index 0), got {vocabulary!r}.")
            if len(set(vocabulary)) != len(vocabulary):
                raise ValueError(f"MedformerConfig.{name} has duplicate names: {vocabulary!r}.")
        unknown_ssl = [task for task in self.ssl_tasks if task not in SSL_TASKS]
        if unknown_ssl or not self.ssl_tasks:
            raise ValueError(
                f"MedformerConfig.ssl_tasks must be a non-empty subset of {list(SSL_TASKS)}, got {self.ssl_tasks!r}."
            )
        if "masked_reconstruction" not in self.ssl_tasks:
            raise ValueError(
                f"MedformerConfig.ssl_tasks must include 'masked_reconstruction' (the other pretexts use its masked "
                f"views), got {self.ssl_tasks!r}."
            )
        if "slice_consistency" in self.ssl_tasks:
            missing = [count for count in self.input_channels_3d if count not in self.input_channels_2d]
            if missing:
                raise ValueError(
                    f"MedformerConfig.ssl_tasks: slice_consistency reads {missing}-channel slices of volumes "
                    f"through the 2D path, but input_channels_2d is {self.input_channels_2d}; add them there or drop "
                    f"the pretext."
                )
        unknown_weights = set(self.ssl_loss_weights) - set(SSL_TASKS)
        if unknown_weights:
            raise ValueError(f"MedformerConfig.ssl_loss_weights has unknown pretext tasks {sorted(unknown_weights)}.")

    def _normalize_task(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Check one task entry and bring it to its canonical JSON-friendly form."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"Task name {name!r} must be a non-empty string without '.' (it names a submodule).")
        spec = copy.deepcopy(dict(spec))
        known_keys = {
            "type",
            "num_labels",
            "id2label",
            "labels",
            "modality",
            "body_part",
            "spatial_dims",
            "num_channels",
            "label_safe_flips",
            "orientation",
        }
        unknown_keys = set(spec) - known_keys
        if unknown_keys:
            raise ValueError(f"Task {name!r} has unknown keys {sorted(unknown_keys)}.")
        task_type = spec.get("type")
        if task_type not in TASK_TYPES:
            raise ValueError(f"Task {name!r} has type {task_type!r}; choose one of {list(TASK_TYPES)}.")
        if "labels" in spec:
            labels = spec.pop("labels")
            if not isinstance(labels, (list, tuple)):  # a dict's keys or a string's characters would be read as names
                raise ValueError(
                    f"Task {name!r}: labels must be a list of class names in class-index order, e.g. ['normal', "
                    f"'malignant'], got {type(labels).__name__} {labels!r}; for a mapping pass id2label={{0: ..., 1: "
                    "...}."
                )
            id2label = dict(enumerate(labels))
        else:
            id2label = {int(k): v for k, v in (spec.get("id2label") or {}).items()}
        num_labels = spec.get("num_labels", len(id2label) or None)
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"Task {name!r} needs a positive integer num_labels, got {num_labels!r}.")
        if task_type == "binary" and num_labels != 2:
            raise ValueError(f"Binary task {name!r} must have num_labels=2, got {num_labels}.")
        if task_type in ("multiclass", "ordinal") and num_labels < 2:
            raise ValueError(f"{task_type} task {name!r} needs num_labels >= 2, got {num_labels}.")
        if not id2label:
            id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        if sorted(id2label) != list(range(num_labels)):
            raise ValueError(f"Task {name!r}: id2label keys must be 0..{num_labels - 1}, got {sorted(id2label)}.")
        normalized = {
            "type": task_type,
            "num_labels": num_labels,
            "id2label": id2label,
            "modality": spec.get("modality", "unknown"),
            "body_part": spec.get("body_part", "unknown"),
        }
        if "spatial_dims" in spec or "num_channels" in spec:  # the images the task takes, recorded together
            dims, channels = spec.get("spatial_dims"), spec.get("num_channels")
            supported = {2: self.input_channels_2d, 3: self.input_channels_3d}
            if dims not in supported or channels not in supported[dims]:
                raise ValueError(
                    f"Task {name!r} has spatial_dims {dims!r} and num_channels {channels!r}; give both, with "
                    f"spatial_dims 2 or 3 and num_channels among that one's input channels {supported}."
                )
            normalized.update(spatial_dims=dims, num_channels=channels)
        if "label_safe_flips" in spec:
            axes, dims = spec["label_safe_flips"], normalized.get("spatial_dims")
            if (
                dims is None
                or not isinstance(axes, (list, tuple))
                or not all(_is_int(a) and 0 <= a < dims for a in axes)
            ):
                raise ValueError(
                    f"Task {name!r} has label_safe_flips {axes!r}; give a list of spatial axes (0..spatial_dims - 1) "
                    "together with spatial_dims and num_channels."
                )
            normalized["label_safe_flips"] = sorted(set(axes))
        if "orientation" in spec:
            problem = orientation_problem(spec["orientation"])
            if problem or normalized.get("spatial_dims") != 3:
                raise ValueError(
                    f"Task {name!r} has orientation {spec['orientation']!r}: "
                    + (f"{problem}." if problem else "it is for 3D tasks, given with spatial_dims=3 and num_channels.")
                )
            normalized["orientation"] = spec["orientation"]
        for field, vocabulary in (("modality", self.modality_names), ("body_part", self.body_part_names)):
            if normalized[field] not in vocabulary:
                raise ValueError(
                    f"Task {name!r} has {field} {normalized[field]!r}, which is not in the config's {field} "
                    f"vocabulary {vocabulary}. Add it to `{field}_names` when building the config."
                )
        return normalized

    def __setattr__(self, key: str, value: Any) -> None:
        # `from_pretrained(path, tasks=...)` sets the field directly, as does `config.tasks = ...`: each entry is
        # checked and brought to its canonical form as in __init__ (once the vocabularies it is checked against exist).
        if key == "tasks" and isinstance(value, dict) and "body_part_names" in self.__dict__:
            value = {name: self._normalize_task(name, spec) for name, spec in value.items()}
        super().__setattr__(key, value)

    @classmethod
    def refuse_near_misses(cls, kwargs: dict[str, Any]) -> None:
        """PretrainedConfig keeps any keyword as an attribute, so `hidden_dim=64` would build a default-width model
        without a word: a keyword that is not transformers' and nearly names one of ours is refused."""
        own = [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "kwargs")]
        transformers_own = {
            *inspect.signature(PretrainedConfig.__init__).parameters,
            *PretrainedConfig().to_dict(),
            *dir(PretrainedConfig),  # properties such as num_labels
        }
        for key in sorted(set(kwargs) - transformers_own - set(own)):  # an option itself (a loading override) passes
            if close := closest_option(key, own):
                raise ValueError(f"MedformerConfig has no option {key!r}; did you mean {close!r}?")

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> tuple[dict, dict]:
        """transformers reads a folder without config.json as an empty config, so `from_pretrained` would return the
        default model's config for a folder that holds none: that is refused."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if not config_dict:
            raise OSError(
                f"{pretrained_model_name_or_path} has no config.json: pass a folder that save_pretrained wrote (or "
                "the scripts' --output_dir), or a Hub id of a Medformer."
            )
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """transformers drops an override that is no config field, so `from_pretrained(folder, hidden_dim=64)` would
        load the saved width without a word: near misses are refused as in `__init__`. A model's `from_pretrained`
        asks for the unused keywords and passes them to the model, which refuses what it does not take."""
        if kwargs.get("return_unused_kwargs"):
            return super().from_dict(config_dict, **kwargs)
        config, unused = super().from_dict(config_dict, return_unused_kwargs=True, **kwargs)
        cls.refuse_near_misses(unused)
        return config

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["task_order"] = list(self.tasks)  # config.json sorts keys; task ids need the order
        return output

    # ------------------------------------------------------------------ helpers

    def add_task(
        self, name: str, private_output: bool = False, adapter_rank: int = 0, adapt_input: bool = False, **spec: Any
    ) -> None:
        """Register one more task (validated) after the others, so existing task ids keep their meaning;
        `private_output` gives it an Output Adaptformer of its own, `adapter_rank` > 0 Main Body adapters of that
        rank, `adapt_input` adapters on the Input Adaptformer too. Use `MedformerForMultiTask.add_task` to also add
        its weights."""
        if name in self.tasks:
            raise ValueError(f"Task {name!r} already exists in the config; pick another name.")
        if adapter_rank != 0 and not _is_positive_int(adapter_rank):
            raise ValueError(f"adapter_rank must be a positive integer (or 0: no adapters), got {adapter_rank!r}.")
        if adapt_input and not adapter_rank:
            raise ValueError("adapt_input extends the task's adapters to the Input Adaptformer: give an adapter_rank.")
        self.tasks = {**self.tasks, name: spec}  # checked and normalised by __setattr__
        if private_output:
            self.private_output_tasks = [*self.private_output_tasks, name]
        if adapter_rank:
            self.adapter_tasks = {**self.adapter_tasks, name: adapter_rank}
        if adapt_input:
            self.input_adapter_tasks = [*self.input_adapter_tasks, name]

    def task_output_size(self, name: str) -> int:
        """Number of logits the head of task `name` produces."""
        task = self.tasks[name]
        return num_task_outputs(task["type"], task["num_labels"])


def _listed(value: Any) -> Any:
    """A list or tuple as a list; anything else as it is, for the validation to name."""
    return list(value) if isinstance(value, (list, tuple)) else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


MedformerConfig.register_for_auto_class()

__all__ = [
    "MedformerConfig",
    "AUTO_MAP",
    "CUSTOM_PIPELINES",
    "TASK_TYPES",
    "TOKENIZERS",
    "WEIGHT_INITS",
    "SSL_TASKS",
    "num_task_outputs",
]
