"""Every pretext task learns on real MedMNIST images, 2D and 3D (tiny model, a few dozen CPU steps), and the
2D/3D slice-consistency pretext computes what it says on a case checked by hand."""

import math
import os
import subprocess
import sys

import pytest
import torch

from medformer_hf import MedformerForPreTraining
from medformer_hf.data import AugmentationPolicy, augment
from medformer_hf.modeling_medformer import info_nce, random_slices

from .conftest import REPO_ROOT, load_npz_images, make_tiny_config
from .test_distributed import _free_port

ALL_PRETEXTS = ["masked_reconstruction", "view_agreement", "slice_consistency"]


@pytest.mark.parametrize(("name", "steps"), [("pneumoniamnist", 40), ("organmnist3d", 40)])
def test_every_pretext_loss_drops_on_real_data(name, steps):
    torch.manual_seed(0)
    images = load_npz_images(name, 512)
    images = (images - images.mean()) / images.std()  # as the image processor normalises (the scale matters)
    config = make_tiny_config(hidden_size=64, num_latents=16, ssl_tasks=ALL_PRETEXTS)
    model = MedformerForPreTraining(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    losses = {"reconstruction_loss": [], "agreement_loss": [], "slice_consistency_loss": []}
    for _ in range(steps):
        batch = images[torch.randint(0, len(images), (32,), generator=generator)]
        output = model(batch, view_pixel_values=augment(batch, AugmentationPolicy()))
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for key, values in losses.items():
            if output.get(key) is not None:
                values.append(output[key].item())
    expected = ["reconstruction_loss", "agreement_loss"] + (["slice_consistency_loss"] if "3d" in name else [])
    assert [key for key, values in losses.items() if values] == expected  # slices only exist for volumes
    # Reconstruction falls by a quarter; each contrastive loss falls by a tenth and below log(32), the chance level
    # (and what collapsed, image-independent embeddings give).
    for key in expected:
        first, last = sum(losses[key][:5]) / 5, sum(losses[key][-5:]) / 5
        bound = 0.75 * first if key == "reconstruction_loss" else min(0.9 * first, math.log(32) - 0.05)
        assert last < bound, f"{name}: {key} {first:.4f} -> {last:.4f}"


def test_info_nce_by_hand():
    # Two images whose embeddings match their partner's exactly and are orthogonal to the other's: each row's
    # softmax over similarities (1/T on the diagonal, 0 off it) gives the right partner exp(1/T) / (exp(1/T) + 1).
    first = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # lengths do not matter: embeddings are normalised
    temperature = 0.5
    expected = math.log(1 + math.exp(-1 / temperature))
    torch.testing.assert_close(info_nce(first, first.clone(), temperature), torch.tensor(expected))
    # Swapped partners: the right one scores 0, the wrong one 1/T.
    swapped = info_nce(first, first.flip(0), temperature)
    torch.testing.assert_close(swapped, torch.tensor(math.log(1 + math.exp(1 / temperature))))


def test_info_nce_takes_every_process_rows_as_candidates_when_training(tmp_path):
    """Two processes with 3 rows each give the loss (mean over processes) and the gradients (averaged, as DDP does)
    of one process with all 6 rows; outside a training step (previews on the main process only) each scores its own
    rows."""
    torch.manual_seed(0)
    first, second = torch.randn(6, 8), torch.randn(6, 8)  # what tests/info_nce_worker.py draws
    whole_first, whole_second = first.clone().requires_grad_(), second.clone().requires_grad_()
    expected = info_nce(whole_first, whole_second, 0.2)
    expected.backward()
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO_ROOT / "tests" / "info_nce_worker.py"),
                str(rank),
                str(port),
                str(tmp_path / f"{rank}.pt"),
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr[-3000:]
    found = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    assert all("batches of one size on every process, got [3, 2]" in each["refused"] for each in found)
    torch.testing.assert_close((found[0]["loss"] + found[1]["loss"]) / 2, expected.detach())
    torch.testing.assert_close(torch.cat([each["first_grad"] for each in found]), whole_first.grad)
    torch.testing.assert_close(torch.cat([each["second_grad"] for each in found]), whole_second.grad)
    torch.testing.assert_close(found[1]["local"], info_nce(first[3:], second[3:], 0.2))


def cut_of(plane: torch.Tensor) -> tuple[int, int]:
    """(axis, index) of a slice of the volume `100 * depth + 10 * height + width`, read off its values: the steps
    along the slice's two axes say which axis was held fixed, its first value where."""
    down, across, corner = int(plane[1, 0] - plane[0, 0]), int(plane[0, 1] - plane[0, 0]), int(plane[0, 0])
    axis = {(10, 1): 0, (100, 1): 1, (100, 10): 2}[(down, across)]
    return axis, corner // (100, 10, 1)[axis]


