"""MedMNIST ACC and AUC, with the official `medmnist.Evaluator` definitions, as a Hugging Face `evaluate` metric.

Load it from its folder, with the task type as the configuration:

    metric = evaluate.load("<path>/medmnist_classification", "multiclass", keep_in_memory=True)
    metric.compute(predictions=probabilities, references=labels)   # {"acc": ..., "auc": ...}

`predictions` are per-class scores (softmax probabilities; for binary tasks `[1 - p, p]` or `p`; per-label sigmoid
for multi-label). The folder can be pushed to the Hub as a metric Space as it is.
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
    predictions: per-sample list of class (or label) scores.
    references: class index per sample; for multilabel, the 0/1 list per sample.
Returns:
    acc (float), auc (float).
"""
TASK_TYPES = ("multiclass", "binary", "ordinal", "multilabel")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MedmnistClassification(evaluate.Metric):
    def _info(self):
        if self.config_name not in TASK_TYPES:
            raise ValueError(f"Unknown task type {self.config_name!r}; choose one of {list(TASK_TYPES)}.")
        reference = (
            datasets.Sequence(datasets.Value("int32")) if self.config_name == "multilabel" else datasets.Value("int32")
        )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": reference}
            ),
        )

    def _compute(self, predictions, references):
        scores = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references)
        if self.config_name == "binary":
            positive = scores[:, -1]
            return {"acc": float(np.mean((positive > 0.5) == labels)), "auc": float(roc_auc_score(labels, positive))}
        if self.config_name == "multilabel":
            per_label_auc = [roc_auc_score(labels[:, k], scores[:, k]) for k in range(scores.shape[1])]
            return {"acc": float(np.mean((scores > 0.5) == labels)), "auc": float(np.mean(per_label_auc))}
        one_vs_rest = [roc_auc_score(labels == k, scores[:, k]) for k in range(scores.shape[1])]
        return {"acc": float(np.mean(scores.argmax(axis=1) == labels)), "auc": float(np.mean(one_vs_rest))}
