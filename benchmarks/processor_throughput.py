"""Image processor throughput, images/s (median of repeats), for MedMNIST-like 2D batches and 64^3 volumes.

python benchmarks/processor_throughput.py
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from medformer_hf import MedformerImageProcessor


def images_per_second(call: Callable[[], object], count: int, repeats: int = 7) -> float:
    call()  # warm-up
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        timings.append(time.perf_counter() - start)
    return count / statistics.median(timings)


def main() -> None:
    rng = np.random.default_rng(0)
    processor = MedformerImageProcessor()
    gray_batch = rng.integers(0, 256, (1024, 1, 28, 28), dtype=np.uint8)
    gray_list = list(gray_batch[:, 0])
    volumes_uint8 = rng.integers(0, 256, (16, 1, 64, 64, 64), dtype=np.uint8)
    volumes_ct = [rng.integers(-1024, 3000, (64, 64, 64)).astype(np.int16) for _ in range(16)]
    cases = {
        "2D 28x28 uint8, batch of 1024 as one array": (
            lambda: processor(gray_batch, spatial_dims=2, modality="xray"),
            1024,
        ),
        "2D 28x28 uint8, batch of 1024 as a list": (lambda: processor(gray_list, modality="xray"), 1024),
        "3D 64^3 uint8, batch of 16 as one array": (lambda: processor(volumes_uint8, modality="mra"), 16),
        "3D 64^3 int16 CT, list of 16, lung window": (
            lambda: processor(volumes_ct, modality="ct", window="lung"),
            16,
        ),
        "3D 64^3 int16 CT, list of 16, window + resize to 32^3": (
            lambda: processor(volumes_ct, modality="ct", window="lung", size_3d=[32, 32, 32]),
            16,
        ),
    }
    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "images_per_second": {name: round(images_per_second(call, count)) for name, (call, count) in cases.items()},
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