def test_random_slices_by_hand():
    d, h, w = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), torch.arange(8.0), indexing="ij")
    volumes = (100 * d + 10 * h + w).expand(5, 1, 8, 8, 8)
    seen = set()
    for seed in range(20):
        slices = random_slices(volumes, torch.Generator().manual_seed(seed))
        assert slices.shape == (5, 1, 8, 8)
        cuts = [cut_of(plane[0]) for plane in slices]
        assert len({axis for axis, _ in cuts}) == 1  # one axis for the batch
        for sample, (axis, index) in enumerate(cuts):
            assert 2 <= index <= 5, "a slice outside the middle half of the volume"
            assert torch.equal(slices[sample], volumes[sample].select(1 + axis, index))
            seen.add((axis, index))
    assert {axis for axis, _ in seen} == {0, 1, 2} and len(seen) == 12  # every axis, every middle index


@pytest.mark.parametrize("tasks", [["masked_reconstruction", "slice_consistency"], ALL_PRETEXTS])
def test_slice_consistency_pairs_each_volume_with_its_own_slice(tasks):
    torch.manual_seed(0)
    model = MedformerForPreTraining(make_tiny_config(ssl_tasks=tasks, num_latents=4)).train()
    volumes = load_npz_images("organmnist3d", 6)
    views = model.num_views
    noise = torch.rand(6 * views, 7**3)
    torch.manual_seed(3)
    output = model(volumes, noise=noise)
    torch.manual_seed(3)  # the forward's only random draw is the slicing (the masks come from `noise`)
    slices = random_slices(volumes)
    stacked = volumes.repeat_interleave(views, dim=0)
    volume_latents = model.medformer(stacked, noise=noise).pooler_output
    slice_latents = model.medformer(slices).pooler_output
    # By hand: project views and slices together, pair view 1 of each volume with its slice.
    embeddings = model.projector(torch.cat([volume_latents, slice_latents]))
    expected = info_nce(embeddings[: 6 * views : views], embeddings[6 * views :], model.config.agreement_temperature)
    torch.testing.assert_close(output.slice_consistency_loss, expected)
    agreement = 0.0
    if views == 2:
        agreement = info_nce(embeddings[0:12:2], embeddings[1:12:2], model.config.agreement_temperature)
        torch.testing.assert_close(output.agreement_loss, agreement)
    torch.testing.assert_close(output.loss, output.reconstruction_loss + 0.1 * expected + 0.1 * agreement)
    # 2D batches have no slices: the pretext is silent there, not an error.
    assert model(load_npz_images("breastmnist", 4)).slice_consistency_loss is None


def test_view_pixel_values_are_the_second_view():
    torch.manual_seed(0)
    model = MedformerForPreTraining(make_tiny_config()).eval()
    pixels = load_npz_images("breastmnist", 4)
    noise = torch.rand(8, 49)
    same = model(pixels, noise=noise)
    torch.testing.assert_close(model(pixels, noise=noise, view_pixel_values=pixels.clone()).loss, same.loss)
    other = model(pixels, noise=noise, view_pixel_values=pixels.flip(-1))
    assert not torch.allclose(other.agreement_loss, same.agreement_loss)
    torch.testing.assert_close(other.logits, same.logits)  # the first view is untouched
    with pytest.raises(ValueError, match="shaped like pixel_values"):
        model(pixels, view_pixel_values=pixels[:2])
    single = MedformerForPreTraining(make_tiny_config(ssl_tasks=["masked_reconstruction"]))
    with pytest.raises(ValueError, match="needs 'view_agreement'"):
        single(pixels, view_pixel_values=pixels)


def test_slice_consistency_needs_a_2d_path_for_the_channels():
    with pytest.raises(ValueError, match=r"\[1\]-channel slices .* input_channels_2d is \[3\]"):
        make_tiny_config(ssl_tasks=ALL_PRETEXTS, input_channels_2d=[3])


def test_contrastive_pretexts_refuse_a_single_image():
    model = MedformerForPreTraining(make_tiny_config(ssl_tasks=ALL_PRETEXTS)).train()
    with pytest.raises(ValueError, match="at least 2 images per batch"):
        model(torch.randn(1, 1, 8, 8, 8))
    reconstruction_only = MedformerForPreTraining(make_tiny_config(ssl_tasks=["masked_reconstruction"]))
    assert torch.isfinite(reconstruction_only(torch.randn(1, 1, 8, 8, 8)).loss)


def test_reconstruct_restores_image_shape_and_scale():
    model = MedformerForPreTraining(make_tiny_config(norm_pix_loss=True)).eval()
    pixels = load_npz_images("vesselmnist3d", 2)
    target, mean, std = model.reconstruction_target(pixels)
    # Decoding the exact target gives the image back: the normalisation is undone per patch.
    torch.testing.assert_close(model.reconstruct(target, pixels), pixels, atol=1e-5, rtol=1e-5)
    assert model.reconstruct(model(pixels).logits, pixels).shape == pixels.shape


def test_decoder_depth_is_its_own_config_field(tmp_path):
    default = MedformerForPreTraining(make_tiny_config(num_output_layers=2))
    assert len(default.decoder.output_adaptformer.layers) == 2  # follows the task read-out unless set
    model = MedformerForPreTraining(make_tiny_config(num_decoder_layers=3))
    assert len(model.decoder.output_adaptformer.layers) == 3
    model.save_pretrained(tmp_path)
    assert len(MedformerForPreTraining.from_pretrained(tmp_path).decoder.output_adaptformer.layers) == 3
    with pytest.raises(ValueError, match="num_decoder_layers"):
        make_tiny_config(num_decoder_layers=0)
