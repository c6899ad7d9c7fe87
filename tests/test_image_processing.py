import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from medformer_hf import MedformerConfig, MedformerImageProcessor, MedformerModel

from .conftest import make_tiny_config

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (28, 28), dtype=np.uint8)
RGB = RNG.integers(0, 256, (28, 28, 3), dtype=np.uint8)
VOLUME = RNG.integers(0, 256, (8, 12, 16), dtype=np.uint8)


def test_vocabularies_equal_the_config_defaults():
    processor, config = MedformerImageProcessor(), MedformerConfig()
    assert processor.modality_names == config.modality_names
    assert processor.body_part_names == config.body_part_names
    custom = make_tiny_config(modality_names=["unknown", "thermal"], tasks=None)
    assert MedformerImageProcessor.from_model_config(custom).modality_names == ["unknown", "thermal"]


def test_save_and_auto_load_give_identical_outputs(tmp_path):
    processor = MedformerImageProcessor(window="lung", size_3d=[8, 8, 8], normalization="image")
    processor.save_pretrained(tmp_path)
    assert {"preprocessor_config.json", "image_processing_medformer.py", "configuration_medformer.py"} <= {
        path.name for path in tmp_path.iterdir()
    }
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is MedformerImageProcessor
    ct = RNG.integers(-1024, 2000, (6, 10, 10)).astype(np.int16)
    expected, actual = processor(ct, modality="ct"), loaded(ct, modality="ct")
    assert actual.pixel_values.shape == (1, 1, 8, 8, 8)
    for key in ("pixel_values", "modality_ids", "body_part_ids"):
        assert torch.equal(expected[key], actual[key])
    # Per-call options override the saved ones.
    assert loaded(ct, size_3d=[4, 4, 4]).pixel_values.shape == (1, 1, 4, 4, 4)


@pytest.mark.parametrize(
    "image",
    [
        GRAY,
        torch.from_numpy(GRAY),
        Image.fromarray(GRAY),
        GRAY[None],
        GRAY[..., None],
        torch.from_numpy(GRAY)[None],
        GRAY.astype(np.uint16) * 257,
        GRAY.astype(np.float32) / 255,
        torch.from_numpy(GRAY).double() / 255,
        GRAY.astype(np.int16),  # with rescale_range below
    ],
    ids=["np", "torch", "pil", "np-chw", "np-hwc", "torch-chw", "uint16", "float32", "float64", "int16-range"],
)
def test_every_form_of_a_gray_image_gives_the_same_pixels(image):
    processor = MedformerImageProcessor()
    expected = processor(GRAY).pixel_values
    ranges = {np.int16: [0, 255], np.uint16: [0, 65535]}  # integer dtypes whose range the caller knows
    dtype = getattr(getattr(image, "dtype", None), "type", None)  # numpy's scalar type (torch dtypes have none)
    extra = {"rescale_range": ranges[dtype]} if dtype in ranges else {}
    torch.testing.assert_close(processor(image, **extra).pixel_values, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "image",
    [RGB, RGB.transpose(2, 0, 1), torch.from_numpy(RGB), torch.from_numpy(RGB).permute(2, 0, 1), Image.fromarray(RGB)],
    ids=["np-hwc", "np-chw", "torch-hwc", "torch-chw", "pil"],
)
def test_every_form_of_an_rgb_image_gives_the_same_pixels(image):
    processor = MedformerImageProcessor()
    expected = torch.from_numpy(RGB).permute(2, 0, 1)[None].float() / 255
    torch.testing.assert_close(processor(image).pixel_values, (expected - 0.5) / 0.5)


@pytest.mark.parametrize(
    "volume",
    [VOLUME, VOLUME[None], VOLUME[..., None], torch.from_numpy(VOLUME), VOLUME.astype(np.uint16) * 257],
    ids=["dhw", "cdhw", "dhwc", "torch", "uint16"],
)
def test_every_form_of_a_volume_gives_the_same_pixels(volume):
    expected = (torch.from_numpy(VOLUME)[None, None].float() / 255 - 0.5) / 0.5
    extra = {"rescale_range": [0, 65535]} if volume.dtype == np.uint16 else {}
    torch.testing.assert_close(MedformerImageProcessor()(volume, **extra).pixel_values, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (GRAY.astype(np.uint16) * 16, r"this one spans .*12-bit X-ray: \[0, 4095\]"),  # 12 bits in a uint16
        (GRAY.astype(np.int64), r"with_format\('numpy'\) gives them: \[0, 255\]"),  # a datasets row
    ],
    ids=["12-bit-in-uint16", "widened-uint8"],
)
def test_integer_images_without_an_agreed_range_name_the_usual_ones(image, message):
    with pytest.raises(ValueError, match=message):
        MedformerImageProcessor()(image)


