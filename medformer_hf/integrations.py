"""Medformer with the tools of the Hugging Face stack: `transformers.Trainer` (a data collator for `datasets` rows
and MedMNIST `compute_metrics`), PEFT (which modules LoRA adapts) and ONNX export.

    dataset = load_medmnist("breastmnist")
    collator = MedformerDataCollator(processor, modality="ultrasound", body_part="breast")
    trainer = Trainer(model, args, train_dataset=dataset["train"], eval_dataset=dataset["validation"],
                      data_collator=collator, compute_metrics=medmnist_compute_metrics("binary"))

Set `TrainingArguments(remove_unused_columns=False)` so the rows keep their `modality` / `body_part` columns (the
collator uses them when present). The Trainer batches rows of one dataset, hence of one input shape.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .image_processing_medformer import MedformerImageProcessor
from .metrics import load_medmnist_metric
from .modeling_medformer import task_probabilities

# LoRA on every attention projection and MLP layer of the Input Adaptformer, Main Body and Output Adaptformer.
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]


def lora_heads(model: torch.nn.Module) -> list[str]:
    """The modules LoRA must train in full beside the adapters: the classifier, or every task head.

    PEFT wraps each `modules_to_save` entry in a copy; the `task_heads` container itself cannot be wrapped (it is a
    `ModuleDict`), and "classifier" matches nothing in a multi-task model, which would silently train no head.
    """
    if hasattr(model, "task_heads"):
        return [f"task_heads.{name}" for name in model.task_heads]
    if hasattr(model, "classifier"):
        return ["classifier"]
    raise ValueError(f"{type(model).__name__} has no head; LoRA fine-tuning needs a classifier or a multi-task model.")


def lora_config(model: torch.nn.Module, r: int = 8, lora_alpha: int = 16, **kwargs: Any):
    """A `peft.LoraConfig` for a Medformer classifier or multi-task model: adapters on every attention projection
    and MLP layer, the head(s) trained in full (`lora_heads`). `kwargs` go to `LoraConfig` (e.g. `lora_dropout`)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=LORA_TARGET_MODULES, modules_to_save=lora_heads(model), **kwargs
    )


