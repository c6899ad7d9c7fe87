"""Training-step throughput of Medformer: forward + backward + AdamW step, images/s, median over repeats.

python benchmarks/model_throughput.py                       # default config, batch 64, 28x28 and 28^3, CPU
python benchmarks/model_throughput.py --shapes 1x64x64x64 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from medformer_hf import MedformerConfig, MedformerForPreTraining, MedformerModel


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("x"))


def train_step_images_per_second(
    model: torch.nn.Module, shape: tuple[int, ...], batch_size: int, device: str, dtype: torch.dtype, repeats: int
) -> float:
    """Median images/s of full training steps on random data (2 warm-up steps excluded)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.randn(batch_size, *shape, device=device)
    timings = []
    for step in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(pixels).pooler_output.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            timings.append(time.perf_counter() - start)
    return batch_size / statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["1x28x28", "1x28x28x28"], help="CxHxW or CxDxHxW")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    config = MedformerConfig()
    model = MedformerModel(config).to(args.device).train()
    parameters = {
        "MedformerModel": sum(p.numel() for p in model.parameters()),
        "MedformerForPreTraining": sum(p.numel() for p in MedformerForPreTraining(config).parameters()),
    }
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {args.device}",
        "torch": torch.__version__,
        "parameters": parameters,
        "batch_size": args.batch_size,
        "images_per_second": {},
    }
    for text in args.shapes:
        speed = train_step_images_per_second(
            model, parse_shape(text), args.batch_size, args.device, getattr(torch, args.dtype), args.repeats
        )
        results["images_per_second"][text] = round(speed, 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
