"""Metrics: the MedMNIST ACC/AUC `evaluate` module shipped inside the package."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

MEDMNIST_METRIC_PATH = Path(__file__).parent / "medmnist_classification"


def _evaluate_library() -> ModuleType:
    """The `evaluate` library, even when a folder with an `evaluate.py` script (such as `examples/`) is first on
    `sys.path`, as it is for any script run from that folder."""
    module = sys.modules.get("evaluate")
    if module is not None and hasattr(module, "EvaluationModule"):
        return module
    shadowing = [entry for entry in sys.path if (Path(entry or ".") / "evaluate.py").is_file()]
    saved = list(sys.path)
    sys.path[:] = [entry for entry in sys.path if entry not in shadowing]
    try:
        sys.modules.pop("evaluate", None)
        return importlib.import_module("evaluate")
    finally:
        sys.path[:] = saved


def load_medmnist_metric(task_type: str) -> Any:
    """The MedMNIST ACC/AUC metric (an `evaluate.EvaluationModule`) for one task type, loaded offline from the
    package, in memory (no cache locks between processes)."""
    return _evaluate_library().load(str(MEDMNIST_METRIC_PATH), task_type, keep_in_memory=True)


def medmnist_metrics(scores: np.ndarray, labels: np.ndarray, task_type: str) -> dict[str, float]:
    """ACC and AUC of per-class scores (`task_probabilities`) against labels, as MedMNIST's evaluator defines them."""
    result = load_medmnist_metric(task_type).compute(predictions=scores.tolist(), references=labels.tolist())
    return {"acc": result["acc"], "auc": result["auc"]}


__all__ = ["MEDMNIST_METRIC_PATH", "load_medmnist_metric", "medmnist_metrics"]
