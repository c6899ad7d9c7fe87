"""Data pipeline vs model: images/s of sampler + Arrow read + collate/processor, next to a Medformer training step.

    python benchmarks/data_pipeline.py --data_dir ../shared/data/medmnist

Goal: the pipeline is at least 10x faster than the model, so it never limits training. Medians over batches, one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from medformer_hf import MedformerConfig, MedformerForMultiTask, MedformerImageProcessor
from medformer_hf.data import CATALOGUE, MedformerCollator, build_multitask_dataset, multitask_dataloader


def median_images_per_second(batches, step, batch_size: int, count: int) -> float:
    timings = []
    iterator = iter(batches)
    for index in range(count + 2):
        start = time.perf_counter()
        step(next(iterator))
        if index >= 2:  # warm-up
            timings.append(time.perf_counter() - start)
    return batch_size / statistics.median(timings)


def measure(name: str, data_dir: str, batch_size: int, count: int) -> dict[str, float]:
    """Pipeline and model images/s for one dataset, in one run."""
    dataset = build_multitask_dataset([name], data_dir=data_dir, download=False)
    collator = MedformerCollator(dataset, MedformerImageProcessor())
    loader = multitask_dataloader(dataset, collator, batch_size, num_batches=10_000)
    pipeline = median_images_per_second(loader, lambda batch: None, batch_size, count)

    model = MedformerForMultiTask(MedformerConfig(tasks={name: CATALOGUE[name].task_spec()})).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step(batch: dict[str, torch.Tensor]) -> None:
        model(batch["pixel_values"], task=name, labels=batch["labels"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    batches = [next(iter(loader))] * (count // 2 + 2)
    model_speed = median_images_per_second(batches, train_step, batch_size, count // 2)
    return {
        "pipeline": round(pipeline),
        "model_train_step": round(model_speed, 1),
        "ratio": round(pipeline / model_speed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    results = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "images_per_second": {}}
    for name in ("pneumoniamnist", "nodulemnist3d"):
        shape = "x".join(map(str, CATALOGUE[name].image_shape(28)))
        results["images_per_second"][f"{name} ({shape})"] = measure(name, args.data_dir, args.batch_size, args.batches)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
