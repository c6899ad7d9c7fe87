"""Medformer vs a plain ViT of equal width, depth and patch size: training-step images/s and peak memory.

    python benchmarks/speed_vs_vit.py                                   # CPU, float32
    python benchmarks/speed_vs_vit.py --device cuda --dtype bfloat16    # GPU: also model FLOPs utilisation
    python benchmarks/speed_vs_vit.py --num_latents 16 --shapes 1x28x28 # fewer latents for small inputs
    python benchmarks/speed_vs_vit.py --config checkpoints/medformer-small-medmnist  # a checkpoint's architecture

The ViT is transformers' ViTModel (SDPA attention) with the same hidden size, layers, heads, MLP width and patch size
as the default MedformerConfig (or the one given with --config); volumes go through a Conv3d patch embedding into the
same ViT encoder. Each case runs in its own process; peak memory is the training step's peak above the memory held
before the first step (CPU: RSS; GPU: allocated memory). Ratios are taken within one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from transformers import ViTConfig, ViTModel

from medformer_hf import MedformerConfig, MedformerModel

CASES = [("1x28x28", 64), ("1x64x64", 64), ("1x84x84", 64), ("1x28x28x28", 32), ("1x64x64x64", 4)]


class PlainViT(nn.Module):
    """ViT encoder over all patch tokens (plus a class token and learned positions), 2D or 3D patches."""

    def __init__(self, config: MedformerConfig, shape: tuple[int, ...]):
        super().__init__()
        channels, *spatial = shape
        dims = len(spatial)
        patch = config.patch_size_2d if dims == 2 else config.patch_size_3d
        vit_config = ViTConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=int(config.hidden_size * config.mlp_ratio),
            patch_size=patch,
            image_size=spatial[-1],
            num_channels=channels,
            attn_implementation="sdpa",
        )
        self.vit = ViTModel(vit_config, add_pooling_layer=False)
        self.vit.embeddings = nn.Identity()  # replaced by the 2D/3D patch embedding and positions below
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.patch_embedding = conv(channels, config.hidden_size, kernel_size=patch, stride=patch)
        num_tokens = 1
        for size in spatial:
            num_tokens *= size // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.positions = nn.Parameter(torch.randn(1, num_tokens + 1, config.hidden_size) * 0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.positions
        for layer in self.vit.layers:  # transformers' ViT layers (SDPA), no mask: every token attends to all
            tokens = layer(tokens)
        return self.vit.layernorm(tokens)[:, 0]


def medformer_config(folder: str | None) -> MedformerConfig:
    """The architecture measured: a model folder's config, or the defaults."""
    return MedformerConfig.from_pretrained(folder) if folder else MedformerConfig()


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def stage_seconds_per_image(model: MedformerModel, pixels: torch.Tensor, repeats: int) -> dict[str, float]:
    """Forward time per image of the Input Adaptformer (patches + cross-attention) and of the Main Body (latents only):
    the body's should not depend on the input size. A stage runs from its first module's start to its last's end."""
    stages = {
        "input_adaptformer": (model.input_adaptformer.patch_embeddings, model.input_adaptformer.layers[-1]),
        "main_body": (model.main_body.layers[0], model.main_body.norm),
    }
    cuda = pixels.device.type == "cuda"
    starts, times = {}, {name: [] for name in stages}

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    hooks = []
    for name, (first, last) in stages.items():
        hooks.append(first.register_forward_pre_hook(lambda *_, name=name: starts.__setitem__(name, clock())))
        hooks.append(last.register_forward_hook(lambda *_, name=name: times[name].append(clock() - starts[name])))
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first call warms up
            model(pixels)
    for hook in hooks:
        hook.remove()
    batch = len(pixels)
    return {f"{name}_forward_s_per_image": statistics.median(values[1:]) / batch for name, values in times.items()}


def run_case(model_name: str, shape: tuple[int, ...], batch_size: int, args: argparse.Namespace) -> dict[str, float]:
    """One model on one input shape: median step time and peak memory above the pre-step baseline."""
    torch.manual_seed(0)
    config = medformer_config(args.config)
    config.num_latents = args.num_latents
    if model_name == "medformer":
        model = MedformerModel(config)
        pooled = lambda pixels: model(pixels).pooler_output  # noqa: E731
    else:
        model = PlainViT(config, shape)
        pooled = model
    model = model.to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.randn(batch_size, *shape, device=args.device)
    dtype = getattr(torch, args.dtype)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() if cuda else current_rss_bytes()
    timings = []
    for step in range(args.repeats + 2):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=args.device, dtype=dtype, enabled=dtype != torch.float32):
            loss = pooled(pixels).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= 2:
            timings.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step_time = statistics.median(timings)
    result = {
        "images_per_second": batch_size / step_time,
        "step_seconds": step_time,
        "peak_memory_mib": (peak - baseline) / 2**20,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if model_name == "medformer":
        with torch.autocast(device_type=args.device, dtype=dtype, enabled=dtype != torch.float32):
            result.update(stage_seconds_per_image(model, pixels, args.repeats))
    if cuda:  # model FLOPs utilisation from a counted forward (x3 for forward + backward)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter, torch.no_grad():
            pooled(pixels)
        peak_flops = {"bfloat16": 989e12, "float32": 67e12}[args.dtype]  # H100 SXM dense
        result["mfu"] = 3 * counter.get_total_flops() / step_time / peak_flops
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", help="a Medformer model folder whose architecture to measure (default: defaults)")
    parser.add_argument("--num_latents", type=int, help="Medformer latents (default: the config's)")
    parser.add_argument("--shapes", nargs="+", choices=[shape for shape, _ in CASES], help="default: all")
    parser.add_argument("--case", nargs=3, metavar=("MODEL", "SHAPE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.num_latents is None:
        args.num_latents = medformer_config(args.config).num_latents
    if args.case:
        model_name, shape, batch = args.case
        print(json.dumps(run_case(model_name, tuple(int(v) for v in shape.split("x")), int(batch), args)))
        return

    table = {}
    for shape, batch in CASES:
        if args.shapes and shape not in args.shapes:
            continue
        row = {"batch_size": batch}
        for model_name in ("medformer", "vit"):
            command = [sys.executable, __file__, "--device", args.device, "--dtype", args.dtype]
            command += ["--repeats", str(args.repeats), "--num_latents", str(args.num_latents)]
            command += ["--config", args.config] if args.config else []
            command += ["--case", model_name, shape, str(batch)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            row[model_name] = json.loads(output.strip().splitlines()[-1])
        row["speed_ratio"] = row["medformer"]["images_per_second"] / row["vit"]["images_per_second"]
        row["memory_ratio_vit_over_medformer"] = row["vit"]["peak_memory_mib"] / row["medformer"]["peak_memory_mib"]
        table[shape] = row
    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {args.device}, {args.dtype}",
        "torch": torch.__version__,
        "config": args.config or "MedformerConfig()",
        "num_latents": args.num_latents,
        "cases": table,
    }
    if {"1x28x28x28", "1x64x64x64"} <= table.keys():
        per_image = {shape: table[shape]["medformer"]["step_seconds"] / table[shape]["batch_size"] for shape in table}
        results["medformer_per_image_time_64^3_over_28^3"] = per_image["1x64x64x64"] / per_image["1x28x28x28"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
