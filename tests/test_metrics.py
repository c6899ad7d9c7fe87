"""The shipped `evaluate` metric agrees with medmnist.Evaluator's own functions."""

import numpy as np
import pytest
import torch
from medmnist.evaluator import getACC, getAUC

from medformer_hf import task_probabilities
from medformer_hf.metrics import MEDMNIST_METRIC_PATH, load_medmnist_metric

RNG = np.random.default_rng(0)
MEDMNIST_TASK = {
    "multiclass": "multi-class",
    "binary": "binary-class",
    "ordinal": "ordinal-regression",
    "multilabel": "multi-label, binary-class",
}


def random_case(task_type: str, count: int = 200):
    if task_type == "multilabel":
        labels = (RNG.random((count, 5)) < 0.3).astype(int)
        return task_probabilities(torch.from_numpy(RNG.normal(size=(count, 5))), "multilabel").numpy(), labels
    classes = 2 if task_type == "binary" else 5
    labels = RNG.integers(0, classes, count)
    logits = torch.from_numpy(
        RNG.normal(size=(count, 1 if task_type == "binary" else classes - (task_type == "ordinal")))
    )
    logits[:, -1] += torch.from_numpy(labels).double() * 0.8  # some signal
    return task_probabilities(logits, task_type).numpy(), labels


@pytest.mark.parametrize("task_type", list(MEDMNIST_TASK))
def test_metric_equals_the_official_evaluator(task_type):
    scores, labels = random_case(task_type)
    result = load_medmnist_metric(task_type).compute(predictions=scores.tolist(), references=labels.tolist())
    official_labels = labels if task_type == "multilabel" else labels[:, None]
    assert result["auc"] == pytest.approx(getAUC(official_labels, scores, MEDMNIST_TASK[task_type]), abs=1e-6)
    assert result["acc"] == pytest.approx(getACC(official_labels, scores, MEDMNIST_TASK[task_type]), abs=1e-6)


def test_metric_loads_with_evaluate_from_its_path():
    import evaluate

    metric = evaluate.load(str(MEDMNIST_METRIC_PATH), "binary", keep_in_memory=True)
    result = metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]], references=[0, 1, 0])
    assert result == {"acc": pytest.approx(2 / 3), "auc": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="Unknown task type 'segmentation'"):
        load_medmnist_metric("segmentation")


def test_metric_keeps_float64_scores_and_reads_medmnist_shaped_inputs():
    """A confident model's float64 scores near 1 keep their order (float32 would tie them and lower the AUC);
    MedMNIST's `(N, 1)` labels and a binary task's positive score alone read as the official evaluator reads them."""
    labels = RNG.integers(0, 2, 200)
    positive = 1 / (1 + np.exp(-(17 + 3 * labels + RNG.normal(0, 1, 200))))
    scores = np.stack([1 - positive, positive], 1)
    official = getAUC(labels[:, None], scores, "binary-class")
    assert len(np.unique(positive.astype(np.float32))) < 20 and official > 0.95
    metric = load_medmnist_metric("binary")
    for predictions, references in ((scores, labels), (positive, labels[:, None])):
        result = metric.compute(predictions=predictions.tolist(), references=references.tolist())
        assert result["auc"] == pytest.approx(official, abs=1e-9)


@pytest.mark.parametrize(
    ("task_type", "references", "message"),
    [
        ("binary", [0.7, 0, 1], "references must be 0/1 labels for this binary task, got 0.7"),
        ("multiclass", [0, 1, 3], r"class indices 0..2 for this multiclass task, got 3"),
        ("multiclass", [[0, 1], [1, 0], [2, 2]], r"one class index per sample, got references of shape \(3, 2\)"),
        ("multilabel", [[0, 1, 2], [1, 0, 0], [0, 0, 1]], "0/1 labels for this multilabel task, got 2"),
    ],
)
def test_metric_refuses_references_that_are_not_labels(task_type, references, message):
    with pytest.raises(ValueError, match=message):
        load_medmnist_metric(task_type).compute(predictions=[[0.2, 0.3, 0.5]] * 3, references=references)
