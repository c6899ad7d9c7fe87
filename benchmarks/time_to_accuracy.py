"""Wall time to reach MedMNIST v2's published ResNet-18 test AUC: Medformer (this package's recipe) vs a faithful
re-implementation of MedMNIST's own ResNet-18 (28) / ResNet-18 + 3D training, side by side on one machine.

    python benchmarks/time_to_accuracy.py --data_dir ../shared/data/medmnist --datasets pneumoniamnist organmnist3d \
        --max_minutes 20 --output benchmarks/results/time_to_accuracy_cpu.json

ResNet-18 as in github.com/MedMNIST/experiments (models.py, train_and_eval_pytorch.py): the CIFAR-style ResNet-18
(3x3 stride-1 first convolution, no max-pool, BatchNorm), for volumes the same net with every 2D layer made 3D and its
kernels inflated as their `Conv3dConverter(i3d_repeat_axis=-3)` does; Adam at 1e-3, MultiStepLR x0.1 at 50 and 75
of 100 epochs, batch 128 (2D) / 32 (3D, their 3D script's default), no augmentation, inputs scaled to [-1, 1] (2D) /
[0, 1] (3D) as their transforms do.
Medformer: the `small` model from scratch with the scripts' recipe (fan-in init, conv stem, AdamW 1e-3, 5% warm-up,
cosine over `--medformer_epochs`, label-safe augmentation, EMA 0.999 evaluated), one task, batch 64.

After every epoch both are evaluated on the test split with the same MedMNIST metric: this benchmark measures time to
a published test figure, it selects nothing. Training time excludes evaluation. Each model stops at the target or at
`--max_minutes` of training.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from medformer_hf import MedformerConfig, MedformerForMultiTask, MedformerImageProcessor, task_probabilities
from medformer_hf.data import CATALOGUE, RESNET18_BASELINES, augment
from medformer_hf.data.medmnist import find_local, read_npz
from medformer_hf.metrics import medmnist_metrics
from medformer_hf.training import MODEL_SIZES, create_ema, create_optimizer

# ------------------------------------------------------------------------------------ MedMNIST's ResNet-18


class BasicBlock(nn.Module):
    def __init__(self, spatial_dims: int, planes_in: int, planes: int, stride: int):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        self.conv1 = conv(planes_in, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or planes_in != planes:
            self.shortcut = nn.Sequential(conv(planes_in, planes, 1, stride=stride, bias=False), norm(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class MedMNISTResNet18(nn.Module):
    """MedMNIST v2's ResNet-18 for 28-pixel inputs (2D), and its Conv3d conversion (3D, see `inflated_3d`)."""

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        self.stem = nn.Sequential(conv(in_channels, 64, 3, stride=1, padding=1, bias=False), norm(64), nn.ReLU())
        layers, planes_in = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(spatial_dims, planes_in, planes, stride), BasicBlock(spatial_dims, planes, planes, 1)]
            planes_in = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.layers(self.stem(x)).flatten(2).mean(-1))


def inflated_3d(in_channels: int, num_classes: int) -> MedMNISTResNet18:
    """The 3D net as MedMNIST builds it: a 2D ResNet-18 converted by ACSConv's `Conv3dConverter` with their default
    `--pretrained_3d i3d`, which inflates even the untrained 2D kernels: each k x k kernel repeated k times along
    depth and divided by k; norms and the classifier copied."""
    flat, deep = MedMNISTResNet18(2, in_channels, num_classes), MedMNISTResNet18(3, in_channels, num_classes)
    state = {}
    for key, value in flat.state_dict().items():
        if value.ndim == 4:  # a convolution kernel
            value = value.unsqueeze(2).repeat(1, 1, value.shape[-1], 1, 1) / value.shape[-1]
        state[key] = value
    deep.load_state_dict(state)
    return deep


# ------------------------------------------------------------------------------------------- the runs


def run_until_target(
    name: str,
    train_epoch: Callable[[float], int],
    score_test: Callable[[], dict[str, float]],
    target_auc: float,
    max_epochs: int,
    max_seconds: float,
) -> dict:
    """Alternate one training epoch (timed) and a test evaluation (not timed) until the target, the epoch budget or
    the time cap. `train_epoch(seconds_left)` stops early at the cap and returns the batches it trained."""
    trained, curve = 0.0, []
    for epoch in range(max_epochs):
        start = time.perf_counter()
        batches = train_epoch(max_seconds - trained)
        trained += time.perf_counter() - start
        metrics = score_test()
        curve.append({"epoch": epoch + 1, "batches": batches, "train_seconds": round(trained, 1), **metrics})
        print(
            f"{name} epoch {epoch + 1}: {trained / 60:.1f} min, test AUC {metrics['auc']:.4f} ACC {metrics['acc']:.4f}"
        )
        if metrics["auc"] >= target_auc or trained >= max_seconds:
            break
    reached = next((point for point in curve if point["auc"] >= target_auc), None)
    return {
        "target_auc": target_auc,
        "seconds_to_target": reached["train_seconds"] if reached else None,
        "epochs_to_target": reached["epoch"] if reached else None,
        "best_auc": max(point["auc"] for point in curve),
        "curve": curve,
    }


