"""Does a pre-trained Medformer reconstruct each image, or a mean image? Masked-patch error on validation images (never
seen in pre-training) against two baselines that ignore the image's content, and labelled reconstruction grids.

    python benchmarks/reconstruction_quality.py --model outputs/ssl_long/ssl --data_dir ../shared/data/medmnist \
        --pictures benchmarks/results/reconstructions

Error: mean squared error over the masked patches, in the model's target units (normalised pixels; per-patch
normalised with `norm_pix_loss`), the masks drawn from a fixed seed. Baselines: "mean image" predicts every patch as the
train images' mean at that position (what a decoder that ignores the latents converges to); "mean image + brightness"
shifts it by the image's own visible-patch offset from that mean. Skill = 1 - error / mean-image error: above the
brightness baseline's skill, the model reconstructs content of the image itself.

Also, for any Medformer folder (pre-trained or fine-tuned: then only these columns), how much the encoder's final
latents of unmasked validation images depend on the image: the share of their variance across images (1 - the share
a per-latent constant explains) and across the latents of one image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from medformer_hf import MedformerConfig, MedformerForPreTraining, MedformerImageProcessor, MedformerModel
from medformer_hf.data import MedformerCollator, build_multitask_dataset, local_datasets
from medformer_hf.visualization import save_reconstruction_grid


def batch_of(name: str, split: str, count: int, processor: MedformerImageProcessor, data_dir: str) -> dict:
    dataset = build_multitask_dataset([name], split, with_labels=False, data_dir=data_dir)
    return MedformerCollator(dataset, processor)(dataset.__getitems__(list(range(min(count, len(dataset))))))


@torch.no_grad()
def errors(model: MedformerForPreTraining, batch: dict, train_pixels: torch.Tensor, seed: int) -> dict[str, float]:
    """Masked-patch MSE of the model and of the two content-blind baselines on one batch."""
    pixels = batch["pixel_values"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        output = model(pixels, modality_ids=batch["modality_ids"], body_part_ids=batch["body_part_ids"])
    target, _, _ = model.reconstruction_target(pixels)
    mean_image = model.reconstruction_target(train_pixels)[0].mean(dim=0, keepdim=True).expand_as(target)
    masked = output.mask.bool()
    visible = (~masked).float()[..., None]
    offset = ((target - mean_image) * visible).sum(dim=(1, 2), keepdim=True) / (
        visible.sum(dim=(1, 2), keepdim=True) * target.shape[-1]
    )

    def mse(prediction: torch.Tensor) -> float:
        return ((prediction - target) ** 2).mean(dim=-1)[masked].mean().item()

    return {
        "model": mse(output.logits),
        "mean image": mse(mean_image),
        "mean image + brightness": mse(mean_image + offset),
    }


@torch.no_grad()
def latent_variance_shares(encoder: MedformerModel, batch: dict) -> tuple[float, float]:
    """Shares of the final latents' second moment that vary across images and across the latents of one image."""
    latents = encoder(
        batch["pixel_values"], modality_ids=batch["modality_ids"], body_part_ids=batch["body_part_ids"]
    ).last_hidden_state
    total = latents.pow(2).mean()
    across_images = (latents - latents.mean(dim=0, keepdim=True)).pow(2).mean() / total
    across_latents = (latents - latents.mean(dim=1, keepdim=True)).pow(2).mean() / total
    return across_images.item(), across_latents.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a MedformerForPreTraining folder (pretrain.py's output)")
    parser.add_argument("--data_dir", default="../shared/data/medmnist")
    parser.add_argument("--images", type=int, default=256, help="validation images per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pictures", help="also write <name>.png grids of 8 validation images here")
    parser.add_argument(
        "--initial", action="store_true", help="measure freshly initialised weights of --model's config (seed --seed)"
    )
    args = parser.parse_args()
    config = MedformerConfig.from_pretrained(args.model)
    pretrained = "MedformerForPreTraining" in (config.architectures or [])
    model_class = MedformerForPreTraining if pretrained else MedformerModel
    torch.manual_seed(args.seed)
    model = (model_class(config) if args.initial else model_class.from_pretrained(args.model)).eval()
    encoder = model.medformer if pretrained else model
    processor = MedformerImageProcessor.from_pretrained(args.model)
    columns = ["model MSE", "mean image MSE", "mean image + brightness MSE", "model skill", "brightness skill"]
    columns = [*(columns if pretrained else []), "latent variance across images", "across latents"]
    print(f"| set | {' | '.join(columns)} |\n|---|{'---|' * len(columns)}")
    for name in local_datasets(args.data_dir):
        validation = batch_of(name, "validation", args.images, processor, args.data_dir)
        cells = []
        if pretrained:
            train = batch_of(name, "train", args.images, processor, args.data_dir)["pixel_values"]
            result = errors(model, validation, train, args.seed)
            baseline, brightness = result["mean image"], result["mean image + brightness"]
            cells = [f"{result['model']:.4f}", f"{baseline:.4f}", f"{brightness:.4f}"]
            cells += [f"{1 - result['model'] / baseline:+.3f}", f"{1 - brightness / baseline:+.3f}"]
        cells += [f"{share:.3f}" for share in latent_variance_shares(encoder, validation)]
        print(f"| {name} | {' | '.join(cells)} |")
        if args.pictures and pretrained:
            path = Path(args.pictures) / f"{name}.png"  # the grid shows the first 8 of the measured images
            save_reconstruction_grid(model, validation["pixel_values"], path, title=f"{name}, validation")


if __name__ == "__main__":
    main()
