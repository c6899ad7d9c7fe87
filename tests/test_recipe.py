"""The training recipe: label-safe augmentation from the catalogue, EMA weights, and defaults that learn."""

import argparse
import itertools

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from medformer_hf import MedformerConfig, MedformerForMultiTask
from medformer_hf.data import CATALOGUE, AugmentationPolicy, augment
from medformer_hf.data.catalogue import LABEL_SAFE_AUGMENTATIONS
from medformer_hf.training import MODEL_SIZES, create_ema, create_optimizer

from .conftest import load_npz_images


def _allowed_results(image: torch.Tensor, policy: AugmentationPolicy) -> list[torch.Tensor]:
    """Every image the catalogue's transforms can make: any subset of the allowed flips, then any allowed turn."""
    results = []
    for subset in itertools.chain.from_iterable(
        itertools.combinations(policy.flip_axes, k) for k in range(len(policy.flip_axes) + 1)
    ):
        flipped = image.flip([axis + 2 for axis in subset]) if subset else image
        for turns in range(4) if policy.rotate_90 else [0]:
            results.append(flipped.rot90(turns, dims=(-2, -1)))
    return results


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_augmentation_never_applies_what_the_catalogue_forbids(name):
    policy = CATALOGUE[name].augmentation
    shape = (5,) * CATALOGUE[name].spatial_dims
    image = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(1, 1, *shape)
    allowed = _allowed_results(image, policy)
    geometric = AugmentationPolicy(
        flip_axes=policy.flip_axes, rotate_90=policy.rotate_90, max_shift=0, intensity_jitter=0
    )
    hits = torch.zeros(len(allowed))
    for sample in augment(image.expand(300, *image.shape[1:]).clone(), geometric):
        matches = [index for index, result in enumerate(allowed) if torch.equal(sample[None], result)]
        assert matches, f"{name}: augmentation produced a transform its catalogue entry does not allow"
        hits[matches[0]] += 1
    assert hits[0] > 0  # the untouched image is among the outcomes


def test_left_right_labels_are_never_mirrored():
    assert set(LABEL_SAFE_AUGMENTATIONS) == set(CATALOGUE)
    for name in ("organmnist3d", "organamnist", "organcmnist", "organsmnist", "chestmnist", "retinamnist"):
        assert CATALOGUE[name].augmentation.flip_axes == () and not CATALOGUE[name].augmentation.rotate_90
        image = torch.randn(4, 1, *(6,) * CATALOGUE[name].spatial_dims)
        geometric = AugmentationPolicy(**{**vars(CATALOGUE[name].augmentation), "intensity_jitter": 0, "max_shift": 0})
        assert torch.equal(augment(image, geometric), image)


def test_shift_and_jitter_keep_shape_and_change_pixels():
    pixels = torch.randn(8, 1, 12, 12, 12)
    out = augment(pixels, AugmentationPolicy())
    assert out.shape == pixels.shape and not torch.equal(out, pixels)
    with pytest.raises(ValueError, match="Flip axes"):
        augment(torch.randn(2, 1, 8, 8), AugmentationPolicy(flip_axes=(2,)))


def test_ema_tracks_the_weights_and_is_what_gets_saved(tmp_path):
    torch.manual_seed(0)
    config = MedformerConfig(**MODEL_SIZES["tiny"], tasks={"x": {"type": "binary", "num_labels": 2}})
    model = MedformerForMultiTask(config)
    ema = create_ema(Accelerator(cpu=True), model, 0.5)
    initial = [p.detach().clone() for p in ema.module.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(4, 1, 28, 28), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update_parameters(model)
    averaged = dict(ema.module.named_parameters())
    current = dict(model.named_parameters())
    name = "medformer.main_body.layers.0.mlp.fc1.weight"
    assert not torch.equal(averaged[name], current[name])
    assert not torch.equal(averaged[name], initial[list(current).index(name)])
    ema.module.save_pretrained(tmp_path)
    loaded = MedformerForMultiTask.from_pretrained(tmp_path)
    torch.testing.assert_close(dict(loaded.named_parameters())[name], averaged[name])
    assert create_ema(Accelerator(cpu=True), model, 0.0) is None


def test_default_recipe_learns_a_separable_task_on_real_data():
    """A tiny model with the default init and learning rate leaves the class prior within a few dozen steps
    (linear patches at the old 0.02 init and 1e-3 sat at the prior for 100 epochs): X-ray vs ultrasound."""
    torch.manual_seed(0)
    images = torch.cat([load_npz_images("pneumoniamnist", 96), load_npz_images("breastmnist", 96)])
    labels = torch.cat([torch.zeros(96), torch.ones(96)]).long()
    images = (images - 0.5) / 0.25
    config = MedformerConfig(**MODEL_SIZES["tiny"], tasks={"source": {"type": "binary", "num_labels": 2}})
    model = MedformerForMultiTask(config)
    args = argparse.Namespace(learning_rate=3e-4, weight_decay=0.05, warmup_ratio=0.05, max_steps=40)
    optimizer, scheduler = create_optimizer(model, args, num_processes=1)
    train, held_out = np.arange(0, 192, 2), np.arange(1, 192, 2)
    rng = np.random.default_rng(0)
    for _ in range(args.max_steps):
        batch = rng.choice(train, 32, replace=False)
        model(images[batch], labels=labels[batch]).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    with torch.no_grad():
        predicted = (model.eval()(images[held_out]).logits[:, 0] > 0).long()
    assert (predicted == labels[held_out]).float().mean() > 0.9
