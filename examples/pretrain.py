"""Self-supervised pre-training of Medformer on every MedMNIST file in a folder, 2D and 3D together.

    accelerate launch examples/pretrain.py --data_dir ../shared/data/medmnist

Each step draws one dataset (temperature sampling, p ~ n^alpha, the same draw on every process), so a batch has one
input shape; labels are never read. The result is a folder that loads with
`AutoModel.from_pretrained(<output_dir>, trust_remote_code=True)`.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from medformer_hf import MedformerConfig, MedformerForPreTraining

MODEL_SIZES = {
    "tiny": dict(
        hidden_size=64, num_latents=32, num_hidden_layers=2, num_attention_heads=4, num_cross_attention_heads=2
    ),
    "small": dict(hidden_size=128, num_latents=48, num_hidden_layers=4, num_attention_heads=4),
    "base": dict(),  # MedformerConfig defaults
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=os.environ.get("MEDMNIST_ROOT"), help="folder of MedMNIST .npz files")
    parser.add_argument("--output_dir", default="outputs/pretrain")
    parser.add_argument("--model_size", choices=sorted(MODEL_SIZES), default="tiny")
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--warmup_steps", type=int, default=30)
    parser.add_argument("--sampling_alpha", type=float, default=0.5, help="dataset i drawn with p ~ n_i^alpha")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.data_dir is None or not Path(args.data_dir).is_dir():
        parser.error(f"--data_dir {args.data_dir!r} is not a folder; pass the folder of MedMNIST .npz files.")
    if not sorted(Path(args.data_dir).glob("*.npz")):
        parser.error(f"no .npz files in {args.data_dir}; put MedMNIST files (e.g. pneumoniamnist.npz) there.")
    return args


def load_train_images(data_dir: str) -> dict[str, np.ndarray]:
    """Train images of every npz in `data_dir`, channels first: (N, C, H, W) or (N, 1, D, H, W), uint8."""
    images = {}
    for path in sorted(Path(data_dir).glob("*.npz")):
        array = np.load(path)["train_images"]
        is_rgb = array.ndim == 4 and array.shape[-1] == 3
        images[path.stem] = np.moveaxis(array, -1, 1) if is_rgb else array[:, None]
    return images


def main() -> None:
    args = parse_args()
    accelerator = Accelerator()
    set_seed(args.seed)
    datasets = load_train_images(args.data_dir)
    sizes = np.array([len(images) for images in datasets.values()], dtype=float)
    probabilities = sizes**args.sampling_alpha / (sizes**args.sampling_alpha).sum()
    for (name, images), probability in zip(datasets.items(), probabilities, strict=True):
        accelerator.print(f"{name}: {len(images)} train images, drawn with p={probability:.2f}")

    model = MedformerForPreTraining(MedformerConfig(**MODEL_SIZES[args.model_size]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # Same dataset draw on every process; each process samples its own images from it.
    dataset_rng = np.random.default_rng(args.seed)
    image_rng = np.random.default_rng(args.seed + 1 + accelerator.process_index)
    names = list(datasets)
    progress = tqdm(range(args.max_steps), disable=not accelerator.is_local_main_process)
    for step in progress:
        name = names[dataset_rng.choice(len(names), p=probabilities)]
        indices = image_rng.integers(0, len(datasets[name]), args.batch_size)
        pixel_values = torch.from_numpy(datasets[name][indices]).to(accelerator.device, torch.float32) / 255
        loss = model(pixel_values).loss
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"loss became {loss.item()} at step {step} on {name}; lower --learning_rate.")
        progress.set_postfix(dataset=name, loss=f"{loss.item():.4f}")

    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process)
    accelerator.print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
