"""Masked reconstruction learns on real MedMNIST images, 2D and 3D (tiny model, a few dozen CPU steps)."""

import pytest
import torch

from medformer_hf import MedformerForPreTraining

from .conftest import load_npz_images, make_tiny_config


@pytest.mark.parametrize(("name", "steps"), [("pneumoniamnist", 40), ("vesselmnist3d", 30)])
def test_reconstruction_loss_drops_on_real_data(name, steps):
    torch.manual_seed(0)
    images = load_npz_images(name, 512)
    model = MedformerForPreTraining(make_tiny_config(hidden_size=64, num_latents=16)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        batch = images[torch.randint(0, len(images), (32,), generator=generator)]
        output = model(batch)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.reconstruction_loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, f"{name}: reconstruction loss {first:.4f} -> {last:.4f}"
    assert output.agreement_loss is not None and torch.isfinite(output.agreement_loss)


def test_reconstruct_restores_image_shape_and_scale():
    model = MedformerForPreTraining(make_tiny_config(norm_pix_loss=True)).eval()
    pixels = load_npz_images("vesselmnist3d", 2)
    target, mean, std = model.reconstruction_target(pixels)
    # Decoding the exact target gives the image back: the normalisation is undone per patch.
    torch.testing.assert_close(model.reconstruct(target, pixels), pixels, atol=1e-5, rtol=1e-5)
    assert model.reconstruct(model(pixels).logits, pixels).shape == pixels.shape
