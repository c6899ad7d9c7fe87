"""What a new user meets on the documented paths gives the right answer, or a clear error naming an option that
exists: raw CT units, metadata defaults, one task of a multi-task model, LoRA heads, other image sizes."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageClassification

from medformer_hf import (
    MedformerConfig,
    MedformerForImageClassification,
    MedformerForMultiTask,
    MedformerForPreTraining,
    MedformerImageProcessor,
    load_dicom,
    task_probabilities,
)
from medformer_hf.data import CATALOGUE
from medformer_hf.integrations import export_onnx, lora_config

from .conftest import DATA_DIR, REPO_ROOT, TASKS, make_tiny_config
from .test_remote_code import run_code_without_the_package

pydicom_data = pytest.importorskip("pydicom.data")
CT_FILE = pydicom_data.get_testdata_file("CT_small.dcm")


@pytest.fixture(scope="module")
def multi_task():
    torch.manual_seed(0)
    return MedformerForMultiTask(make_tiny_config()).eval()


@pytest.fixture(scope="module")
def organ_volume() -> np.ndarray:
    return np.load(DATA_DIR / "organmnist3d.npz")["test_images"][0]


# ------------------------------------------------------------------------------------------ 1. physical units


def test_dicom_ct_in_hounsfield_units_needs_a_window():
    processor = MedformerImageProcessor()
    with pytest.raises(ValueError, match=r"window=.*lung") as error:
        processor(load_dicom(CT_FILE))
    assert "Hounsfield" in str(error.value)
    windowed = processor(load_dicom(CT_FILE), window="soft_tissue", normalization="none").pixel_values
    assert 0.0 <= windowed.min() and windowed.max() <= 1.0


def test_a_ct_window_on_scaled_values_or_beside_a_range_is_refused():
    scaled = np.random.default_rng(0).random((8, 8, 8), dtype=np.float32)  # [0, 1]: windowing makes it one value
    processor = MedformerImageProcessor()
    with pytest.raises(ValueError, match="scaled already.*Drop window="):
        processor(scaled, spatial_dims=3, window="soft_tissue")
    hounsfield = scaled * 2000 - 1000
    with pytest.raises(ValueError, match="both map intensities"):
        processor(hounsfield, spatial_dims=3, window="soft_tissue", rescale_range=[-1000, 1000])
    assert processor(hounsfield, spatial_dims=3, window="soft_tissue").pixel_values.std() > 0.1


def test_a_stored_value_range_on_display_or_scaled_values_is_refused():
    """A processor saved with a 12-bit range would make an 8-bit or a [0, 1] image nearly black: refused, and the
    same images pass with rescale_range=None."""
    processor = MedformerImageProcessor(rescale_range=[0, 4095])
    display = np.full((28, 28), 255, np.uint8)
    with pytest.raises(ValueError, match=r"rescale_range=\[0, 4095\].*uint8 image.*rescale_range=None"):
        processor(display)
    with pytest.raises(ValueError, match="float image lies in.*scaled already"):
        processor(display.astype(np.float32) / 255)
    assert processor(display, rescale_range=None, normalization="none").pixel_values.min() == 1.0
    stored = np.full((28, 28), 4095, np.uint16)
    assert processor(stored, normalization="none").pixel_values.min() == 1.0
    assert MedformerImageProcessor(rescale_range=[10, 200])(display, normalization="none").pixel_values.min() == 1.0


def test_a_ct_window_on_stored_values_or_another_modality_is_refused():
    hounsfield = np.linspace(-1000, 1000, 8**3, dtype=np.float32).reshape(8, 8, 8)
    processor = MedformerImageProcessor()
    with pytest.raises(ValueError, match="uint16 image, which cannot hold them.*load_dicom"):
        processor((hounsfield + 1024).astype(np.uint16), spatial_dims=3, window="soft_tissue")
    with pytest.raises(ValueError, match=r"the images are \['mri'\].*normalization='image'"):
        processor(hounsfield, spatial_dims=3, window="soft_tissue", modality="mri")
    with pytest.raises(ValueError, match=r"1 of the 2 images are \['xray'\].*one call for the CT images"):
        processor([hounsfield, hounsfield], spatial_dims=3, window="lung", modality=["ct", "xray"])
    with pytest.raises(ValueError, match="Unknown modality"):  # a name outside the vocabulary: that error first
        MedformerImageProcessor(modality_names=["unknown", "ct"])(
            hounsfield, spatial_dims=3, window="lung", modality="mri"
        )
    for modality in ("ct", "unknown", None):
        assert processor(hounsfield, spatial_dims=3, window="soft_tissue", modality=modality).pixel_values.std() > 0.1


@pytest.mark.parametrize("values", [(-1000.0, 2000.0), (0.0, 255.0), (-0.5, 0.5)])
def test_float_images_outside_the_unit_range_are_refused(values):
    image = np.linspace(*values, 28 * 28, dtype=np.float32).reshape(28, 28)
    with pytest.raises(ValueError, match=r"rescale_range=\[low, high\].*normalization='image'"):
        MedformerImageProcessor()(image)
    scaled = MedformerImageProcessor()(image, rescale_range=list(values), normalization="none").pixel_values
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    assert torch.isfinite(MedformerImageProcessor()(image, normalization="image").pixel_values).all()


def test_float_images_in_the_unit_range_pass_unchanged():
    image = np.linspace(0, 1, 28 * 28, dtype=np.float32).reshape(28, 28)
    pixels = MedformerImageProcessor(normalization="none")(image).pixel_values
    assert torch.equal(pixels[0, 0], torch.from_numpy(image))


@pytest.mark.parametrize(
    "option",
    [
        {"window": [float("nan"), 400]},
        {"window": [40, float("inf")]},
        {"rescale_range": [0, float("nan")]},
        {"modality_statistics": {"default": [0.5, float("nan")]}},
    ],
)
def test_non_finite_options_are_refused(option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"{name}.*finite"):
        MedformerImageProcessor()(np.zeros((28, 28), np.uint8), **option)


# ------------------------------------------------------------------------------------------ 2. metadata defaults


def test_metadata_not_given_falls_back_to_the_task(multi_task, organ_volume):
    processor = MedformerImageProcessor.from_model_config(multi_task.config)
    inputs = processor(organ_volume, spatial_dims=3)
    assert inputs.modality_ids.tolist() == [-1] and inputs.body_part_ids.tolist() == [-1]
    with torch.no_grad():
        through_processor = multi_task(**inputs, task="organ").logits
        task_defaults = multi_task(inputs.pixel_values, task="organ").logits
        said_unknown = multi_task(**processor(organ_volume, spatial_dims=3, modality="unknown"), task="organ").logits
    assert torch.equal(through_processor, task_defaults)
    assert not torch.allclose(said_unknown, task_defaults)  # "unknown" is an answer, not a missing one


def test_mixed_given_and_missing_metadata_per_sample(multi_task):
    pixels = torch.rand(2, 1, 28, 28, 28)
    ct, abdomen = multi_task.config.modality_names.index("ct"), multi_task.config.body_part_names.index("abdomen")
    with torch.no_grad():
        mixed = multi_task(
            pixels, task="organ", modality_ids=torch.tensor([-1, 0]), body_part_ids=torch.tensor([-1, 0])
        )
        explicit = multi_task(
            pixels, task="organ", modality_ids=torch.tensor([ct, 0]), body_part_ids=torch.tensor([abdomen, 0])
        )
    assert torch.equal(mixed.logits, explicit.logits)
    with pytest.raises(ValueError, match="-1 = not"):
        multi_task(pixels, task="organ", modality_ids=torch.tensor([-2, 0]))


def test_images_without_modality_use_the_default_statistics():
    processor = MedformerImageProcessor(modality_statistics={"default": [0.5, 0.25], "ct": [0.1, 1.0]})
    image = np.full((28, 28), 255, np.uint8)
    assert processor(image).pixel_values.unique().tolist() == [2.0]
    assert processor(image, modality="ct").pixel_values.unique().tolist() == pytest.approx([0.9])


# ------------------------------------------------------------------------------------------ 3. one task of many


def test_a_multi_task_folder_is_not_loaded_as_a_random_classifier(multi_task, tmp_path, caplog):
    """Refused before loading, so the refusal is not preceded by the load's warnings (tasks dropped, a new head)."""
    multi_task.save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="medformer_hf"), pytest.raises(ValueError, match="from_multi_task"):
        MedformerForImageClassification.from_pretrained(tmp_path)
    assert caplog.text == ""


