"""Test metrics of trained models for a user who does not know the images' modality and body part: both "unknown"
(id 0) instead of each set's own, i.e. what the conditioning on metadata is worth and what its absence costs.

    python benchmarks/metadata_robustness.py --data_dir ../shared/data/medmnist --models outputs/accuracy/multitask_ssl
    python benchmarks/metadata_robustness.py --data_dir ../shared/data/medmnist --models outputs/ablation/*/*/seed*
    python benchmarks/accuracy_report.py ablation outputs/ablation unknown_metadata

Writes `<model>/unknown_metadata/metrics.json`, in the format of evaluate.py's `metrics.json`, for every task of each
model folder with a local test file; `accuracy_report.py ablation <dir> unknown_metadata` tabulates them.
"""

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from medformer_hf import MedformerForMultiTask, MedformerImageProcessor
from medformer_hf.data import MedformerCollator, build_multitask_dataset
from medformer_hf.training import evaluate_tasks, scorable_tasks

FOLDER = "unknown_metadata"


def with_unknown_metadata(collator: MedformerCollator) -> Callable[[list[Any]], dict[str, torch.Tensor]]:
    def collate(rows: list[Any]) -> dict[str, torch.Tensor]:
        batch = collator(rows)
        unknown = {key: torch.zeros_like(batch[key]) for key in ("modality_ids", "body_part_ids")}
        return {**batch, **unknown}

    return collate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--models", nargs="+", required=True, help="folders written by finetune.py")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch_size", type=int, default=128)
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    for folder in map(Path, args.models):
        model = MedformerForMultiTask.from_pretrained(folder).eval()
        processor = MedformerImageProcessor.from_pretrained(folder)
        tasks = list(model.config.tasks)
        names = scorable_tasks(model.config, args.size, args.data_dir)["scored"]
        datasets = {
            name: build_multitask_dataset([name], "test", size=args.size, data_dir=args.data_dir) for name in names
        }
        collators = {name: with_unknown_metadata(MedformerCollator(datasets[name], processor, tasks)) for name in names}
        metrics, _ = evaluate_tasks(accelerator, model, datasets, collators, args.batch_size)
        record = {"metrics": metrics, "split": "test", "metadata": "unknown", "size": args.size}
        (folder / FOLDER).mkdir(exist_ok=True)
        (folder / FOLDER / "metrics.json").write_text(json.dumps(record, indent=2))
        summary = ", ".join(f"{name} {values['acc']:.3f} / {values['auc']:.3f}" for name, values in metrics.items())
        print(f"{folder}: unknown metadata, test ACC / AUC: {summary}")


if __name__ == "__main__":
    main()
