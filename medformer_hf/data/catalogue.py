"""The MedMNIST catalogue: what `medmnist.INFO` says of each dataset, plus what it lacks (modality, body part).

Everything here is data: a new dataset is a new row, never a new code branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medmnist import INFO

from .augmentation import AugmentationPolicy

# What medmnist.INFO does not say, in the vocabularies of MedformerConfig.
MEDMNIST_CONTEXT = {
    "pathmnist": {"modality": "pathology", "body_part": "colon"},
    "chestmnist": {"modality": "xray", "body_part": "chest"},
    "dermamnist": {"modality": "dermatoscopy", "body_part": "skin"},
    "octmnist": {"modality": "oct", "body_part": "eye"},
    "pneumoniamnist": {"modality": "xray", "body_part": "chest"},
    "retinamnist": {"modality": "fundus", "body_part": "eye"},
    "breastmnist": {"modality": "ultrasound", "body_part": "breast"},
    "bloodmnist": {"modality": "microscopy", "body_part": "blood"},
    "tissuemnist": {"modality": "microscopy", "body_part": "kidney"},
    "organamnist": {"modality": "ct", "body_part": "abdomen"},
    "organcmnist": {"modality": "ct", "body_part": "abdomen"},
    "organsmnist": {"modality": "ct", "body_part": "abdomen"},
    "organmnist3d": {"modality": "ct", "body_part": "abdomen"},
    "nodulemnist3d": {"modality": "ct", "body_part": "chest"},
    "adrenalmnist3d": {"modality": "ct", "body_part": "abdomen"},
    "fracturemnist3d": {"modality": "ct", "body_part": "chest"},
    "vesselmnist3d": {"modality": "mra", "body_part": "brain"},
    "synapsemnist3d": {"modality": "electron_microscopy", "body_part": "brain"},
}
# MedMNIST v2 (Yang et al., Sci. Data 2023) test metrics of ResNet-18 at 28 px (2D) and ResNet-18 + 3D (3D):
# the reference every result table is set against.
RESNET18_BASELINES = {
    "pathmnist": {"auc": 0.983, "acc": 0.907},
    "chestmnist": {"auc": 0.768, "acc": 0.947},
    "dermamnist": {"auc": 0.917, "acc": 0.735},
    "octmnist": {"auc": 0.943, "acc": 0.743},
    "pneumoniamnist": {"auc": 0.944, "acc": 0.854},
    "retinamnist": {"auc": 0.717, "acc": 0.524},
    "breastmnist": {"auc": 0.901, "acc": 0.863},
    "bloodmnist": {"auc": 0.998, "acc": 0.958},
    "tissuemnist": {"auc": 0.930, "acc": 0.676},
    "organamnist": {"auc": 0.997, "acc": 0.935},
    "organcmnist": {"auc": 0.992, "acc": 0.900},
    "organsmnist": {"auc": 0.972, "acc": 0.782},
    "organmnist3d": {"auc": 0.996, "acc": 0.907},
    "nodulemnist3d": {"auc": 0.863, "acc": 0.844},
    "adrenalmnist3d": {"auc": 0.827, "acc": 0.721},
    "fracturemnist3d": {"auc": 0.712, "acc": 0.508},
    "vesselmnist3d": {"auc": 0.874, "acc": 0.877},
    "synapsemnist3d": {"auc": 0.820, "acc": 0.745},
}
# The best published test metrics at 28 px (28³ for 3D), any method: the maximum of MedMNIST v2's tables (ResNets at
# 28/224 from 28 px sources, auto-sklearn, AutoKeras, Google AutoML Vision; 3D: ResNet-18/50 + 2.5D/3D/ACS) and
# MedMNIST+'s best 28×28 results (Doerrich et al. 2024, mean over seeds). The target past ResNet-18.
BEST_PUBLISHED_28 = {
    "pathmnist": {"auc": 0.990, "acc": 0.911},
    "chestmnist": {"auc": 0.778, "acc": 0.948},
    "dermamnist": {"auc": 0.9269, "acc": 0.768},
    "octmnist": {"auc": 0.963, "acc": 0.776},
    "pneumoniamnist": {"auc": 0.991, "acc": 0.946},
    "retinamnist": {"auc": 0.7535, "acc": 0.5425},
    "breastmnist": {"auc": 0.919, "acc": 0.8654},
    "bloodmnist": {"auc": 0.998, "acc": 0.966},
    "tissuemnist": {"auc": 0.941, "acc": 0.703},
    "organamnist": {"auc": 0.998, "acc": 0.951},
    "organcmnist": {"auc": 0.994, "acc": 0.920},
    "organsmnist": {"auc": 0.9764, "acc": 0.813},
    "organmnist3d": {"auc": 0.996, "acc": 0.907},
    "nodulemnist3d": {"auc": 0.914, "acc": 0.874},
    "adrenalmnist3d": {"auc": 0.839, "acc": 0.802},
    "fracturemnist3d": {"auc": 0.750, "acc": 0.517},
    "vesselmnist3d": {"auc": 0.930, "acc": 0.928},
    "synapsemnist3d": {"auc": 0.851, "acc": 0.795},
}
# Flips and quarter turns that keep each set's label (spatial axes: 2D (H, W), 3D (D, H, W)); every set also gets
# small shifts and intensity jitter. None where left and right are labels (organ sets, chest findings), none for
# ordinal fundus grades (RetinaMNIST) or OCT; mirror-free anatomy (chest X-ray, breast ultrasound) gets left/right
# flips only; orientation-free content (cells, tissue, skin lesions, nodules, vessels, synapses) gets everything.
ALL_2D = {"flip_axes": (0, 1), "rotate_90": True}
ALL_3D = {"flip_axes": (0, 1, 2), "rotate_90": True}
LEFT_RIGHT_FLIP_2D = {"flip_axes": (1,)}
LABEL_SAFE_AUGMENTATIONS = {
    "pathmnist": ALL_2D,
    "chestmnist": {},
    "dermamnist": ALL_2D,
    "octmnist": {},
    "pneumoniamnist": LEFT_RIGHT_FLIP_2D,
    "retinamnist": {},
    "breastmnist": LEFT_RIGHT_FLIP_2D,
    "bloodmnist": ALL_2D,
    "tissuemnist": ALL_2D,
    "organamnist": {},
    "organcmnist": {},
    "organsmnist": {},
    "organmnist3d": {},
    "nodulemnist3d": ALL_3D,
    "adrenalmnist3d": {"flip_axes": (2,)},
    "fracturemnist3d": {"flip_axes": (0, 1, 2)},
    "vesselmnist3d": ALL_3D,
    "synapsemnist3d": ALL_3D,
}
# The anatomical direction each axis of a set's volumes points to (ORIENTATION_PAIRS), where it was measured from the
# anatomy in the crops (BENCHMARKS.md, "Which way do MedMNIST's volumes point?"): OrganMNIST3D's arrays are (x, y, z)
# in LPS, i.e. toward the patient's left, posterior, superior; `load_nifti` / `load_dicom` give (z, y, x) = "SPL".
# Unmeasured sets have none, and file volumes reach them as read.
VOLUME_ORIENTATIONS = {"organmnist3d": "LPS"}
# MedMNIST task names -> MedformerConfig task types.
TASK_TYPES = {
    "multi-class": "multiclass",
    "binary-class": "binary",
    "multi-label, binary-class": "multilabel",
    "ordinal-regression": "ordinal",
}
# Our split names (the `datasets` convention) -> the npz key prefixes.
SPLITS = {"train": "train", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class MedMNISTInfo:
    """One MedMNIST dataset as the loader and the model need it."""

    name: str
    spatial_dims: int
    num_channels: int
    task_type: str
    labels: tuple[str, ...]
    split_sizes: dict[str, int]
    modality: str
    body_part: str
    license: str
    sizes: tuple[int, ...]
    urls: dict[int, str]
    md5s: dict[int, str]
    augmentation: AugmentationPolicy
    orientation: str | None = None

    def filename(self, size: int) -> str:
        """The official file name: `pneumoniamnist.npz` at 28, `pneumoniamnist_64.npz` otherwise."""
        return f"{self.name}.npz" if size == 28 else f"{self.name}_{size}.npz"

    def image_shape(self, size: int) -> tuple[int, ...]:
        """Channels-first shape of one image: (C, H, W) or (1, D, H, W)."""
        return (self.num_channels, *([size] * self.spatial_dims))

    def task_spec(self) -> dict[str, Any]:
        """The entry for `MedformerConfig(tasks={name: ...})`."""
        return {
            "type": self.task_type,
            "labels": list(self.labels),
            "modality": self.modality,
            "body_part": self.body_part,
            "spatial_dims": self.spatial_dims,
            "num_channels": self.num_channels,
            "label_safe_flips": list(self.augmentation.flip_axes),
            **({"orientation": self.orientation} if self.orientation else {}),
        }


def _from_info(name: str, info: dict[str, Any]) -> MedMNISTInfo:
    sizes = tuple(sorted(int(key.split("_")[1]) if "_" in key else 28 for key in info if key.startswith("url")))
    suffix = {size: "" if size == 28 else f"_{size}" for size in sizes}
    return MedMNISTInfo(
        name=name,
        spatial_dims=3 if name.endswith("3d") else 2,
        num_channels=info["n_channels"],
        task_type=TASK_TYPES[info["task"]],
        labels=tuple(info["label"][str(i)] for i in range(len(info["label"]))),
        split_sizes={ours: info["n_samples"][theirs] for ours, theirs in SPLITS.items()},
        modality=MEDMNIST_CONTEXT[name]["modality"],
        body_part=MEDMNIST_CONTEXT[name]["body_part"],
        license=info["license"],
        sizes=sizes,
        urls={size: info[f"url{suffix[size]}"] for size in sizes},
        md5s={size: info[f"MD5{suffix[size]}"] for size in sizes},
        augmentation=AugmentationPolicy(**LABEL_SAFE_AUGMENTATIONS[name]),
        orientation=VOLUME_ORIENTATIONS.get(name),
    )


CATALOGUE: dict[str, MedMNISTInfo] = {name: _from_info(name, info) for name, info in INFO.items()}


def dataset_info(name: str) -> MedMNISTInfo:
    """Catalogue entry of `name` (case-insensitive), or a ValueError that lists the known names."""
    key = name.lower()
    if key not in CATALOGUE:
        raise ValueError(f"Unknown MedMNIST dataset {name!r}; known: {sorted(CATALOGUE)}.")
    return CATALOGUE[key]
