"""Several MedMNIST sets behind one index, batched one task at a time, for multi-task training and SSL.

- `MultiTaskDataset` reads whole batches straight from Arrow, so pixels stay uint8 (the `datasets` numpy and torch
  formatters would turn them into int64, 8x the bytes).
- `TaskBatchSampler` draws a task per batch with p_i ~ n_i^alpha, so every batch has one input shape and small sets
  are not drowned; all processes draw the same task at each step (what DDP with per-task heads needs) and take
  disjoint samples of it.
- `MedformerCollator` turns a uint8 batch into model inputs through the image processor: one normalisation code path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from accelerate import PartialState

from ..image_processing_medformer import MedformerImageProcessor
from .augmentation import augment
from .catalogue import SPLITS, MedMNISTInfo, dataset_info
from .medmnist import load_medmnist


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset with `fraction` of each class (at least one per class).

    `labels` is `(N,)` class indices (or MedMNIST's `(N, 1)` arrays of them), or `(N, K)` multi-hot: then the subset
    is drawn at random and topped up so that every label with a positive sample keeps at least one.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}.")
    rng = np.random.default_rng(seed)
    if labels.ndim == 2 and labels.shape[1] == 1:  # one column: per-class draws (also right for a single 0/1 label)
        labels = labels[:, 0]
    if labels.ndim == 1:
        chosen = [
            rng.choice(members, size=max(1, round(len(members) * fraction)), replace=False)
            for members in (np.flatnonzero(labels == value) for value in np.unique(labels))
        ]
        return np.sort(np.concatenate(chosen))
    chosen = set(rng.choice(len(labels), size=max(1, round(len(labels) * fraction)), replace=False).tolist())
    for column in range(labels.shape[1]):
        positives = np.flatnonzero(labels[:, column])
        if len(positives) and not chosen.intersection(positives.tolist()):
            chosen.add(int(rng.choice(positives)))
    return np.array(sorted(chosen))


def _arrow_to_numpy(column: pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    """Fixed-shape nested lists (an ArrayXD column or a fixed-length label list) -> one numpy array, dtype kept."""
    values = column.combine_chunks()
    values = getattr(values, "storage", values)
    while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(shape)


class MultiTaskDataset(torch.utils.data.Dataset):
    """One split of several MedMNIST sets; index `i` runs over the sets in order (see `offsets`)."""

    def __init__(self, splits: dict[str, Any], infos: dict[str, MedMNISTInfo], size: int, with_labels: bool = True):
        self.names = list(splits)
        self.splits = [splits[name] for name in self.names]
        self.infos = [infos[name] for name in self.names]
        self.size = size
        self.with_labels = with_labels
        self.sizes = [len(split) for split in self.splits]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        """A batch of one task: uint8 `pixel_values` (N, C, ...), `labels` (N,) or (N, K), `task_index`, and the
        batch's `augmentation_seed` when the sampler gives one (`SeededBatch`)."""
        seed = getattr(indices, "seed", None)
        indices = np.asarray(indices)
        task_index = int(np.searchsorted(self.offsets, indices[0], side="right") - 1)
        local = indices - self.offsets[task_index]
        if local.min() < 0 or local.max() >= self.sizes[task_index]:
            raise ValueError("A batch must hold samples of one task only; use TaskBatchSampler.")
        info = self.infos[task_index]
        table = self.splits[task_index].with_format("arrow")[local.tolist()]
        batch = {
            "pixel_values": _arrow_to_numpy(table.column("pixel_values"), (len(local), *info.image_shape(self.size))),
            "task_index": task_index,
        }
        if seed is not None:
            batch["augmentation_seed"] = seed
        if self.with_labels:
            label = table.column("label")
            batch["labels"] = (
                _arrow_to_numpy(label, (len(local), len(info.labels)))
                if info.task_type == "multilabel"
                else label.to_numpy()
            )
        return batch

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])


