"""Label-safe training augmentation, driven by each dataset's catalogue entry (`MedMNISTInfo.augmentation`).

Every set gets small random shifts and intensity jitter; flips and 90-degree rotations only where the catalogue says
they keep the label (never for left/right organ labels, never for ordinal fundus grades). Works on a normalised
`(B, C, *spatial)` batch, 2D and 3D alike, with the global torch RNG (so accelerate's checkpoints restore it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..modeling_medformer import flip_views


@dataclass(frozen=True)
class AugmentationPolicy:
    """What may be done to an image of one dataset without changing its label.

    Args:
        flip_axes: spatial axes (0 = first spatial axis: depth in 3D, height in 2D) that may be mirrored.
        rotate_90: whether 90-degree rotations in the plane of the last two axes keep the label.
        max_shift: largest translation in pixels per axis (edge pixels fill the border).
        intensity_jitter: brightness offset and contrast scale drawn from `1 +- jitter` / `+- jitter` (normalised
            units).
    """

    flip_axes: tuple[int, ...] = ()
    rotate_90: bool = False
    max_shift: int = 2
    intensity_jitter: float = 0.1

    def flip_combinations(self) -> list[tuple[int, ...]]:
        """Every set of the allowed flip axes, the identity `()` first: the views of test-time flip averaging."""
        return flip_views(self.flip_axes)


def augment(
    pixel_values: torch.Tensor, policy: AugmentationPolicy, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A randomly transformed copy of a normalised batch, each sample drawn independently, from `generator` (default:
    the global torch RNG)."""
    batch_size, _, *spatial = pixel_values.shape
    dims = len(spatial)
    bad_axes = [axis for axis in policy.flip_axes if not 0 <= axis < dims]
    if bad_axes:
        raise ValueError(f"Flip axes {bad_axes} do not exist in a {dims}D image (spatial axes 0..{dims - 1}).")
    images = pixel_values
    if policy.max_shift > 0:
        shift = policy.max_shift
        padded = F.pad(pixel_values, [shift] * (2 * dims), mode="replicate")
        offsets = torch.randint(0, 2 * shift + 1, (batch_size, dims), generator=generator).tolist()
        images = torch.stack(
            [
                padded[(index, slice(None), *(slice(o, o + size) for o, size in zip(offset, spatial, strict=True)))]
                for index, offset in enumerate(offsets)
            ]
        )
    samples = list(images.unbind(0))
    for index, sample in enumerate(samples):
        flips = [axis + 1 for axis in policy.flip_axes if torch.rand((), generator=generator) < 0.5]
        if flips:
            sample = sample.flip(flips)
        if policy.rotate_90:  # quarter turns only where they keep the shape, else half turns
            turns = (
                int(torch.randint(0, 4, (), generator=generator))
                if spatial[-1] == spatial[-2]
                else 2 * int(torch.randint(0, 2, (), generator=generator))
            )
            sample = sample.rot90(turns, dims=(-2, -1))
        samples[index] = sample
    images = torch.stack(samples)
    if policy.intensity_jitter > 0:
        shape = (batch_size,) + (1,) * (images.ndim - 1)
        contrast = 1 + (torch.rand(shape, generator=generator) * 2 - 1) * policy.intensity_jitter
        brightness = (torch.rand(shape, generator=generator) * 2 - 1) * policy.intensity_jitter
        images = images * contrast.to(images) + brightness.to(images)
    return images