def test_batches_lists_and_batched_arrays():
    processor = MedformerImageProcessor()
    batch = np.stack([GRAY, GRAY[::-1]])
    from_list = processor([GRAY, GRAY[::-1]], modality=["xray", "ultrasound"], body_part="chest")
    from_array = processor(batch[:, None], spatial_dims=2, modality=["xray", "ultrasound"], body_part="chest")
    assert from_list.pixel_values.shape == (2, 1, 28, 28)
    assert torch.equal(from_list.pixel_values, from_array.pixel_values)
    assert from_list.modality_ids.tolist() == [1, processor.modality_names.index("ultrasound")]
    assert from_list.body_part_ids.tolist() == [processor.body_part_names.index("chest")] * 2
    volumes = processor(np.stack([VOLUME, VOLUME])[:, None])
    assert volumes.pixel_values.shape == (2, 1, 8, 12, 16)
    as_numpy = processor(GRAY, return_tensors="np")
    assert isinstance(as_numpy["pixel_values"], np.ndarray)


def test_ct_window_matches_hand_computation():
    hounsfield = np.array([[-1000, -350, 40], [240, 1000, 3000]], dtype=np.int16)
    processor = MedformerImageProcessor(normalization="none")
    # soft tissue: level 40, width 400 -> [-160, 240]
    expected = np.clip((hounsfield - (-160)) / 400, 0, 1)
    actual = processor(hounsfield, window="soft_tissue").pixel_values[0, 0].numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-6)
    custom = processor(hounsfield, window=[0, 2000]).pixel_values[0, 0].numpy()
    np.testing.assert_allclose(custom, np.clip((hounsfield + 1000) / 2000, 0, 1), atol=1e-6)


def test_normalization_matches_hand_computation():
    image = np.array([[0, 51], [102, 255]], dtype=np.uint8)
    scaled = image / 255
    statistics = {"default": [0.5, 0.5], "xray": [0.2, 0.4]}
    processor = MedformerImageProcessor(modality_statistics=statistics)
    np.testing.assert_allclose(processor(image, modality="xray").pixel_values[0, 0], (scaled - 0.2) / 0.4, atol=1e-6)
    np.testing.assert_allclose(processor(image, modality="ct").pixel_values[0, 0], (scaled - 0.5) / 0.5, atol=1e-6)
    z_score = processor(image, normalization="image").pixel_values[0, 0].numpy()
    np.testing.assert_allclose(z_score, (scaled - scaled.mean()) / scaled.std(ddof=1), atol=1e-5)


def test_a_missing_modality_under_per_modality_statistics_is_named_once():
    """The processor normalises such images with the "default" entry while the task models read them as their
    task's modality: a mismatch a user who leaves modality= out (as advised when unknown) must hear about."""
    from transformers.testing_utils import CaptureLogger

    from medformer_hf import image_processing_medformer

    image = np.array([[0, 51], [102, 255]], dtype=np.uint8)
    default_only = MedformerImageProcessor(modality_statistics={"default": [0.4, 0.3]})
    with CaptureLogger(image_processing_medformer.logger) as quiet:
        default_only(image)
    per_modality = MedformerImageProcessor(modality_statistics={"default": [0.4, 0.3], "mri": [0.1, 0.2]})
    with CaptureLogger(image_processing_medformer.logger) as named:
        per_modality(image, modality="mri")
    assert quiet.out == "" and named.out == ""
    with CaptureLogger(image_processing_medformer.logger) as missing:
        per_modality(image)
        per_modality(image)
    assert missing.out.count("Images without modality=") == 1 and "['mri']" in missing.out


def test_grayscale_to_rgb_only_when_asked_and_resize():
    processor = MedformerImageProcessor()
    assert processor(GRAY).pixel_values.shape == (1, 1, 28, 28)
    rgb = processor(GRAY, do_convert_rgb=True).pixel_values
    assert rgb.shape == (1, 3, 28, 28) and torch.equal(rgb[:, 0], rgb[:, 2])
    assert processor(GRAY, size_2d=[64, 64]).pixel_values.shape == (1, 1, 64, 64)
    assert processor(VOLUME, size_3d=[16, 16, 16]).pixel_values.shape == (1, 1, 16, 16, 16)
    constant = np.full((4, 4, 4), 128, dtype=np.uint8)
    resized = processor(constant, size_3d=[8, 8, 8], normalization="none").pixel_values
    torch.testing.assert_close(resized, torch.full((1, 1, 8, 8, 8), 128 / 255))


def test_shrinking_a_volume_averages_instead_of_aliasing():
    """Every 4th column lit: brought from 32 to 8 columns each output voxel covers one lit column in four (0.25).
    Trilinear alone samples between columns 1 and 2 of each block and sees none of them (0 everywhere)."""
    stripes = np.zeros((32, 32, 32), dtype=np.uint8)
    stripes[..., ::4] = 255
    processor = MedformerImageProcessor(normalization="none")
    shrunk = processor(stripes, spatial_dims=3, size_3d=[8, 8, 8]).pixel_values
    torch.testing.assert_close(shrunk, torch.full((1, 1, 8, 8, 8), 0.25))
    mixed = processor(stripes, spatial_dims=3, size_3d=[64, 8, 8]).pixel_values  # one axis grows, two shrink
    torch.testing.assert_close(mixed, torch.full((1, 1, 64, 8, 8), 0.25))


