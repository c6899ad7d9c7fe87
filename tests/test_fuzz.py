"""Generated bad inputs to the image processor and to every model's forward: each must raise a ValueError whose
message names the problem (a keyword per case). Counted outcomes: silent acceptance, an error that does not name
the problem, or a crash (any other exception). All three must be zero; BENCHMARKS.md quotes the counts."""

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from medformer_hf import (
    MedformerForImageClassification,
    MedformerForMultiTask,
    MedformerForPreTraining,
    MedformerImageProcessor,
    MedformerModel,
)

from .conftest import make_tiny_config

NAN, INF = float("nan"), float("inf")
GRAY = np.zeros((28, 28), np.uint8)
RGB = np.zeros((28, 28, 3), np.uint8)
VOLUME = np.zeros((16, 16, 16), np.uint8)


def _bad_images():
    """(description, image, call options, keyword the error must contain)."""
    for layout in [(2, 28, 28), (4, 28, 28), (28, 28, 2), (28, 28, 4), (16, 16, 16, 2), (2, 16, 16, 16)]:
        yield f"channels {layout}", np.zeros(layout, np.uint8), {}, "channel"
    for mode in ["LA", "PA", "RGBA", "P", "CMYK", "La", "RGBa", "YCbCr"]:
        yield f"PIL {mode}", Image.new(mode, (28, 28)), {}, mode
    for dtype in [np.complex64, np.complex128, object, "U3", "datetime64[s]"]:
        yield f"dtype {dtype}", np.zeros((28, 28), dtype), {}, "dtype"
    for shape in [(0, 28), (28, 0), (0, 16, 16), (28,), (1, 1, 1, 1, 1, 1), ()]:
        yield f"shape {shape}", np.zeros(shape, np.uint8), {}, "shape" if 0 not in shape else "empty"
    for value, where in itertools.product([NAN, INF, -INF], ["first", "last", "all"]):
        for base in (np.zeros((28, 28), np.float32), np.zeros((8, 8, 8), np.float32)):
            image = base.copy()
            index = {"first": (0,) * image.ndim, "last": (-1,) * image.ndim, "all": ...}[where]
            image[index] = value
            yield f"{value} at {where} {image.ndim}D", image, {}, "NaN or inf"
    for low, high in [(-1000, 2000), (0, 255), (-0.5, 0.5), (0, 1.5), (0, 3e38), (-3e38, 0)]:
        for shape in [(28, 28), (8, 8, 8)]:
            image = np.linspace(low, high, math.prod(shape), dtype=np.float32).reshape(shape)
            yield f"float {low}..{high} {len(shape)}D", image, {}, "[0, 1]"
    for dtype in [np.int16, np.int32, np.int64, np.int8, np.uint32]:
        yield f"{np.dtype(dtype)} without window", np.zeros((28, 28), dtype), {}, "window="
    for item in ["path/that/is/a/string.png", {"a": 1}, None, 3.5]:
        yield f"type {type(item).__name__}", item, {}, "Unsupported image type"
    yield "empty list", [], {}, "empty list"
    yield "2D and 3D in one batch", [GRAY, VOLUME], {}, "2D and 3D"
    yield "shapes differ", [GRAY, np.zeros((32, 32), np.uint8)], {}, "size_2d"


def _bad_options():
    """(description, options, keyword) applied to a valid gray, RGB and 3D image."""
    for window in [[NAN, 400], [40, INF], [40, -INF], [40, 0], [40, -10], [1, 2, 3], [40], "kidney", "LUNG"]:
        yield f"window={window}", {"window": window}, "window"
    for bounds in [[1, 0], [0, 0], [0, NAN], [NAN, 1], [0, INF], [0, 1, 2], [5]]:
        yield f"rescale_range={bounds}", {"rescale_range": bounds}, "rescale_range"
    for statistics in [
        {"default": [0.5, 0.0]},
        {"default": [0.5, -1.0]},
        {"default": [NAN, 0.5]},
        {"ct": [0, INF]},
        {"xray": [0.3, 0.2]},
        {"default": [0.5, 0.5], "x-ray": [0.3, 0.2]},
        {"default": [0.5]},
        [0.5, 0.5],
    ]:
        yield f"modality_statistics={statistics}", {"modality_statistics": statistics}, "modality_statistics"
    for normalization in ["zscore", "Image", "", None]:
        yield f"normalization={normalization}", {"normalization": normalization}, "normalization"
    for dims in [0, 1, 4, "2"]:
        yield f"spatial_dims={dims}", {"spatial_dims": dims}, "spatial_dims"
    for data_format in ["first", "NCHW", "channels-last"]:
        yield f"input_data_format={data_format}", {"input_data_format": data_format}, "input_data_format"
    for size in [[0, 28], [28], [28, 28, 28], [-1, 28], [28.5, 28], [100000, 100000], 28]:
        yield f"size_2d={size}", {"size_2d": size}, "size_2d"
    for size in [[0, 8, 8], [8, 8], [8, 8, 8, 8], [8, -8, 8], [2000, 2000, 2000], 8]:
        yield f"size_3d={size}", {"size_3d": size}, "size_3d"
    for field in ["modality", "body_part"]:
        for name in ["CT", "x-ray", "liver", "", "unknown_thing"]:
            yield f"{field}={name!r}", {field: name}, field
        yield f"{field} count", {field: ["ct", "ct", "ct"]}, f"{field} has 3 names"
    for key in ["colour", "size", "do_resize", "window_level"]:
        yield f"unknown option {key}", {key: 1}, "Unknown option"


