"""`pipeline("medical-image-classification")`: what transformers' image-classification pipeline cannot take.

2D images and 3D volumes (arrays, tensors, PIL), NIfTI, DICOM and picture (PNG, JPEG, TIFF, BMP) paths (a DICOM
folder is one volume; a picture keeps its stored mode, so a grayscale X-ray stays one channel), imaging modality and
body part, `task=` for multi-task checkpoints, and `test_time_flips=True`: the mean over the flips the task's config
entry records as label-safe (what the checkpoint card's flip-averaged table measures). Arrays are read as the task's
2D images or 3D volumes (its recorded `spatial_dims`), and NIfTI / DICOM volumes are turned to the orientation its
training volumes had (its recorded `orientation`; OrganMNIST3D's is not the files'); an array holding a batch
(e.g. `(N, 1, D, H, W)`) gives one ranked list per image. Shipped with every checkpoint (Hub remote code):

    classifier = pipeline("medical-image-classification", model="user/medformer", trust_remote_code=True)
    classifier("scan.nii.gz", modality="ct", body_part="abdomen", window="soft_tissue", task="organmnist3d")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from transformers import Pipeline

from .configuration_medformer import CUSTOM_PIPELINES
from .image_processing_medformer import load_dicom, load_nifti, unknown_options_message
from .modeling_medformer import classifier_probabilities, flip_views, mean_over_flips, task_probabilities

TASK_NAME = next(iter(CUSTOM_PIPELINES))
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class MedicalImageClassificationPipeline(Pipeline):
    """Named labels with scores for one medical image or volume (highest first)."""

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(
        self,
        task: str | None = None,
        top_k: int | None = None,
        test_time_flips: bool | None = None,
        **processor_kwargs: Any,
    ):
        options = ["task", "top_k", "test_time_flips", *self.image_processor._setting_names()]
        unknown = set(processor_kwargs) - set(options)
        if unknown:
            raise ValueError(unknown_options_message(unknown, options, owner="the medical pipeline"))
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive number of labels, got {top_k!r}; leave it out for every label.")
        tasks = self.model.config.tasks
        if hasattr(self.model, "task_heads"):
            task = next(iter(tasks)) if task is None and len(tasks) == 1 else task
            if task is not None and task not in tasks:
                raise ValueError(f"Unknown task {task!r}; this model's tasks are {list(tasks)}.")
        elif task is not None:
            raise ValueError("task= is for multi-task models; this model has a single task.")
        spec = self._task_spec(task) or {}
        given = {**getattr(self, "_preprocess_params", {}), **processor_kwargs}  # to pipeline(...) or to this call
        # What the task's images were, unless asked otherwise: 2D or 3D (an array is read as such: a batch of 2D
        # images, a thin volume), and the orientation its volumes had (file volumes are turned to it).
        for key in ("spatial_dims", "orientation"):
            if spec.get(key) and given.get(key) is None:
                processor_kwargs[key] = spec[key]
        forward = {} if task is None else {"task": task}
        if test_time_flips is not None:  # given per call, it replaces the one given to pipeline(...)
            forward["test_time_flips"] = bool(test_time_flips)
        postprocess = {} if task is None else {"task": task}
        return processor_kwargs, forward, {**postprocess, **({} if top_k is None else {"top_k": top_k})}

    def preprocess(self, inputs: Any, **processor_kwargs: Any):
        if isinstance(inputs, (str, os.PathLike)):
            path = Path(inputs)
            if path.name.lower().endswith((".nii", ".nii.gz")):
                names = {key: processor_kwargs.pop(key) for key in ("modality", "body_part") if key in processor_kwargs}
                inputs = load_nifti(path, **names)
            elif path.suffix.lower() in PICTURE_SUFFIXES:
                with Image.open(path) as picture:
                    if getattr(picture, "n_frames", 1) > 1:
                        raise ValueError(
                            f"{path} holds {picture.n_frames} pages (a multi-page TIFF?): pass the page you mean as an "
                            "image, or a volume as an array with spatial_dims=3."
                        )
                    # As displayed (EXIF orientation, as transformers' load_image), in its stored mode: grayscale
                    # stays one channel, 16 bits stay 16.
                    inputs = ImageOps.exif_transpose(picture)
            else:
                inputs = load_dicom(path)
        return self.image_processor(inputs, return_tensors="pt", **processor_kwargs)

    def _forward(self, model_inputs: dict[str, torch.Tensor], task: str | None = None, test_time_flips: bool = False):
        """The task's class probabilities, averaged over the label-safe flips of the image when asked, as
        `examples/evaluate.py --test_time_flips` does."""
        if task is None and hasattr(self.model, "task_heads"):
            raise ValueError(f"Pass task=<one of {list(self.model.config.tasks)}> for this multi-task model.")
        extra = {} if task is None else {"task": task}
        views = self._flip_views(task) if test_time_flips else [()]

        def probabilities_of(pixels: torch.Tensor) -> torch.Tensor:
            logits = self.model(**{**model_inputs, "pixel_values": pixels}, **extra).logits.float()
            return self._probabilities(logits, task)

        return {"scores": mean_over_flips(model_inputs["pixel_values"], views, probabilities_of)}

    def _flip_views(self, task: str | None) -> list[tuple[int, ...]]:
        """The views of the task's label-safe flips, which its `config.tasks` entry records (a one-task classifier's
        one entry when `task` is None)."""
        spec = self._task_spec(task)
        if spec is None or "label_safe_flips" not in spec:
            raise ValueError(
                "test_time_flips=True needs the task's label-safe flips, which this checkpoint's config.tasks does not "
                f"record{f' for {task!r}' if task else ''}; leave test_time_flips out (one view)."
            )
        return flip_views(spec["label_safe_flips"])

    def _task_spec(self, task: str | None) -> dict[str, Any] | None:
        """The `config.tasks` entry of `task`, or of a one-task model's task when `task` is None."""
        tasks = self.model.config.tasks
        if task is not None:
            return tasks.get(task)
        return next(iter(tasks.values())) if len(tasks) == 1 else None

    def _probabilities(self, logits: torch.Tensor, task: str | None) -> torch.Tensor:
        if task is None:  # single-task classifier
            return classifier_probabilities(logits, self.model.config)
        spec = self.model.config.tasks[task]
        return task_probabilities(logits, spec["type"], spec["num_labels"])

    def postprocess(self, model_outputs: dict[str, torch.Tensor], task: str | None = None, top_k: int | None = None):
        """The ranked labels of the image; an input the processor read as a batch (an array of several images or
        volumes) gets one ranked list per image, in its order."""
        id2label = self.model.config.id2label if task is None else self.model.config.tasks[task]["id2label"]
        results = []
        for scores in model_outputs["scores"].tolist():
            ranked = sorted(
                ({"label": id2label[index], "score": float(score)} for index, score in enumerate(scores)),
                key=lambda item: item["score"],
                reverse=True,
            )
            results.append(ranked[:top_k])
        return results[0] if len(results) == 1 else results
