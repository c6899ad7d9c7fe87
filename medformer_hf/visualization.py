"""Pictures a person wants to look at after training: SSL reconstructions and confusion matrices, as small PNGs
(drawn with Pillow, no plotting dependency)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .modeling_medformer import MedformerForPreTraining, patch_size_for, patchify, unpatchify


def _to_display(image: torch.Tensor, low: float, high: float) -> np.ndarray:
    """(C, H, W) or (C, D, H, W) -> uint8 (H, W) or (H, W, 3); volumes show their middle depth slice."""
    if image.ndim == 4:
        image = image[:, image.shape[1] // 2]
    scaled = ((image - low) / max(high - low, 1e-6)).clamp(0, 1).mul(255).byte()
    return scaled[0].numpy() if scaled.shape[0] == 1 else scaled.permute(1, 2, 0).numpy()


@torch.no_grad()
def save_reconstruction_grid(
    model: MedformerForPreTraining,
    pixel_values: torch.Tensor,
    path: str | os.PathLike,
    seed: int = 0,
    scale: int = 4,
    title: str = "",
) -> Path:
    """Labelled rows for up to 8 images (volumes: middle slice): the input, what the encoder saw, the decoder's
    prediction of every patch, and the reconstruction (visible patches pasted back, masked ones predicted), as MAE
    shows it. With `norm_pix_loss` the model predicts each patch's normalised pattern only, so its prediction is
    shown at the true patch mean and contrast (the row label says so). Returns the PNG path."""
    pixel_values = pixel_values[:8]
    batch, dims = pixel_values.shape[0], pixel_values.ndim - 2
    patch_size = patch_size_for(model.config, dims)
    num_patches = patchify(pixel_values, patch_size).shape[1]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.rand(batch * model.num_views, num_patches, generator=generator).to(pixel_values.device)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):  # a preview must not shift the training run's random stream
        output = model(pixel_values, noise=noise)
    model.train(was_training)
    shape = tuple(pixel_values.shape)
    prediction = model.reconstruct(output.logits, pixel_values).float().cpu()
    pixel_values = pixel_values.float().cpu()
    patches, visible = patchify(pixel_values, patch_size), 1 - output.mask.float().cpu()[..., None]
    masked = unpatchify(patches * visible, shape, patch_size)
    pasted = unpatchify(patches * visible + patchify(prediction, patch_size) * (1 - visible), shape, patch_size)
    predicted_label = "prediction (true patch mean/std)" if model.config.norm_pix_loss else "prediction"
    rows = {"input": pixel_values, "visible patches": masked, predicted_label: prediction, "reconstruction": pasted}
    tiles = []
    for images in rows.values():
        row = []
        for index in range(batch):
            low, high = pixel_values[index].min().item(), pixel_values[index].max().item()
            row.append(_to_display(images[index], low, high))
        tiles.append(np.concatenate(row, axis=1))
    grid = Image.fromarray(np.concatenate(tiles, axis=0))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).convert("RGB")
    margin, header, row_height = 200, 20, grid.height // len(rows)
    canvas = Image.new("RGB", (grid.width + margin, grid.height + header), "white")
    canvas.paste(grid, (margin, header))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill="black")
    for index, label in enumerate(rows):
        draw.text((4, header + index * row_height + row_height // 2 - 6), label, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def save_confusion_matrix(
    labels: np.ndarray, predictions: np.ndarray, class_names: list[str], path: str | os.PathLike, title: str = ""
) -> Path:
    """Counts of (true row, predicted column), shaded by row share, with the counts written in each cell."""
    classes = len(class_names)
    counts = np.zeros((classes, classes), dtype=int)
    np.add.at(counts, (labels.astype(int), predictions.astype(int)), 1)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    names_width = max(ImageFont.load_default().getlength(name) for name in class_names)
    cell, margin = 40, max(110, 55 + int(names_width) + 10)  # class names in full, left of the rows
    image = Image.new("RGB", (margin + classes * cell + 10, 110 + classes * cell + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black")
    top = 110
    draw.text((margin, top - 30), "predicted", fill="black")
    draw.text((10, top - 15), "true", fill="black")
    for row in range(classes):
        draw.text((10, top + row * cell + 14), f"{row} {class_names[row]}", fill="black")
        draw.text((margin + row * cell + 4, top - 15), str(row), fill="black")
        for column in range(classes):
            shade = int(255 * (1 - share[row, column]))
            box = (margin + column * cell, top + row * cell, margin + (column + 1) * cell, top + (row + 1) * cell)
            draw.rectangle(box, fill=(shade, shade, 255), outline="gray")
            draw.text((box[0] + 6, box[1] + 14), str(counts[row, column]), fill="black" if shade > 120 else "white")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