def test_a_multi_task_models_backbone_becomes_a_classifier_without_its_tasks(multi_task, tmp_path, caplog):
    """A backbone saved from a multi-task model (`AutoModel.from_pretrained(folder).save_pretrained(...)`) keeps the
    tasks in its config; loaded as a classifier to fine-tune, they describe none of its heads: they are dropped with a
    warning, so neither the classifier nor its saved fine-tune claims a task's labels, metadata or image checks."""
    multi_task.medformer.save_pretrained(tmp_path / "backbone")
    assert MedformerForImageClassification(multi_task.config).config.tasks == {} and multi_task.config.tasks  # a copy
    with caplog.at_level("WARNING", logger="medformer_hf"):
        classifier = MedformerForImageClassification.from_pretrained(tmp_path / "backbone", num_labels=3)
    assert "none of them describes: they are dropped" in caplog.text and classifier.config.tasks == {}
    classifier.save_pretrained(tmp_path / "fine-tuned")
    reloaded = MedformerForImageClassification.from_pretrained(tmp_path / "fine-tuned")
    assert reloaded.config.tasks == {} and reloaded.config.num_labels == 3


def test_a_classifier_folder_is_not_loaded_as_a_multi_task_model_with_a_random_head(multi_task, tmp_path):
    MedformerForImageClassification.from_multi_task(multi_task, "pneumonia").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="single-task classifier.*AutoModelForImageClassification"):
        MedformerForMultiTask.from_pretrained(tmp_path)