def build_multitask_dataset(
    names: list[str],
    split: str = "train",
    label_fraction: float = 1.0,
    seed: int = 0,
    size: int = 28,
    with_labels: bool = True,
    **load_kwargs: Any,
) -> MultiTaskDataset:
    """One split of each named MedMNIST set behind one index.

    `label_fraction < 1` keeps a stratified, seeded subset of each training set (for label-efficiency studies); the
    validation and test splits are always whole, so a study is scored as every other run. `load_kwargs` go to
    `load_medmnist` (`data_dir`, `download`, `mirror`, `cache_dir`). For SSL pass `with_labels=False`.
    """
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; the splits are {list(SPLITS)} (MedMNIST's 'val' is 'validation').")
    if label_fraction < 1.0 and split != "train":
        raise ValueError(
            f"label_fraction={label_fraction} keeps a share of the training labels; the {split} split is always "
            "whole: leave label_fraction out for it (or .select() the rows you want)."
        )
    infos = {dataset_info(name).name: dataset_info(name) for name in names}
    if len(infos) != len(names):
        raise ValueError(f"Dataset names repeat: {names}.")
    splits = {}
    for name in infos:
        data = load_medmnist(name, size=size, **load_kwargs)[split]
        if label_fraction < 1.0:
            labels = np.asarray(data.with_format("arrow")["label"].to_pylist())
            data = data.select(stratified_subset(labels, label_fraction, seed))
        splits[name] = data
    return MultiTaskDataset(splits, infos, size, with_labels)


class SeededBatch(list):
    """A batch's sample indices, with the seed its augmentation draws from (`MedformerCollator`)."""

    def __init__(self, indices: Any, seed: int):
        super().__init__(indices)
        self.seed = seed


class TaskBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of one task each, the task drawn with p_i ~ n_i^alpha (alpha=1: by size; alpha=0: uniform).

    Every process runs the same seeded draw (so all take the same task at each step) and keeps its own slice of each
    global batch (`batch_size * num_replicas` samples of one pass over a seeded permutation of the task), so processes
    see disjoint samples. A pass that cannot fill the next global batch is reshuffled. `num_replicas` / `rank` default
    to accelerate's current process group: create the `Accelerator` first.
    """

    def __init__(
        self,
        dataset_sizes: list[int],
        batch_size: int,
        alpha: float = 0.5,
        seed: int = 0,
        num_batches: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        if batch_size < 1 or not dataset_sizes or min(dataset_sizes) < 1:
            raise ValueError(f"Need batch_size >= 1 and non-empty datasets, got {batch_size} and {dataset_sizes}.")
        if num_replicas is None or rank is None:
            state = PartialState()
            num_replicas, rank = state.num_processes, state.process_index
        self.sizes = list(dataset_sizes)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.batch_size = batch_size
        weights = np.asarray(self.sizes, dtype=float) ** alpha
        self.probabilities = weights / weights.sum()
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.num_batches = num_batches or max(1, sum(self.sizes) // (batch_size * num_replicas))
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Use a fresh, reproducible order for each epoch (call before iterating, like DistributedSampler).

        `start_batch` resumes mid-epoch: the first batches are drawn but not yielded, so no data is read for them.
        """
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        orders = [rng.permutation(size) for size in self.sizes]
        positions = [0] * len(self.sizes)
        global_batch = self.batch_size * self.num_replicas
        for batch_index in range(self.num_batches):
            task = int(rng.choice(len(self.sizes), p=self.probabilities))
            size, start = self.sizes[task], positions[task]
            if start + global_batch > size:  # a global batch never straddles two passes, so it has no repeats
                orders[task], start = rng.permutation(size), 0
            # A set smaller than one global batch repeats its permutation (then processes share samples).
            picked = (
                orders[task][start : start + global_batch]
                if size >= global_batch
                else np.resize(orders[task], global_batch)
            )
            positions[task] = start + global_batch
            if batch_index < self.start_batch:
                continue
            mine = picked[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            # The batch's own augmentation seed, a function of where it is in the run: the same batch is augmented
            # alike in the main process or a worker, and in a resumed run (whose workers start afresh).
            seed = int(np.random.SeedSequence([self.seed, self.epoch, batch_index, self.rank]).generate_state(1)[0])
            yield SeededBatch((int(self.offsets[task] + index) for index in mine), seed)


class MedformerCollator:
    """A `MultiTaskDataset` batch -> `pixel_values`, `modality_ids`, `body_part_ids`, `task_ids`, `labels`.

    `task_names` is the model's task order (`list(config.tasks)`); it defaults to the dataset's own order. With
    `augment=True` (training) each batch gets its set's label-safe augmentation (`MedMNISTInfo.augmentation`); with
    `views=2` as well, `view_pixel_values` holds a second, independent augmentation of the same images (the second
    view of `MedformerForPreTraining`'s view agreement).
    """

    def __init__(
        self,
        dataset: MultiTaskDataset,
        processor: MedformerImageProcessor,
        task_names: list[str] | None = None,
        augment: bool = False,
        views: int = 1,
    ):
        if views not in (1, 2):
            raise ValueError(f"MedformerCollator views must be 1 or 2, got {views!r}.")
        if views == 2 and not augment:
            raise ValueError("MedformerCollator views=2 draws two augmentations of each image: pass augment=True.")
        self.infos = dataset.infos
        self.stored_size = dataset.size
        self.processor = processor
        self.augment = augment
        self.views = views
        names = task_names or dataset.names
        missing = [name for name in dataset.names if name not in names]
        if missing:
            raise ValueError(f"Datasets {missing} are not among the model's tasks {names}; add them with add_task.")
        self.task_ids = [names.index(name) for name in dataset.names]

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        info = self.infos[batch["task_index"]]
        pixels = batch["pixel_values"]
        features = self.processor(
            pixels, spatial_dims=info.spatial_dims, modality=info.modality, body_part=info.body_part
        )
        inputs = {key: features[key] for key in ("pixel_values", "modality_ids", "body_part_ids")}
        if self.augment:
            scale = inputs["pixel_values"].shape[-1] / self.stored_size
            policy = dataclasses.replace(info.augmentation, max_shift=round(info.augmentation.max_shift * scale))
            seed = batch.get("augmentation_seed")
            generator = None if seed is None else torch.Generator().manual_seed(seed)  # else the global RNG
            if self.views == 2:
                inputs["view_pixel_values"] = augment(inputs["pixel_values"], policy, generator)
            inputs["pixel_values"] = augment(inputs["pixel_values"], policy, generator)
        inputs["task_ids"] = torch.full((len(pixels),), self.task_ids[batch["task_index"]], dtype=torch.long)
        if "labels" in batch:
            labels = torch.from_numpy(np.asarray(batch["labels"]))
            inputs["labels"] = labels.float() if info.task_type == "multilabel" else labels.long()
        return inputs


def multitask_dataloader(
    dataset: MultiTaskDataset,
    collator: MedformerCollator,
    batch_size: int,
    alpha: float = 0.5,
    seed: int = 0,
    num_batches: int | None = None,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader over `TaskBatchSampler`.

    Keep it out of `accelerator.prepare` (which would split the batches a second time): the sampler already gives
    each process its share; move batches with `.to(accelerator.device)`.
    """
    sampler = TaskBatchSampler(dataset.sizes, batch_size, alpha=alpha, seed=seed, num_batches=num_batches)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # Its own generator: starting an iterator would otherwise draw from the global torch RNG, and a resumed run
        # (which starts one right after restoring that RNG) would then mask differently from an uninterrupted one.
        # Seeded per process, so that workers of different processes augment differently.
        generator=torch.Generator().manual_seed(seed + sampler.rank),
    )