class MedformerDataCollator:
    """Rows of a `load_medmnist` split (uint8 `pixel_values`, `label`) -> model inputs through the image processor.

    Each row's image goes to the processor as it is (uint8, float in [0, 1], with or without a channel axis), except
    plain integer rows, which is how `datasets` returns any integer column (`row_image`): with the processor's
    `window` (CT in Hounsfield units), `rescale_range` (e.g. 12- or 16-bit) or `normalization="image"` (MRI) it maps
    them; otherwise they are read as uint8 when every value fits (else refused). Float labels stay float
    (regression), labels of several columns become float (multi-label targets); class labels, one per row or in one
    column, become integers. `task` (a task name) is added to each batch for
    `MedformerForMultiTask`; leave it None for `MedformerForImageClassification`. Rows that carry a `task` column
    (as `load_medmnist` rows do) must name that task: a batch of another set's rows would otherwise train or score
    the wrong head without a word. `modality` / `body_part` are used for rows that do not carry their own.

    `label_smoothing` (with `task`) smooths the multi-task model's own loss (`target_smoothing`: towards 1/2 for its
    sigmoid heads). Trainer's `label_smoothing_factor` replaces the model's loss by a softmax cross-entropy over the
    logits: right for a classifier, wrong for a multi-task model's binary and ordinal heads.
    """

    def __init__(
        self,
        processor: MedformerImageProcessor,
        task: str | None = None,
        modality: str | None = None,
        body_part: str | None = None,
        label_smoothing: float = 0.0,
    ):
        if label_smoothing and task is None:
            raise ValueError(
                "label_smoothing smooths MedformerForMultiTask's loss (pass task=); for "
                "MedformerForImageClassification use TrainingArguments(label_smoothing_factor=...)."
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.label_smoothing = label_smoothing
        self.processor = processor
        self.task = task
        self.modality = modality
        self.body_part = body_part

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if self.task is not None:
            other = sorted({str(row["task"]) for row in rows if row.get("task") not in (None, self.task)})
            if other:
                raise ValueError(
                    f"The collator feeds task={self.task!r}, but rows of this batch are from {other} (their 'task' "
                    f"column): pass task={other[0]!r} for those rows, or train several tasks with "
                    "examples/finetune.py (a task per batch)."
                )
        features = self.processor(
            [row_image(row["pixel_values"], self.processor) for row in rows],
            modality=[row.get("modality") or self.modality for row in rows],  # None: the model uses the task's
            body_part=[row.get("body_part") or self.body_part for row in rows],
        )
        batch = {key: features[key] for key in ("pixel_values", "modality_ids", "body_part_ids")}
        key = "label" if "label" in rows[0] else "labels"
        if key in rows[0]:
            values = np.asarray([row[key] for row in rows])
            if values.dtype.kind not in "biuf":
                raise ValueError(
                    f"The {key!r} column holds {values.dtype} values such as {values.flat[0]!r}: give class indices "
                    "(e.g. dataset.class_encode_column), in the order of the task's labels."
                )
            labels = torch.as_tensor(values)
            # Several columns are multi-label targets; one integer column (MedMNIST's (N, 1) labels) stays classes.
            multilabel = labels.ndim == 2 and labels.shape[1] > 1
            batch["labels"] = labels.float() if multilabel or labels.is_floating_point() else labels.long()
        if self.task is not None:
            batch["task"] = self.task
        if self.label_smoothing:
            batch["target_smoothing"] = self.label_smoothing
        return batch


def row_image(pixels: Any, processor: MedformerImageProcessor) -> np.ndarray:
    """A `datasets` row's image as the image processor reads it. `datasets` gives every integer column back as int64
    (uint8 and uint16 images, CT in Hounsfield units alike), so the processor's settings say what the integers are:
    with a CT `window`, a `rescale_range` or per-image normalisation it maps them itself; without, they are uint8
    display values when they fit, and refused otherwise. Other dtypes are the processor's to read."""
    image = np.asarray(pixels)  # lists, numpy arrays and CPU tensors alike
    processor_maps_integers = (
        processor.window is not None or processor.rescale_range is not None or processor.normalization == "image"
    )
    if image.dtype.kind != "i" or processor_maps_integers:
        return image
    if image.size and (image.min() < 0 or image.max() > 255):
        raise ValueError(
            f"Row pixel values span {image.min()}..{image.max()} as plain integers ({image.dtype}, as datasets gives "
            "any integer column), outside uint8's 0..255: give the collator's image processor the range they were "
            "stored in (rescale_range=[low, high], e.g. [0, 4095] for 12-bit X-ray), or window= for CT in Hounsfield "
            "units, or normalization='image' for MRI; or scale the images to floats in [0, 1]."
        )
    return image.astype(np.uint8)


def medmnist_compute_metrics(task_type: str, num_labels: int | None = None) -> Callable[[Any], dict[str, float]]:
    """A Trainer `compute_metrics` giving MedMNIST ACC/AUC (the official definitions) from the model's raw logits.

    Binary tasks work with one logit (`MedformerForMultiTask`) or two (`MedformerForImageClassification`, whose
    softmax gives the class-1 score the evaluator reads). Ordinal tasks need `num_labels` K: K - 1 logits are the
    multi-task head's cumulative ones, K a classifier's class logits (read by softmax).
    """
    if task_type == "ordinal" and num_labels is None:
        raise ValueError(
            "An ordinal task's logits are K - 1 cumulative ones (MedformerForMultiTask) or K class logits "
            "(MedformerForImageClassification): pass num_labels=K, e.g. len(CATALOGUE[name].labels)."
        )
    metric = load_medmnist_metric(task_type)

    def compute_metrics(evaluation: Any) -> dict[str, float]:
        logits = evaluation.predictions[0] if isinstance(evaluation.predictions, tuple) else evaluation.predictions
        logits = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
        if task_type == "binary":
            scores = task_probabilities(logits, "binary" if logits.shape[-1] == 1 else "multiclass")
        elif task_type == "ordinal" and logits.shape[-1] == num_labels:
            scores = task_probabilities(logits, "multiclass")
        else:
            scores = task_probabilities(logits, task_type, num_labels)
        return metric.compute(predictions=scores.tolist(), references=np.asarray(evaluation.label_ids).tolist())

    return compute_metrics


class _TaskLogits(torch.nn.Module):
    """One task of a multi-task model as a module with a classifier's signature (for export)."""

    def __init__(self, model: torch.nn.Module, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, pixel_values: torch.Tensor, modality_ids: torch.Tensor, body_part_ids: torch.Tensor):
        return self.model(pixel_values, task=self.task, modality_ids=modality_ids, body_part_ids=body_part_ids)


def export_onnx(
    model: torch.nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...], task: str | None = None
) -> Path:
    """Export a classifier, or one `task` of a `MedformerForMultiTask` (its raw logits), to ONNX for one fixed input
    shape.

    Inputs: `pixel_values` of `input_shape` ((B, C, H, W) or (B, C, D, H, W)), `modality_ids` and `body_part_ids`
    of shape (B,) (-1: not given, the task's registered metadata); output: `logits`. Uses torch's dynamo exporter
    (needs the `[onnx]` extra).
    """
    model = model.eval()
    specs = model.config.tasks
    if hasattr(model, "task_heads"):
        tasks = list(specs)
        task = tasks[0] if task is None and len(tasks) == 1 else task
        if task not in tasks:
            raise ValueError(f"Pass the task to export; this multi-task model has {tasks}.")
        if task in model.config.adapter_tasks:  # its rows take a data-dependent route that torch.export cannot trace
            raise ValueError(
                f"Task {task!r} runs through adapters of its own inside the shared model, which the ONNX exporter "
                "cannot trace: take it out first (examples/extract_task.py, or "
                "MedformerForImageClassification.from_multi_task(model, task)) and export that classifier."
            )
        model = _TaskLogits(model, task).eval()
    elif task is not None:
        raise ValueError("task= is for multi-task models; this model has a single head.")
    wanted = (specs.get(task) if task else next(iter(specs.values()), {})).get("num_channels")
    if wanted is not None and input_shape[1] != wanted:  # the model's own check below words it for images
        raise ValueError(
            f"input_shape {tuple(input_shape)} has {input_shape[1]} channels; the task takes {wanted}-channel images: "
            f"pass ({input_shape[0]}, {wanted}, ...)."
        )
    batch = input_shape[0]
    ids = {name: torch.zeros(batch, dtype=torch.long) for name in ("modality_ids", "body_part_ids")}
    # One eager forward first: it refuses a shape the task was not trained on (e.g. colour for a grayscale task),
    # which the exported graph, having no data checks, would read silently (channel 0 only).
    with torch.no_grad():
        model(torch.rand(input_shape), **ids)
    program = torch.onnx.export(
        model,
        (torch.zeros(input_shape),),
        kwargs=ids,
        dynamo=True,
        input_names=["pixel_values", "modality_ids", "body_part_ids"],
        output_names=["logits"],
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    return path