@pytest.mark.parametrize("order", [("multi", "single"), ("single", "multi")])
def test_auto_classifier_loads_each_folder_as_what_it_holds_in_any_order(multi_task, order, tmp_path):
    """transformers registers the first remote classifier it loads for the config class; later folders then load as
    that class unless the package registers both and lets `architectures` decide."""
    folders = {"multi": tmp_path / "multi", "single": tmp_path / "single"}
    multi_task.save_pretrained(folders["multi"])
    MedformerForImageClassification.from_multi_task(multi_task, "organ").save_pretrained(folders["single"])
    expected = {"multi": MedformerForMultiTask, "single": MedformerForImageClassification}
    for kind in order:
        model = AutoModelForImageClassification.from_pretrained(folders[kind], trust_remote_code=True)
        assert type(model) is expected[kind]


def test_binary_scores_refuse_a_classifiers_two_logits():
    """A classifier's binary head is [0, z]: read as one logit it would score 0.5 for every image."""
    two_logits = torch.tensor([[0.0, 3.0], [0.0, -2.0]])
    with pytest.raises(ValueError, match="task_type='multiclass'"):
        task_probabilities(two_logits, "binary")
    torch.testing.assert_close(
        task_probabilities(two_logits[:, 1:], "binary"), task_probabilities(two_logits, "multiclass")
    )


@pytest.mark.parametrize("task", ["organ", "pneumonia", "chest", "age"])
def test_one_task_as_a_classifier_keeps_its_predictions(multi_task, task):
    classifier = MedformerForImageClassification.from_multi_task(multi_task, task)
    spec = multi_task.config.tasks[task]
    pixels = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        expected = multi_task(pixels, task=task).logits
        logits = classifier(pixels).logits
    if spec["type"] == "binary":  # two logits [0, z]: the softmax is the task's [1 - p, p]
        torch.testing.assert_close(logits.softmax(-1), task_probabilities(expected, "binary"))
    else:
        torch.testing.assert_close(logits, expected)
    assert classifier.config.id2label == spec["id2label"] and classifier.config.tasks == {task: spec}


def test_ordinal_tasks_do_not_pretend_to_be_a_classifier(multi_task):
    with pytest.raises(ValueError, match="ordinal.*task="):
        MedformerForImageClassification.from_multi_task(multi_task, "retina")


def test_onnx_export_of_one_task_of_a_multi_task_model(multi_task, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    path = export_onnx(multi_task, tmp_path / "retina.onnx", (2, 1, 28, 28), task="retina")
    pixels = torch.rand(2, 1, 28, 28)
    ids = torch.tensor([-1, 3])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"pixel_values": pixels.numpy(), "modality_ids": ids.numpy(), "body_part_ids": ids.numpy()}
    (logits,) = session.run(["logits"], feeds)
    with torch.no_grad():
        expected = multi_task(pixels, task="retina", modality_ids=ids, body_part_ids=ids).logits
    assert np.abs(logits - expected.numpy()).max() <= 1e-4
    with pytest.raises(ValueError, match="Pass the task"):
        export_onnx(multi_task, tmp_path / "x.onnx", (2, 1, 28, 28))
    # A task grown with adapters of its own takes a route the exporter cannot trace: the way out is named.
    grown = copy.deepcopy(multi_task)  # the fixture is shared
    grown.add_task("grown", adapter_rank=2, **CATALOGUE["breastmnist"].task_spec())
    with pytest.raises(ValueError, match="adapters of its own.*examples/extract_task.py"):
        export_onnx(grown.eval(), tmp_path / "grown.onnx", (2, 1, 28, 28), task="grown")


