"""Which way do OrganMNIST3D's volumes point, and does a CT read from NIfTI reach the released model that way?

    python benchmarks/volume_orientation.py --data_dir ../shared/data/medmnist --volumes 200

1. Anatomy in the crops (train + validation volumes): the axis along which left and right organs mirror each other,
   then the direction of each axis from structures whose place is known (the mediastinum is medial to each lung, the
   femoral head and pelvis above the femur, the lung bases' posterior recesses and the heart in front of the left
   lung's lower medial part). Each line prints what it measures; the catalogue's `VOLUME_ORIENTATIONS` follows them.
2. NIfTI round trip: test volumes saved as NIfTI files (as LPS, and flipped as RAS: the same anatomy stored two ways),
   classified by the released checkpoint's medical pipeline from the files, with and without turning them to the
   task's recorded orientation, against the arrays themselves.
"""

import argparse
import tempfile
from pathlib import Path

import nibabel
import numpy as np
from transformers import pipeline

from medformer_hf.data import CATALOGUE

RELEASE = Path(__file__).resolve().parents[1] / "checkpoints" / "medformer-small-medmnist"


def share(mask: np.ndarray, axis: int, low: bool) -> float:
    """Mean of `mask` (a volume) over the lower or upper third of `axis`."""
    index = [slice(None)] * 3
    index[axis] = slice(0, 9) if low else slice(19, 28)
    return float(mask[tuple(index)].mean())


def anatomy(volumes: np.ndarray, labels: np.ndarray) -> None:
    names = CATALOGUE["organmnist3d"].labels
    organ = {name: volumes[labels == names.index(name)] for name in names}
    mean = {name: organ[name].mean(0) for name in names}

    def correlation(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    print("left organ's mean volume vs the right one's, mirrored along axis 0 / 1 / 2 (the left-right axis mirrors):")
    for pair in ("lung", "femur", "kidney"):
        left, right = mean[f"{pair}-left"], mean[f"{pair}-right"]
        print(f"  {pair}: " + " / ".join(f"{correlation(left, np.flip(right, axis)):.3f}" for axis in range(3)))
    bright = {name: (organ[name] > 200).mean(0) for name in ("lung-left", "lung-right")}
    print(
        "bright tissue (mediastinum, medial) in the lower / upper third of axis 0: lung-right "
        f"{share(bright['lung-right'], 0, True):.3f} / {share(bright['lung-right'], 0, False):.3f}, lung-left "
        f"{share(bright['lung-left'], 0, True):.3f} / {share(bright['lung-left'], 0, False):.3f} "
        "(the right lung's medial side is toward the patient's left: axis 0 points left if its upper third is brighter)"
    )
    for name in ("femur-right", "femur-left"):
        bone = (organ[name] >= 250).mean(0)
        low, high = share(bone, 2, True), share(bone, 2, False)
        print(f"bone in the lower / upper third of axis 2, {name}: {low:.3f} / {high:.3f} (femoral head, pelvis: up)")
    for name in ("liver", "spleen"):
        air = (organ[name] < 30).mean(0)
        print(
            f"air in the lower / upper third of axis 2, {name}: {share(air, 2, True):.3f} / {share(air, 2, False):.3f}"
            " (lung bases above them: superior)"
        )
    for name in ("lung-right", "lung-left"):
        air = (organ[name] < 30).mean(0)[:, :, :9]  # the lower third of axis 2: the bases
        print(
            f"air of the lung bases in the first / second half of axis 1, {name}: {air[:, :14].mean():.3f} / "
            f"{air[:, 14:].mean():.3f} (the posterior recesses reach lowest)"
        )
    medial_base = (organ["lung-left"] < 30).mean(0)[:14, :, :12]  # toward the right, lower part
    print(
        f"air beside the heart (left lung, medial, lower) in the first / second half of axis 1: "
        f"{medial_base[:, :14].mean():.3f} / {medial_base[:, 14:].mean():.3f} (the heart is anterior)"
    )


def round_trip(volumes: np.ndarray, labels: np.ndarray) -> None:
    classify = pipeline("medical-image-classification", model=str(RELEASE), trust_remote_code=True)
    stored = {"LPS": (np.diag([-1.0, -1.0, 1.0, 1.0]), ()), "RAS": (np.eye(4), (0, 1))}  # nibabel's world is RAS
    correct = {"arrays": 0}
    with tempfile.TemporaryDirectory() as folder:
        for index, (volume, label) in enumerate(zip(volumes, labels, strict=True)):
            top = classify(volume, task="organmnist3d", top_k=1)[0]["label"]
            correct["arrays"] += top == CATALOGUE["organmnist3d"].labels[label]
            for name, (affine, flips) in stored.items():
                path = Path(folder, f"{index}_{name}.nii.gz")
                nibabel.save(nibabel.Nifti1Image(np.flip(volume, flips).astype(np.int16), affine), path)
                for turned in (True, False):
                    # orientation="SPL" is the files' own as read: turning off the task's.
                    extra = {} if turned else {"orientation": "SPL"}
                    answer = classify(str(path), task="organmnist3d", rescale_range=[0, 255], top_k=1, **extra)
                    key = f"NIfTI stored as {name}, {'turned to the task' if turned else 'as read'}"
                    correct[key] = correct.get(key, 0) + (answer[0]["label"] == CATALOGUE["organmnist3d"].labels[label])
    for key, count in correct.items():
        print(f"{key}: ACC {count / len(volumes):.3f} ({count} of {len(volumes)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="../shared/data/medmnist")
    parser.add_argument("--volumes", type=int, default=200, help="test volumes for the round trip (evenly spread)")
    args = parser.parse_args()
    data = np.load(Path(args.data_dir) / "organmnist3d.npz")
    anatomy(
        np.concatenate([data["train_images"], data["val_images"]]),
        np.concatenate([data["train_labels"], data["val_labels"]])[:, 0],
    )
    picked = np.linspace(0, len(data["test_images"]) - 1, args.volumes).astype(int)
    round_trip(data["test_images"][picked], data["test_labels"][picked, 0])


if __name__ == "__main__":
    main()
