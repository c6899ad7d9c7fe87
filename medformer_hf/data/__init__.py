"""MedMNIST through Hugging Face `datasets`: the catalogue, the loader, and multi-task batching."""

from .augmentation import AugmentationPolicy, augment
from .catalogue import BEST_PUBLISHED_28, CATALOGUE, RESNET18_BASELINES, MedMNISTInfo, dataset_info
from .medmnist import default_cache_dir, load_medmnist, local_datasets
from .multitask import (
    MedformerCollator,
    MultiTaskDataset,
    TaskBatchSampler,
    build_multitask_dataset,
    multitask_dataloader,
    stratified_subset,
)

__all__ = [
    "AugmentationPolicy",
    "CATALOGUE",
    "RESNET18_BASELINES",
    "BEST_PUBLISHED_28",
    "MedMNISTInfo",
    "MedformerCollator",
    "MultiTaskDataset",
    "TaskBatchSampler",
    "augment",
    "build_multitask_dataset",
    "dataset_info",
    "default_cache_dir",
    "load_medmnist",
    "local_datasets",
    "multitask_dataloader",
    "stratified_subset",
]