PROCESSOR_CASES = [(name, image, options, keyword) for name, image, options, keyword in _bad_images()] + [
    (f"{name} on {kind}", image, options, keyword)
    for name, options, keyword in _bad_options()
    for kind, image in (("gray", GRAY), ("RGB", RGB), ("volume", VOLUME))
]


def _outcome(call, keyword: str) -> str:
    try:
        call()
    except ValueError as error:
        return "named" if keyword.lower() in str(error).lower() else f"unnamed: {error}"
    except Exception as error:  # noqa: BLE001  (any other exception is what this test counts as a crash)
        return f"crash: {type(error).__name__}: {error}"
    return "silent"


def _tally(outcomes: dict[str, str]) -> dict[str, int]:
    kinds = ("named", "silent", "unnamed", "crash")
    return {kind: sum(outcome.split(":")[0] == kind for outcome in outcomes.values()) for kind in kinds}


def test_bad_processor_inputs_are_clear_errors():
    processor = MedformerImageProcessor()
    outcomes = {
        name: _outcome(lambda image=image, options=options: processor(image, **options), keyword)
        for name, image, options, keyword in PROCESSOR_CASES
    }
    bad = {name: outcome for name, outcome in outcomes.items() if outcome != "named"}
    assert not bad, f"{_tally(outcomes)}: {bad}"
    assert len(outcomes) >= 200


MODELS = {
    "backbone": MedformerModel,
    "multitask": MedformerForMultiTask,
    "classifier": MedformerForImageClassification,
    "pretraining": MedformerForPreTraining,
}


