"""Metrics: the MedMNIST ACC/AUC `evaluate` module shipped inside the package."""

from __future__ import annotations

from pathlib import Path

import evaluate

MEDMNIST_METRIC_PATH = Path(__file__).parent / "medmnist_classification"


def load_medmnist_metric(task_type: str) -> evaluate.EvaluationModule:
    """The MedMNIST ACC/AUC metric for one task type, loaded offline from the package (in memory, no cache locks)."""
    return evaluate.load(str(MEDMNIST_METRIC_PATH), task_type, keep_in_memory=True)


__all__ = ["MEDMNIST_METRIC_PATH", "load_medmnist_metric"]
