"""torch.compile vs eager: images/s of inference and of a training step (median of repeats, one run).

python benchmarks/compile_speed.py                      # CPU, default config, batch 64, 28x28 and 28^3
python benchmarks/compile_speed.py --device cuda --dtype bfloat16 --shapes 1x64x64x64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from medformer_hf import MedformerConfig, MedformerModel


def images_per_second(step, batch_size: int, repeats: int, device: str) -> float:
    for _ in range(3):  # warm-up (and compilation)
        step()
    timings = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return batch_size / statistics.median(timings)


def inference_step(runner, pixels: torch.Tensor, autocast: dict):
    def step() -> None:
        with torch.no_grad(), torch.autocast(**autocast):
            runner(pixels)

    return step


def training_step(runner, optimizer: torch.optim.Optimizer, pixels: torch.Tensor, autocast: dict):
    def step() -> None:
        with torch.autocast(**autocast):
            loss = runner(pixels).pooler_output.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(shape: tuple[int, ...], args: argparse.Namespace) -> dict[str, float]:
    dtype = getattr(torch, args.dtype)
    autocast = dict(device_type=args.device, dtype=dtype, enabled=dtype != torch.float32)
    results = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = MedformerModel(MedformerConfig()).to(args.device)
        runner = torch.compile(model) if mode == "compiled" else model
        pixels = torch.randn(args.batch_size, *shape, device=args.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.eval()
        speed = images_per_second(inference_step(runner, pixels, autocast), args.batch_size, args.repeats, args.device)
        results[f"{mode}_inference"] = round(speed, 1)
        model.train()
        step = training_step(runner, optimizer, pixels, autocast)
        results[f"{mode}_train_step"] = round(images_per_second(step, args.batch_size, args.repeats, args.device), 1)
    results["inference_speedup"] = round(results["compiled_inference"] / results["eager_inference"], 2)
    results["train_step_speedup"] = round(results["compiled_train_step"] / results["eager_train_step"], 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["1x28x28", "1x28x28x28"])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {args.device}",
        "images_per_second": {},
    }
    for text in args.shapes:
        results["images_per_second"][text] = measure(tuple(int(v) for v in text.split("x")), args)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