def _bad_forward_calls(kind: str):
    """(description, keyword arguments, keyword) for one model class; task models also get bad tasks and labels."""
    task = {"task": "organ"} if kind == "multitask" else {}
    good = torch.rand(2, 1, 16, 16, 16)
    pixel_cases = [
        ("numpy pixels", np.zeros((2, 1, 16, 16, 16), np.float32), "torch.Tensor"),
        ("list pixels", [[0.0]], "torch.Tensor"),
        ("rank 3", torch.rand(2, 16, 16), "rank 3"),
        ("rank 6", torch.rand(1, 1, 4, 4, 4, 4), "rank 6"),
        ("integer pixels", torch.zeros(2, 1, 16, 16, 16, dtype=torch.uint8), "floating point"),
        ("bool pixels", torch.zeros(2, 1, 16, 16, dtype=torch.bool), "floating point"),
        ("2 channels 2D", torch.rand(2, 2, 16, 16), "2-channel"),
        ("4 channels 2D", torch.rand(2, 4, 16, 16), "4-channel"),
        ("3 channels 3D", torch.rand(2, 3, 8, 8, 8), "3-channel"),
        ("size 15", torch.rand(2, 1, 15, 16), "multiple"),
        ("size 2", torch.rand(2, 1, 2, 2), "multiple"),
        ("size 10 3D", torch.rand(2, 1, 8, 10, 8), "multiple"),
        ("NaN pixel", good.clone().index_put_((torch.tensor([0]),), torch.tensor(NAN)), "NaN"),
        ("inf pixel", torch.full((2, 1, 16, 16), INF), "NaN or inf"),
        ("float64 overflow", torch.full((2, 1, 16, 16), 1e300, dtype=torch.float64), "NaN or inf"),
        ("empty batch", torch.rand(0, 1, 16, 16), "batch size 0"),
    ]
    for name, pixels, keyword in pixel_cases:
        yield name, {"pixel_values": pixels, **task}, keyword
    for field in ["modality_ids", "body_part_ids"]:
        for name, ids, keyword in [
            ("float", torch.zeros(2), "integer tensor"),
            ("shape", torch.zeros(3, dtype=torch.long), "shape (2,)"),
            ("2D", torch.zeros(2, 1, dtype=torch.long), "shape (2,)"),
            ("too large", torch.tensor([0, 999]), "outside"),
            ("-2", torch.tensor([-2, 0]), "outside"),
            ("list", [0, 1], "integer tensor"),
        ]:
            yield f"{field} {name}", {"pixel_values": good, field: ids, **task}, keyword
    if kind == "multitask":
        for name, bad_task, keyword in [
            ("unknown name", "liver", "Unknown task"),
            ("no task", None, "pass task="),
            ("id out of range", torch.tensor([0, 99]), "Task ids"),
            ("negative id", torch.tensor([-1, 0]), "Task ids"),
            ("float ids", torch.tensor([0.0, 1.0]), "integer tensor"),
            ("wrong count", torch.tensor([0, 1, 2]), "shape (2,)"),
            ("dict", {"a": 1}, "task name"),
        ]:
            yield f"task {name}", {"pixel_values": good, "task": bad_task}, keyword
        volume_labels = [
            ("(B, 3) class labels", torch.zeros(2, 3, dtype=torch.long), "shape (2,)"),
            ("float class labels", torch.zeros(2), "integer class labels"),
            ("class out of range", torch.tensor([0, 11]), "outside 0..10"),
            ("negative class", torch.tensor([-1, 0]), "outside 0..10"),
            ("too few rows", torch.tensor([0]), "one row per image"),
            ("too many rows", torch.tensor([0, 1, 2]), "one row per image"),
            ("scalar label", torch.tensor(1), "one row per image"),
            ("list labels", [0, 1], "torch.Tensor"),
        ]
        for name, labels, keyword in volume_labels:
            yield f"organ labels {name}", {"pixel_values": good, "task": "organ", "labels": labels}, keyword
        flat = torch.rand(2, 1, 16, 16)
        for task_name, name, labels, keyword in [
            ("chest", "too wide", torch.zeros(2, 5), "shape (2, 3)"),
            ("chest", "too narrow", torch.zeros(2, 2), "shape (2, 3)"),
            ("chest", "not 0/1", torch.full((2, 3), 0.5), "0/1"),
            ("chest", "NaN", torch.full((2, 3), NAN), "NaN"),
            ("age", "NaN regression", torch.tensor([[NAN, 1.0], [1.0, 1.0]]), "NaN"),
            ("age", "too wide regression", torch.zeros(2, 3), "shape (2, 2)"),
            ("pneumonia", "binary 2", torch.tensor([0, 2]), "outside 0..1"),
            ("retina", "ordinal 5", torch.tensor([0, 5]), "outside 0..4"),
        ]:
            yield f"{task_name} labels {name}", {"pixel_values": flat, "task": task_name, "labels": labels}, keyword
        names = list(make_tiny_config().tasks)
        mixed = {"pixel_values": flat, "task": torch.tensor([names.index("age"), names.index("chest")])}
        yield "mixed extra columns", {**mixed, "labels": torch.tensor([[1.0, 2.0, 7.0], [0, 1, 1]])}, "-100"
        yield "mixed too narrow", {**mixed, "labels": torch.zeros(2, 2)}, "at least"
    if kind == "classifier":
        for name, labels, keyword in [
            ("(B, 3) class labels", torch.zeros(2, 3, dtype=torch.long), "shape (2,)"),
            ("class out of range", torch.tensor([0, 2]), "outside 0..1"),
            ("too few rows", torch.tensor([0]), "one row per image"),
        ]:
            yield f"labels {name}", {"pixel_values": good, "labels": labels}, keyword


def test_bad_forward_inputs_are_clear_errors_in_every_model():
    torch.manual_seed(0)
    config = make_tiny_config()
    outcomes = {}
    for kind, model_class in MODELS.items():
        model = model_class(make_tiny_config(tasks=None) if kind == "classifier" else config).eval()
        for name, kwargs, keyword in _bad_forward_calls(kind):
            outcomes[f"{kind}: {name}"] = _outcome(lambda kwargs=kwargs, model=model: model(**kwargs), keyword)
    bad = {name: outcome for name, outcome in outcomes.items() if outcome != "named"}
    assert not bad, f"{_tally(outcomes)}: {bad}"
    assert len(outcomes) >= 100 and len(outcomes) + len(PROCESSOR_CASES) >= 300


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_are_cast_to_the_model_dtype(dtype):
    torch.manual_seed(0)
    config = make_tiny_config()
    pixels = torch.rand(2, 1, 16, 16, 16)
    for kind, model_class in MODELS.items():
        model = model_class(make_tiny_config(tasks=None) if kind == "classifier" else config).eval()
        kwargs = {"task": "organ"} if kind == "multitask" else {}
        if kind == "pretraining":
            kwargs["noise"] = torch.rand(4, 64)
        with torch.no_grad():
            expected = model(pixels.to(dtype).float(), **kwargs)
            actual = model(pixels.to(dtype), **kwargs)
        key = "last_hidden_state" if kind == "backbone" else "logits"
        assert actual[key].dtype == torch.float32
        torch.testing.assert_close(actual[key], expected[key])
