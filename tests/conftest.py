"""Shared fixtures: a tiny config (fast on CPU) and the real MedMNIST files in ../shared/data/medmnist."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from medformer_hf import MedformerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MEDMNIST_ROOT", REPO_ROOT.parent / "shared" / "data" / "medmnist"))

TASKS = {
    "pneumonia": {"type": "binary", "labels": ["normal", "pneumonia"], "modality": "xray", "body_part": "chest"},
    "organ": {"type": "multiclass", "num_labels": 11, "modality": "ct", "body_part": "abdomen"},
    "retina": {"type": "ordinal", "num_labels": 5, "modality": "fundus", "body_part": "eye"},
    "chest": {"type": "multilabel", "num_labels": 3, "modality": "xray", "body_part": "chest"},
    "age": {"type": "regression", "num_labels": 2},
}


def make_tiny_config(**overrides) -> MedformerConfig:
    settings = dict(
        hidden_size=32,
        num_latents=8,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_cross_attention_heads=2,
        num_task_queries=2,
        projection_dim=16,
        tasks=TASKS,
    )
    settings.update(overrides)
    return MedformerConfig(**settings)


@pytest.fixture
def tiny_config() -> MedformerConfig:
    torch.manual_seed(0)
    return make_tiny_config()


def load_npz_images(name: str, count: int) -> torch.Tensor:
    """First `count` training images of a MedMNIST file as float (N, C, ...) in [0, 1]."""
    path = DATA_DIR / f"{name}.npz"
    if not path.exists():
        pytest.fail(f"{path} is missing: put the MedMNIST npz files there or set MEDMNIST_ROOT.")
    images = torch.from_numpy(np.load(path)["train_images"][:count]).float() / 255
    return images.movedim(-1, 1) if images.ndim == 4 and images.shape[-1] == 3 else images.unsqueeze(1)