def test_mixed_shapes_group_when_asked():
    processor = MedformerImageProcessor()
    groups = processor([GRAY, VOLUME, GRAY], group_by_shape=True)
    assert [group.pixel_values.shape[1:] for group in groups] == [(1, 28, 28), (1, 8, 12, 16)]
    assert [group["indices"].tolist() for group in groups] == [[0, 2], [1]]
    same_size = processor([GRAY, RNG.integers(0, 255, (32, 32), dtype=np.uint8)], size_2d=[28, 28])
    assert same_size.pixel_values.shape == (2, 1, 28, 28)


def test_processor_output_feeds_the_model_2d_and_3d():
    config = make_tiny_config()
    model = MedformerModel(config).eval()
    processor = MedformerImageProcessor.from_model_config(config)
    for image, modality in ((RGB, "dermatoscopy"), (VOLUME, "ct"), (GRAY, "xray")):
        inputs = processor(image, modality=modality)
        assert model(**inputs).last_hidden_state.shape == (1, config.num_latents, config.hidden_size)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p(GRAY, modality="sonar"), r"Unknown modality \['sonar'\]. Known names: \['unknown', 'xray'"),
        (lambda p: p(GRAY, body_part="tail"), "Unknown body_part"),
        (lambda p: p(np.zeros((28, 28, 4), np.uint8)), "4-channel"),
        (lambda p: p(Image.new("RGBA", (28, 28))), "mode RGBA"),
        (lambda p: p([GRAY, VOLUME]), "mixes 2D and 3D images"),
        (lambda p: p([GRAY, np.zeros((32, 32), np.uint8)]), "size_2d="),
        (lambda p: p(np.zeros((0, 28), np.uint8)), "empty image"),
        (lambda p: p([]), "empty list"),
        (lambda p: p(np.array([[np.nan, 0.0]], np.float32)), "NaN or inf"),
        (lambda p: p(np.array([[np.inf, 0.0]])), "NaN or inf"),
        (lambda p: p(np.zeros((4, 4), np.complex64)), "complex64"),
        (lambda p: p(np.zeros((4, 4), np.int16)), "window="),
        (lambda p: p(np.zeros((3, 28, 1), np.uint8)), "input_data_format"),
        # MedMNIST's own 2D layouts: the message names the fix for a stack and for a batch
        (lambda p: p(np.zeros((8, 28, 28), np.uint8), spatial_dims=2), r"list\(images\)\), or as images\[:, None\]"),
        (lambda p: p(np.zeros((8, 1, 28, 28), np.uint8)), r"a batch of 8 2D images .*Pass spatial_dims=2"),
        (lambda p: p(GRAY, window="kidney"), "Unknown CT window"),
        (lambda p: p(GRAY, colour="red"), "Unknown option"),
        (lambda p: p([GRAY, GRAY], modality=["ct"]), "1 names for 2 images"),
    ],
)
def test_bad_input_raises_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(MedformerImageProcessor())


@pytest.mark.parametrize(
    "option, equivalent",
    [("do_resize", "size_2d"), ("size", "size_2d"), ("do_normalize", "normalization"), ("image_mean", "modality_stat")],
)
def test_transformers_usual_options_are_refused_naming_what_does_their_job(tmp_path, option, equivalent):
    """They would be stored and saved, and change nothing: the processor's own options do their job."""
    MedformerImageProcessor().save_pretrained(tmp_path)
    for make in (
        lambda: MedformerImageProcessor(**{option: False}),
        lambda: AutoImageProcessor.from_pretrained(tmp_path, **{option: False}),
        lambda: MedformerImageProcessor()(GRAY, **{option: False}),
    ):
        with pytest.raises(ValueError, match=rf"Unknown option.*{option}.*{equivalent}.*Its options: .*'size_3d'"):
            make()


def test_a_misspelt_option_when_loading_is_refused_not_dropped(tmp_path):
    """transformers' `from_pretrained` drops options it does not know without a word: `size2d=` would leave the
    saved size in place. A near miss of a real option is refused, naming it; exact options still load."""
    MedformerImageProcessor(size_2d=[84, 84]).save_pretrained(tmp_path)
    for load in (MedformerImageProcessor.from_pretrained, AutoImageProcessor.from_pretrained):
        with pytest.raises(ValueError, match=r"'size2d' \(did you mean 'size_2d'\?\)"):
            load(tmp_path, size2d=[28, 28])
        with pytest.raises(ValueError, match=r"'normalisation' \(did you mean 'normalization'\?\)"):
            load(tmp_path, normalisation="image")
        assert load(tmp_path, size_2d=[28, 28]).size_2d == [28, 28]
