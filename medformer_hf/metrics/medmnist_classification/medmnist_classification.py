"""MedMNIST ACC and AUC, with the official `medmnist.Evaluator` definitions, as a Hugging Face `evaluate` metric.

Load it from its folder, with the task type as the configuration:

    metric = evaluate.load("<path>/medmnist_classification", "multiclass", keep_in_memory=True)
    metric.compute(predictions=probabilities, references=labels)   # {"acc": ..., "auc": ...}

`predictions` are per-class scores (softmax probabilities; for binary tasks `[1 - p, p]`, `[p]` or `p`; per-label
sigmoid for multi-label), kept in float64 as the official evaluator keeps them (float32 would tie a confident
model's scores near 1 and lower its AUC). `references` are class indices, flat or as MedMNIST's `(N, 1)` label
arrays; for multi-label, the 0/1 rows. The folder can be pushed to the Hub as a metric Space as it is.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import roc_auc_score

_DESCRIPTION = """MedMNIST test metrics as defined by medmnist.Evaluator.
AUC: mean one-vs-rest AUC over classes (multiclass, ordinal), mean per-label AUC (multilabel), or the AUC of the
positive score (binary). ACC: argmax accuracy (multiclass, ordinal), accuracy of score > 0.5 (binary), or the mean
per-label accuracy at 0.5 (multilabel)."""
_CITATION = """@article{medmnistv2,
  title={MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical image classification},
  author={Yang, Jiancheng and others}, journal={Scientific Data}, volume={10}, pages={41}, year={2023}}"""
_KWARGS_DESCRIPTION = """
Args:
    predictions: per-sample list of class (or label) scores; for binary also the positive score alone.
    references: class index per sample (or a one-element list of it); for multilabel, the 0/1 list per sample.
Returns:
    acc (float), auc (float).
"""
TASK_TYPES = ("multiclass", "binary", "ordinal", "multilabel")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MedmnistClassification(evaluate.Metric):
    def _info(self):
        if self.config_name not in TASK_TYPES:
            raise ValueError(f"Unknown task type {self.config_name!r}; choose one of {list(TASK_TYPES)}.")
        number, numbers = datasets.Value("float64"), datasets.Sequence(datasets.Value("float64"))
        predictions = [numbers, number] if self.config_name == "binary" else [numbers]
        references = [numbers] if self.config_name == "multilabel" else [number, numbers]
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": prediction, "references": reference})
                for prediction in predictions
                for reference in references
            ],
        )

    def _compute(self, predictions, references):
        scores = np.asarray(predictions, dtype=np.float64).reshape(len(predictions), -1)
        labels = np.asarray(references, dtype=np.float64)
        if self.config_name != "multilabel":
            if labels.ndim == 2 and labels.shape[1] != 1:
                raise ValueError(
                    f"A {self.config_name} task has one class index per sample, got references of shape {labels.shape}"
                    "; for 0/1 rows per sample load the 'multilabel' configuration."
                )
            labels = labels.reshape(-1)
        allowed = 2 if self.config_name in ("binary", "multilabel") else scores.shape[1]
        invalid = (labels != np.round(labels)) | (labels < 0) | (labels >= allowed)
        if invalid.any():
            raise ValueError(
                f"references must be {'0/1 labels' if allowed == 2 else f'class indices 0..{allowed - 1}'} for this "
                f"{self.config_name} task, got {labels[invalid][0]}."
            )
        labels = labels.astype(np.int64)
        if self.config_name == "binary":
            positive = scores[:, -1]
            return {"acc": float(np.mean((positive > 0.5) == labels)), "auc": float(roc_auc_score(labels, positive))}
        if self.config_name == "multilabel":
            per_label_auc = [roc_auc_score(labels[:, k], scores[:, k]) for k in range(scores.shape[1])]
            return {"acc": float(np.mean((scores > 0.5) == labels)), "auc": float(np.mean(per_label_auc))}
        one_vs_rest = [roc_auc_score(labels == k, scores[:, k]) for k in range(scores.shape[1])]
        return {"acc": float(np.mean(scores.argmax(axis=1) == labels)), "auc": float(np.mean(one_vs_rest))}