@pytest.mark.parametrize("saved", ["multitask-without-task", "pretraining"])
def test_export_script_refuses_what_has_no_trained_head(saved, multi_task, tmp_path):
    pytest.importorskip("onnxruntime")
    model = multi_task if saved.startswith("multitask") else MedformerForPreTraining(make_tiny_config())
    model.save_pretrained(tmp_path / "model")
    script = REPO_ROOT / "examples" / "export_onnx.py"
    arguments = ["--model", str(tmp_path / "model"), "--input_shape", "1", "1", "28", "28"]
    result = subprocess.run([sys.executable, str(script), *arguments], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert ("Pass the task" if saved.startswith("multitask") else "no trained head") in result.stderr


# ------------------------------------------------------------------------------------------ 4. LoRA


def test_lora_on_a_multi_task_model_trains_every_head(multi_task):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(MedformerForMultiTask(multi_task.config), lora_config(multi_task, r=4))
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    for task in multi_task.config.tasks:
        assert any(f"task_heads.{task}.modules_to_save" in name for name in trainable), task
    assert all("lora_" in name or "modules_to_save" in name for name in trainable)
    model(torch.rand(2, 1, 28, 28, 28), task="organ", labels=torch.tensor([1, 2])).loss.backward()
    head = dict(model.named_parameters())
    gradient = head["base_model.model.task_heads.organ.modules_to_save.default.projection.weight"].grad
    assert gradient is not None and gradient.abs().sum() > 0


def test_lora_config_for_a_classifier_trains_its_head():
    pytest.importorskip("peft")
    classifier = MedformerForImageClassification(make_tiny_config(tasks=None))
    assert lora_config(classifier).modules_to_save == ["classifier"]


# ------------------------------------------------------------------------------------------ 5. other sizes


def test_the_processor_saved_by_training_brings_any_size_to_the_training_size(multi_task, tmp_path):
    MedformerImageProcessor.from_model_config(multi_task.config, training_size=28).save_pretrained(tmp_path)
    processor = MedformerImageProcessor.from_pretrained(tmp_path)
    volume = np.random.default_rng(0).integers(0, 255, (25, 41, 33), dtype=np.uint8)
    assert processor(volume).pixel_values.shape == (1, 1, 28, 28, 28)
    assert processor(volume[0]).pixel_values.shape == (1, 1, 28, 28)
    with torch.no_grad():
        multi_task(**processor(volume), task="organ")


def test_a_wrong_size_error_names_options_that_exist(multi_task):
    with pytest.raises(ValueError, match=r"size_3d=") as error:
        multi_task(torch.rand(1, 1, 25, 41, 33), task="organ")
    assert "size=" not in str(error.value).replace("size_3d=", "")
    assert "size_3d" in MedformerImageProcessor().valid_kwargs.__annotations__


def test_a_one_file_dicom_series_is_a_2d_image(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    pydicom.dcmread(CT_FILE).save_as(tmp_path / "only_slice.dcm")
    image = load_dicom(tmp_path)
    assert image.spatial_dims == 2 and image.array.shape == (128, 128)


# ------------------------------------------------------------------------------------------ 6. pipelines

PIPELINES_ON_A_MULTI_TASK_FOLDER = """
import json, sys
import numpy as np
from transformers import pipeline

multi, single, volume_file = sys.argv[1:]
volume = np.load(volume_file)
results = {}
medical = pipeline("medical-image-classification", model=multi, trust_remote_code=True)
results["medical"] = medical(volume, task="organ", top_k=None)
try:
    pipeline("image-classification", model=multi, trust_remote_code=True)(volume[0])
except ValueError as error:
    results["standard_on_multi"] = str(error)
standard = pipeline("image-classification", model=single, trust_remote_code=True)
results["standard_on_single"] = standard(volume[0], top_k=2)
results["medical_on_pneumonia"] = medical(volume[0], task="pneumonia")
print(json.dumps(results))
"""


def test_both_pipelines_on_a_multi_task_folder_without_the_package(multi_task, organ_volume, tmp_path):
    multi_task.save_pretrained(tmp_path / "multi")
    processor = MedformerImageProcessor.from_model_config(multi_task.config, training_size=28)
    processor.save_pretrained(tmp_path / "multi")
    MedformerForImageClassification.from_multi_task(multi_task, "pneumonia").save_pretrained(tmp_path / "single")
    processor.save_pretrained(tmp_path / "single")
    np.save(tmp_path / "volume.npy", organ_volume)
    arguments = [str(tmp_path / "multi"), str(tmp_path / "single"), str(tmp_path / "volume.npy")]
    results = json.loads(run_code_without_the_package(PIPELINES_ON_A_MULTI_TASK_FOLDER, arguments, tmp_path))

    with torch.no_grad():  # the pipeline equals the model with the task's own metadata
        pixels = processor(organ_volume).pixel_values
        probabilities = task_probabilities(multi_task(pixels, task="organ").logits, "multiclass")[0]
    id2label = multi_task.config.tasks["organ"]["id2label"]
    by_label = {item["label"]: item["score"] for item in results["medical"]}
    # Across two processes the CPU kernels may differ (1.9e-5 seen in CI, 0.0 here); a transposed or flipped volume
    # moves these probabilities by 6e-2, so 1e-4 still tells a wrong reading from float noise.
    assert by_label == pytest.approx({id2label[i]: float(p) for i, p in enumerate(probabilities)}, abs=1e-4)
    assert "medical-image-classification" in results["standard_on_multi"]
    assert "from_multi_task" in results["standard_on_multi"]
    single = {item["label"]: item["score"] for item in results["standard_on_single"]}
    medical = {item["label"]: item["score"] for item in results["medical_on_pneumonia"]}
    assert single == pytest.approx(medical, abs=1e-6) and set(single) == {"normal", "pneumonia"}


# ------------------------------------------------------------------------------------------ 8. quiet loads

QUIET = """
import sys
from medformer_hf import MedformerForMultiTask, MedformerForPreTraining, MedformerModel
from transformers import AutoModel

folder, saved = sys.argv[1:]
MedformerModel.from_pretrained(folder)  # a backbone out of a multi-task checkpoint: the expected path, silent
AutoModel.from_pretrained(folder)
model = MedformerForMultiTask.from_pretrained(folder)
model.save_pretrained(saved)  # no progress bar for a file of a few hundred kB
MedformerForPreTraining.from_pretrained(folder)  # new decoder: said in one line
"""


def test_loading_and_saving_say_one_line_at_most(multi_task, tmp_path):
    multi_task.save_pretrained(tmp_path / "multi")
    script = [sys.executable, "-c", QUIET, str(tmp_path / "multi"), str(tmp_path / "saved")]
    result = subprocess.run(script, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("MedformerForPreTraining")
    assert "initialised anew (train before use): decoder, projector" in lines[0]
    assert (tmp_path / "saved" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------ 6. the images a task was trained on


@pytest.fixture(scope="module")
def recorded_kinds():
    """A tiny model whose tasks record the images they take, as every catalogued task does."""
    torch.manual_seed(0)
    tasks = {
        "pneumonia": {"type": "binary", "num_labels": 2, "spatial_dims": 2, "num_channels": 1},
        "retina": {"type": "ordinal", "num_labels": 5, "spatial_dims": 2, "num_channels": 3},
        "organ": {"type": "multiclass", "num_labels": 11, "spatial_dims": 3, "num_channels": 1},
    }
    return MedformerForMultiTask(make_tiny_config(tasks=tasks)).eval()


@pytest.mark.parametrize(
    ("task", "pixels", "message"),
    [
        ("pneumonia", torch.rand(2, 1, 16, 28, 28), r"a stack of 2D images\? Pass them as a list"),
        ("organ", torch.rand(2, 1, 28, 28), "pass the whole volume"),
        (
            "pneumonia",
            torch.rand(2, 3, 28, 28),
            r"3-channel batch whose channels differ: a colour image \(convert it to grayscale.*as a list",
        ),
        ("retina", torch.rand(2, 1, 28, 28), r"trained on RGB \(3-channel\) images, got a 1-channel batch"),
    ],
)
def test_a_task_refuses_images_unlike_those_it_was_trained_on(recorded_kinds, task, pixels, message):
    with pytest.raises(ValueError, match=message):
        recorded_kinds(pixels, task=task)


def test_a_batch_mixing_tasks_is_checked_as_a_whole(recorded_kinds):
    gray_as_rgb = torch.rand(4, 1, 28, 28).expand(-1, 3, -1, -1)
    with torch.no_grad():  # a grayscale and an RGB task cannot share one batch tensor
        with pytest.raises(ValueError, match=r"take images of \[1, 3\] channels.*batch them by task"):
            recorded_kinds(gray_as_rgb, task=torch.tensor([0, 0, 1, 1]))
        one_task = recorded_kinds(gray_as_rgb[:2], task="pneumonia").logits
        mixed = recorded_kinds(gray_as_rgb[:2], task=torch.tensor([0, 0]))
    torch.testing.assert_close(mixed.task_logits["pneumonia"], one_task)


def test_a_grayscale_image_as_three_identical_channels_is_its_one_channel(recorded_kinds):
    gray = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        expected = recorded_kinds(gray, task="pneumonia").logits
        torch.testing.assert_close(recorded_kinds(gray.expand(-1, 3, -1, -1), task="pneumonia").logits, expected)
        classifier = MedformerForImageClassification.from_multi_task(recorded_kinds, "pneumonia")
        torch.testing.assert_close(classifier(gray.repeat(1, 3, 1, 1)).logits[:, 1:], expected)


def test_the_image_classification_pipeline_reads_a_grayscale_pil_image_right():
    """transformers' pipeline loads every PIL image as RGB; the released checkpoint's X-ray task must still see the
    X-ray it was trained on (it used to fall to the class prior on such input)."""
    from PIL import Image
    from transformers import pipeline

    folder = REPO_ROOT / "checkpoints" / "medformer-small-medmnist"
    classifier = MedformerForImageClassification.from_multi_task(folder, "pneumoniamnist")
    processor = MedformerImageProcessor.from_pretrained(folder)
    images = np.load(DATA_DIR / "pneumoniamnist.npz")["test_images"][:4]
    with torch.no_grad():
        expected = classifier(**processor(list(images))).logits.softmax(-1)
    pipe = pipeline("image-classification", model=classifier, image_processor=processor)
    for image, probabilities in zip(images, expected, strict=True):
        scores = {entry["label"]: entry["score"] for entry in pipe(Image.fromarray(image))}
        found = [scores[classifier.config.id2label[index]] for index in range(2)]
        torch.testing.assert_close(torch.tensor(found), probabilities, atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["pneumonia", "organ", "retina", "chest"])
def test_a_one_task_multi_task_model_is_labelled_right_in_the_image_classification_pipeline(task):
    """A one-task folder (finetune.py --datasets <one set>) in transformers' plain pipeline used to be read with the
    default LABEL_0 / LABEL_1 and a softmax over one binary logit (always 1.0). Each score must be the probability
    its label names; the ordinal one P(label > k)."""
    from transformers import pipeline

    torch.manual_seed(0)
    model = MedformerForMultiTask(make_tiny_config(tasks={task: TASKS[task]})).eval()
    processor = MedformerImageProcessor.from_model_config(model.config, training_size=28)
    image = np.load(DATA_DIR / "pneumoniamnist.npz")["test_images"][0]
    with torch.no_grad():
        logits = model(**processor(image)).logits[0]
    spec = model.config.tasks[task]
    names = [spec["id2label"][index] for index in range(spec["num_labels"])]
    labelled = {  # label names and the probabilities they stand for
        "binary": (names[1:], logits.sigmoid()),
        "multiclass": (names, logits.softmax(-1)),
        "ordinal": ([f"> {name}" for name in names[:-1]], logits.sigmoid()),
        "multilabel": (names, logits.sigmoid()),
    }
    expected = dict(zip(*labelled[spec["type"]], strict=True))
    scores = pipeline("image-classification", model=model, image_processor=processor)(image, top_k=len(expected))
    assert {entry["label"] for entry in scores} == set(expected)
    for entry in scores:
        assert entry["score"] == pytest.approx(expected[entry["label"]].item(), abs=1e-5)


def test_top_level_labels_follow_the_task_count(tmp_path):
    """Only a one-task model's top-level labels name its task: adding a second task (finetune.py --init_from a
    backbone adds its sets one by one) returns them to transformers' defaults, so a multi-task config never claims
    one task's labels, and folders saved with stale ones load right."""
    defaults = MedformerConfig()
    model = MedformerForMultiTask(make_tiny_config(tasks={}))
    assert model.config.id2label == defaults.id2label and model.config.problem_type is None
    model.add_task("pneumonia", **TASKS["pneumonia"])
    assert model.config.id2label == {0: "pneumonia"}
    model.add_task("organ", **TASKS["organ"])
    assert model.config.id2label == defaults.id2label and model.config.problem_type is None
    stale = make_tiny_config(tasks={name: TASKS[name] for name in ("pneumonia", "organ")})
    stale.id2label, stale.problem_type = {0: "pneumonia"}, "multi_label_classification"
    MedformerForMultiTask(stale).save_pretrained(tmp_path)
    saved = MedformerConfig.from_pretrained(tmp_path)
    assert saved.id2label == defaults.id2label and saved.problem_type is None


def test_task_kinds_are_recorded_whole_and_within_the_input_channels():
    with pytest.raises(ValueError, match="give both"):
        make_tiny_config(tasks={"organ": {"type": "binary", "num_labels": 2, "spatial_dims": 3}})
    with pytest.raises(ValueError, match=r"num_channels 3.*input channels"):
        make_tiny_config(tasks={"organ": {"type": "binary", "num_labels": 2, "spatial_dims": 3, "num_channels": 3}})


def test_probabilities_refuse_logits_of_another_task_type():
    binary_logits = torch.tensor([[2.0]])
    with pytest.raises(ValueError, match="pass the task's own type"):
        task_probabilities(binary_logits, "multiclass", num_labels=2)
    torch.testing.assert_close(task_probabilities(binary_logits, "binary", 2).sum(-1), torch.tensor([1.0]))


def test_a_ct_window_on_display_values_is_refused(organ_volume):
    with pytest.raises(ValueError, match="window= maps Hounsfield units, but this is a uint8 image"):
        MedformerImageProcessor()(organ_volume, spatial_dims=3, window="soft_tissue")


def test_the_medical_pipeline_reads_a_picture_path_as_the_picture(tmp_path):
    """A PNG path is read as the picture it is (a grayscale X-ray stays one channel), not handed to the DICOM reader."""
    from PIL import Image
    from transformers import pipeline

    folder = REPO_ROOT / "checkpoints" / "medformer-small-medmnist"
    image = np.load(DATA_DIR / "pneumoniamnist.npz")["test_images"][0]
    Image.fromarray(image).save(tmp_path / "xray.png")
    classify = pipeline("medical-image-classification", model=str(folder), trust_remote_code=True)
    from_path = classify(str(tmp_path / "xray.png"), task="pneumoniamnist")
    assert from_path == classify(image, task="pneumoniamnist")


def test_a_processor_built_from_the_released_config_alone_feeds_the_model_its_training_size():
    """The released weights learned 2D images at 84 px: the config records it, so `from_model_config` (a folder
    without its processor) resizes a 28 px image to 84 as the saved processor does, not leaving it at 28."""
    folder = REPO_ROOT / "checkpoints" / "medformer-small-medmnist"
    config = MedformerConfig.from_pretrained(folder)
    from_config = MedformerImageProcessor.from_model_config(config)
    saved = MedformerImageProcessor.from_pretrained(folder)
    assert (from_config.size_2d, from_config.size_3d) == (saved.size_2d, saved.size_3d) == ([84, 84], [28, 28, 28])
    image = list(np.load(DATA_DIR / "breastmnist.npz")["test_images"][:2])  # two 28 px images
    torch.testing.assert_close(
        from_config(image, spatial_dims=2).pixel_values, saved(image, spatial_dims=2).pixel_values
    )
    assert MedformerImageProcessor.from_model_config(config, size_2d=[28, 28]).size_2d == [28, 28]  # asked for
    with pytest.raises(ValueError, match="image_size_3d must be 3 positive integers"):
        MedformerConfig(image_size_3d=[28, 28])


def test_the_medical_pipeline_answers_every_image_of_an_array_batch_in_order():
    """A `(N, 1, D, H, W)` array is a batch to the processor: one ranked list per volume, each the volume's own."""
    from transformers import pipeline

    folder = REPO_ROOT / "checkpoints" / "medformer-small-medmnist"
    classify = pipeline("medical-image-classification", model=str(folder), trust_remote_code=True)
    volumes = np.load(DATA_DIR / "organmnist3d.npz")["test_images"][:3]
    batched = classify(volumes[:, None], task="organmnist3d", top_k=2)
    assert len(batched) == 3
    for volume, answer in zip(volumes, batched, strict=True):
        alone = classify(volume, spatial_dims=3, task="organmnist3d", top_k=2)
        assert [entry["label"] for entry in answer] == [entry["label"] for entry in alone]
        assert [entry["score"] for entry in answer] == pytest.approx([entry["score"] for entry in alone], abs=1e-5)
    assert batched[0] != batched[1] or batched[1] != batched[2]  # not one image's answer repeated


def test_the_medical_pipeline_reads_inputs_as_the_tasks_2d_images_or_3d_volumes_unasked():
    """A batch of 2D images `(N, 1, H, W)` is a 2D task's batch, and a thin `(3, H, W)` volume is a 3D task's volume,
    not a colour picture: the task's recorded `spatial_dims` settles what the array alone cannot."""
    from transformers import pipeline

    folder = REPO_ROOT / "checkpoints" / "medformer-small-medmnist"
    classify = pipeline("medical-image-classification", model=str(folder), trust_remote_code=True)
    images = np.load(DATA_DIR / "breastmnist.npz")["test_images"][:3]
    batched = classify(images[:, None], task="breastmnist")
    assert batched == [classify(image, task="breastmnist") for image in images]
    thin_volume = np.load(DATA_DIR / "nodulemnist3d.npz")["test_images"][0][12:15]
    assert classify(thin_volume, task="nodulemnist3d") == classify(thin_volume, task="nodulemnist3d", spatial_dims=3)
    with pytest.raises(ValueError, match="trained on 3D images, got a 2D batch"):  # an explicit choice is kept
        classify(thin_volume, task="nodulemnist3d", spatial_dims=2)


def test_a_nifti_ct_reaches_the_released_organ_head_as_its_training_volumes_pointed(tmp_path):
    """OrganMNIST3D's arrays point (left, posterior, superior) along their axes; `load_nifti` reads any file as
    (superior, posterior, left). The medical pipeline turns file volumes to the orientation the task records, so the
    same anatomy stored as LPS or as RAS is classified as its array is (read as it comes, it scored 0.35 ACC against
    0.935 on 200 test volumes: benchmarks/volume_orientation.py)."""
    nibabel = pytest.importorskip("nibabel")
    from transformers import pipeline

    folder = REPO_ROOT / "checkpoints" / "medformer-small-medmnist"
    assert MedformerConfig.from_pretrained(folder).tasks["organmnist3d"]["orientation"] == "LPS"
    classify = pipeline("medical-image-classification", model=str(folder), trust_remote_code=True)
    volumes = np.load(DATA_DIR / "organmnist3d.npz")["test_images"][:4]
    turned_away = 0
    for index, volume in enumerate(volumes):
        expected = classify(volume, task="organmnist3d", top_k=3)
        for name, affine, flips in (("lps", np.diag([-1.0, -1.0, 1.0, 1.0]), ()), ("ras", np.eye(4), (0, 1))):
            path = tmp_path / f"{index}_{name}.nii.gz"
            nibabel.save(nibabel.Nifti1Image(np.flip(volume, flips).astype(np.int16), affine), path)
            found = classify(str(path), task="organmnist3d", rescale_range=[0, 255], top_k=3)
            assert [entry["label"] for entry in found] == [entry["label"] for entry in expected]
            assert [entry["score"] for entry in found] == pytest.approx(
                [entry["score"] for entry in expected], abs=1e-5
            )
            as_read = classify(str(path), task="organmnist3d", rescale_range=[0, 255], top_k=3, orientation="SPL")
            turned_away += as_read != found
    assert turned_away  # the turn is what makes them agree


def test_a_misspelt_medical_pipeline_option_names_the_pipelines_options_too():
    from transformers import pipeline

    folder = REPO_ROOT / "checkpoints" / "medformer-small-medmnist"
    classify = pipeline("medical-image-classification", model=str(folder), trust_remote_code=True)
    image = np.load(DATA_DIR / "breastmnist.npz")["test_images"][0]
    for misspelt, meant in (("topk", "top_k"), ("test_time_flip", "test_time_flips"), ("spatial_dim", "spatial_dims")):
        with pytest.raises(ValueError, match=rf"'{misspelt}' \(did you mean '{meant}'\?\) for the medical pipeline"):
            classify(image, task="breastmnist", **{misspelt: 1})
    for top_k in (0, -1, 1.5):  # 0 once gave every label
        with pytest.raises(ValueError, match="top_k must be a positive number of labels"):
            classify(image, task="breastmnist", top_k=top_k)
    assert len(classify(image, task="breastmnist", top_k=1)) == 1 and len(classify(image, task="breastmnist")) == 2


def test_a_task_orientation_is_a_3d_tasks_and_names_each_axis_once():
    spec = CATALOGUE["organmnist3d"].task_spec()
    assert spec["orientation"] == "LPS" and "orientation" not in CATALOGUE["nodulemnist3d"].task_spec()
    with pytest.raises(ValueError, match="one of each of L/R, A/P and S/I"):
        make_tiny_config(tasks={"organ": {**spec, "orientation": "LRS"}})
    with pytest.raises(ValueError, match="it is for 3D tasks"):
        make_tiny_config(tasks={"breast": {**CATALOGUE["breastmnist"].task_spec(), "orientation": "LPS"}})


@pytest.mark.parametrize(("task", "views"), [("breastmnist", 2), ("nodulemnist3d", 8), ("organmnist3d", 1)])
def test_the_medical_pipeline_averages_over_the_label_safe_flips_the_checkpoint_records(task, views):
    """`test_time_flips=True` gives the mean class probabilities over the task's label-safe flips (none for
    left/right organ labels), as evaluate.py --test_time_flips does, from the config alone (remote code)."""
    from transformers import pipeline

    folder = REPO_ROOT / "checkpoints" / "medformer-small-medmnist"
    classify = pipeline("medical-image-classification", model=str(folder), trust_remote_code=True)
    image = np.load(DATA_DIR / f"{task}.npz")["test_images"][0]
    model, processor = classify.model, classify.image_processor
    spec = model.config.tasks[task]
    pixels = processor(image, spatial_dims=spec["spatial_dims"]).pixel_values
    axes_sets = CATALOGUE[task].augmentation.flip_combinations()
    assert len(axes_sets) == views
    with torch.no_grad():
        logits = [model(pixels.flip([axis + 2 for axis in axes]), task=task).logits for axes in axes_sets]
        expected = sum(task_probabilities(view, spec["type"], spec["num_labels"])[0] for view in logits) / views
    flipped = classify(image, task=task, test_time_flips=True, top_k=None)
    found = {entry["label"]: entry["score"] for entry in flipped}
    assert found == pytest.approx({spec["id2label"][i]: float(p) for i, p in enumerate(expected)}, abs=1e-6)
    if views == 1:
        assert flipped == classify(image, task=task, top_k=None)
    # Set once on the pipeline, the flips are still each call's task's, and a call can turn them off.
    flipping = pipeline(
        "medical-image-classification", model=model, image_processor=processor, test_time_flips=True, top_k=None
    )
    assert flipping(image, task=task) == flipped
    assert flipping(image, task=task, test_time_flips=False) == classify(image, task=task, top_k=None)


def test_test_time_flips_need_flips_recorded_in_the_checkpoint(multi_task):
    from transformers import pipeline

    classify = pipeline(
        "medical-image-classification",
        model=multi_task,
        image_processor=MedformerImageProcessor.from_model_config(multi_task.config),
    )
    with pytest.raises(ValueError, match="leave test_time_flips out"):
        classify(np.zeros((28, 28, 28), np.uint8), task="organ", test_time_flips=True)


def test_picture_paths_are_read_as_displayed_and_multi_page_files_are_refused(multi_task, tmp_path):
    from PIL import Image
    from transformers import pipeline

    classify = pipeline(
        "medical-image-classification",
        model=multi_task,
        image_processor=MedformerImageProcessor.from_model_config(multi_task.config, training_size=28),
    )
    image = np.load(DATA_DIR / "pneumoniamnist.npz")["test_images"][0]
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: shown turned 90 degrees clockwise
    Image.fromarray(image).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    with Image.open(tmp_path / "turned.jpg") as stored:
        shown = np.rot90(np.asarray(stored), k=-1).copy()
    assert classify(str(tmp_path / "turned.jpg"), task="pneumonia") == classify(shown, task="pneumonia")
    pages = [Image.fromarray(image), Image.fromarray(image[::-1].copy())]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(ValueError, match="holds 2 pages"):
        classify(str(tmp_path / "pages.tif"), task="pneumonia")


@pytest.mark.parametrize(("problem_type", "expected"), [(None, torch.sigmoid), ("regression", lambda logits: logits)])
def test_the_medical_pipeline_scores_a_one_logit_classifier_by_sigmoid_and_regression_raw(problem_type, expected):
    """A softmax over one logit is 1.0 for every image: one logit is read by sigmoid (as transformers' own pipeline
    does) and a regression head's values are the answer, not probabilities."""
    from transformers import pipeline

    config = make_tiny_config(tasks={}, id2label={0: "malignancy"}, problem_type=problem_type)
    model = MedformerForImageClassification(config).eval()
    processor = MedformerImageProcessor.from_model_config(config, training_size=28)
    images = list(np.load(DATA_DIR / "breastmnist.npz")["test_images"][:3])
    with torch.no_grad():
        logits = model(**processor(images, spatial_dims=2)).logits[:, 0]
    classify = pipeline("medical-image-classification", model=model, image_processor=processor)
    scores = [answer[0]["score"] for answer in classify(images)]
    assert scores == pytest.approx(expected(logits).tolist(), abs=1e-6)
    assert len(set(scores)) == 3