def resnet_run(name: str, splits: dict, max_seconds: float) -> dict:
    info = CATALOGUE[name]
    scale = (lambda x: x / 255.0 * 2 - 1) if info.spatial_dims == 2 else (lambda x: x / 255.0)
    train_x, train_y = torch.from_numpy(splits["train"][0]), torch.from_numpy(splits["train"][1][:, 0]).long()
    test_x, test_y = torch.from_numpy(splits["test"][0]), splits["test"][1][:, 0]
    if info.spatial_dims == 2:
        model = MedMNISTResNet18(2, info.num_channels, len(info.labels))
    else:
        model = inflated_3d(info.num_channels, len(info.labels))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[50, 75], gamma=0.1)
    batch_size = 128 if info.spatial_dims == 2 else 32
    generator = torch.Generator().manual_seed(0)

    def train_epoch(seconds_left: float) -> int:
        model.train()
        deadline = time.perf_counter() + seconds_left
        for count, batch in enumerate(torch.randperm(len(train_x), generator=generator).split(batch_size), 1):
            loss = F.cross_entropy(model(scale(train_x[batch].float())), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if time.perf_counter() > deadline:
                return count
        scheduler.step()
        return count

    @torch.no_grad()
    def score_test() -> dict[str, float]:
        model.eval()
        scores = torch.cat([model(scale(x.float())).softmax(-1) for x in test_x.split(256)])
        return medmnist_metrics(scores.numpy(), test_y, info.task_type)

    return run_until_target(
        f"resnet18 {name}", train_epoch, score_test, RESNET18_BASELINES[name]["auc"], 100, max_seconds
    )


def medformer_run(name: str, splits: dict, max_seconds: float, epochs: int) -> dict:
    info = CATALOGUE[name]
    config = MedformerConfig(**MODEL_SIZES["small"], tasks={name: info.task_spec()})
    model = MedformerForMultiTask(config)
    processor = MedformerImageProcessor.from_model_config(config, training_size=28)
    metadata = {"spatial_dims": info.spatial_dims, "modality": info.modality, "body_part": info.body_part}
    train_x, train_y = splits["train"][0], torch.from_numpy(splits["train"][1][:, 0]).long()
    test_x, test_y = splits["test"][0], splits["test"][1][:, 0]
    batch_size = 64
    steps_per_epoch = -(-len(train_x) // batch_size)
    args = argparse.Namespace(
        learning_rate=1e-3, weight_decay=0.05, warmup_ratio=0.05, max_steps=epochs * steps_per_epoch
    )
    optimizer, scheduler = create_optimizer(model, args, num_processes=1)
    ema = create_ema(Accelerator(cpu=True), model, 0.999)
    generator = torch.Generator().manual_seed(0)

    def train_epoch(seconds_left: float) -> int:
        model.train()
        deadline = time.perf_counter() + seconds_left
        for count, batch in enumerate(torch.randperm(len(train_x), generator=generator).split(batch_size), 1):
            pixels = augment(processor(train_x[batch.numpy()], **metadata)["pixel_values"], info.augmentation)
            model(pixels, labels=train_y[batch]).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update_parameters(model)
            if time.perf_counter() > deadline:
                return count
        return count

    @torch.no_grad()
    def score_test() -> dict[str, float]:
        evaluated = ema.module.eval()
        logits = [evaluated(processor(x, **metadata)["pixel_values"]).logits for x in np.array_split(test_x, 8)]
        return medmnist_metrics(task_probabilities(torch.cat(logits), info.task_type).numpy(), test_y, info.task_type)

    target = RESNET18_BASELINES[name]["auc"]
    return run_until_target(f"medformer {name}", train_epoch, score_test, target, epochs, max_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="../shared/data/medmnist")
    single_label = [name for name, info in CATALOGUE.items() if info.task_type != "multilabel"]
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=single_label,
        default=["pneumoniamnist", "organmnist3d"],
        metavar="NAME",
        help="single-label MedMNIST sets (both recipes train them with cross-entropy)",
    )
    parser.add_argument("--models", nargs="+", choices=["medformer", "resnet18"], default=["medformer", "resnet18"])
    parser.add_argument("--max_minutes", type=float, default=20.0, help="training-time cap per model and set")
    parser.add_argument("--medformer_epochs", type=int, default=40, help="Medformer's cosine schedule length")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/time_to_accuracy_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}",
        "max_minutes": args.max_minutes,
        "medformer_epochs": args.medformer_epochs,
        "runs": {},
    }
    for name in args.datasets:
        path = find_local(CATALOGUE[name], 28, args.data_dir)
        if path is None:
            raise SystemExit(f"{name}: no local file in {args.data_dir}.")
        splits = read_npz(path, CATALOGUE[name], 28)
        for model in args.models:
            torch.manual_seed(0)
            if model == "resnet18":
                outcome = resnet_run(name, splits, args.max_minutes * 60)
            else:
                outcome = medformer_run(name, splits, args.max_minutes * 60, args.medformer_epochs)
            results["runs"][f"{model}/{name}"] = outcome
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(results, indent=2))
    for key, outcome in results["runs"].items():
        seconds = outcome["seconds_to_target"]
        reached = f"{seconds / 60:.1f} min ({outcome['epochs_to_target']} epochs)" if seconds else "not reached"
        print(f"{key}: target AUC {outcome['target_auc']}: {reached}; best {outcome['best_auc']:.4f}")


if __name__ == "__main__":
    main()
