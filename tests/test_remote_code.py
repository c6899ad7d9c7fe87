"""A saved folder loads with trust_remote_code in a process where `medformer_hf` cannot be imported."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel

from medformer_hf import (
    MedformerForImageClassification,
    MedformerForMultiTask,
    MedformerForPreTraining,
    MedformerImageProcessor,
    MedformerModel,
)

from .conftest import make_tiny_config

LOADER = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    folder, how, inputs_path, outputs_path = sys.argv[1:]
    inputs = torch.load(inputs_path)
    if how == "processor":
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        assert "transformers_modules" in type(processor).__module__, type(processor).__module__
        features = processor(inputs["image"].numpy(), modality="ct")
        torch.save({"output": features["pixel_values"], "class": type(processor).__name__}, outputs_path)
        raise SystemExit(0)
    if how == "multitask-by-name":
        model_class = get_class_from_dynamic_module("modeling_medformer.MedformerForMultiTask", folder)
        model = model_class.from_pretrained(folder)
    else:
        auto = {"base": AutoModel, "pretraining": AutoModelForPreTraining}.get(how, AutoModelForImageClassification)
        model = auto.from_pretrained(folder, trust_remote_code=True)
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    with torch.no_grad():
        output = model(**inputs)
    key = "last_hidden_state" if how == "base" else "logits"
    torch.save({"output": output[key], "class": type(model).__name__}, outputs_path)
    """
)

CASES = {
    "base": (MedformerModel, {}, "last_hidden_state"),
    "multitask": (MedformerForMultiTask, {"task": "organ"}, "logits"),
    "multitask-by-name": (MedformerForMultiTask, {"task": "retina"}, "logits"),
    "classification": (MedformerForImageClassification, {}, "logits"),
    "pretraining": (MedformerForPreTraining, {"noise": torch.rand(4, 343)}, "logits"),
}


BLOCK_PACKAGE = textwrap.dedent(
    """
    import sys
    sys.modules["medformer_hf"] = None  # any import of our package now raises ImportError
    try:
        import medformer_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("medformer_hf is importable; the test would prove nothing")
    """
)


def run_code_without_the_package(code: str, arguments: list[str], tmp_path) -> str:
    """Run `code` in a fresh Python where `import medformer_hf` fails; return its stdout."""
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["HF_HOME"] = str(tmp_path / "hf_home")
    environment["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_PACKAGE + textwrap.dedent(code), *arguments],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def run_without_the_package(folder, how: str, inputs: dict, tmp_path) -> dict:
    """Run LOADER on a copy of `folder` in a fresh process where `import medformer_hf` fails."""
    elsewhere = shutil.copytree(folder, tmp_path / "copied elsewhere")
    torch.save(inputs, tmp_path / "inputs.pt")
    arguments = [str(elsewhere), how, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")]
    run_code_without_the_package(LOADER, arguments, tmp_path)
    return torch.load(tmp_path / "out.pt")


@pytest.mark.parametrize("how", list(CASES))
def test_saved_folder_loads_without_the_package(how, tmp_path):
    model_class, extra_inputs, key = CASES[how]
    torch.manual_seed(0)
    model = model_class(make_tiny_config()).eval()
    inputs = {"pixel_values": torch.randn(2, 1, 28, 28, 28), **extra_inputs}
    with torch.no_grad():
        expected = model(**inputs)[key]

    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    assert {"config.json", "model.safetensors", "modeling_medformer.py", "configuration_medformer.py"} <= {
        path.name for path in saved.iterdir()
    }
    auto_map = json.loads((saved / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModel", "AutoModelForPreTraining", "AutoModelForImageClassification"} <= set(auto_map)

    loaded = run_without_the_package(saved, how, inputs, tmp_path)
    assert loaded["class"] == model_class.__name__
    assert (loaded["output"] - expected).abs().max().item() <= 1e-6


def test_saved_processor_loads_without_the_package(tmp_path):
    processor = MedformerImageProcessor(window="lung", size_3d=[8, 8, 8])
    processor.save_pretrained(tmp_path / "saved")
    volume = torch.randint(-1024, 2000, (6, 10, 10), dtype=torch.int16)
    loaded = run_without_the_package(tmp_path / "saved", "processor", {"image": volume}, tmp_path)
    assert loaded["class"] == "MedformerImageProcessor"
    assert torch.equal(loaded["output"], processor(volume.numpy(), modality="ct").pixel_values)


def test_installed_package_loads_without_trust_remote_code(tmp_path):
    model = MedformerForPreTraining(make_tiny_config())
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is MedformerModel
    assert torch.equal(base.input_adaptformer.latents, model.medformer.input_adaptformer.latents)


PIPELINES = """
import json, sys
import numpy as np
from PIL import Image
from pydicom.data import get_testdata_file
from transformers import pipeline

single, multi = sys.argv[1:]
results = {}
standard = pipeline("image-classification", model=single, trust_remote_code=True)
results["standard"] = standard(Image.fromarray(np.arange(784, dtype=np.uint8).reshape(28, 28)))
medical = pipeline("medical-image-classification", model=multi, trust_remote_code=True)
results["class"] = [type(medical).__name__, type(medical.model).__name__]
volume = np.random.default_rng(0).random((16, 32, 32)).astype(np.float32)
results["volume"] = medical(volume, modality="ct", body_part="abdomen", task="organ", top_k=3)
results["dicom"] = medical(get_testdata_file("CT_small.dcm"), window="lung", task="pneumonia")
results["single"] = pipeline("medical-image-classification", model=single, trust_remote_code=True)(
    np.zeros((28, 28), np.uint8), modality="ultrasound"
)
print(json.dumps(results))
"""


def test_both_pipelines_give_named_labels_without_the_package(tmp_path):
    torch.manual_seed(0)
    single = make_tiny_config(tasks=None, id2label={0: "malignant", 1: "normal"})
    MedformerForImageClassification(single).save_pretrained(tmp_path / "single")
    MedformerImageProcessor.from_model_config(single).save_pretrained(tmp_path / "single")
    multi = make_tiny_config()
    MedformerForMultiTask(multi).save_pretrained(tmp_path / "multi")
    MedformerImageProcessor.from_model_config(multi).save_pretrained(tmp_path / "multi")
    output = run_code_without_the_package(PIPELINES, [str(tmp_path / "single"), str(tmp_path / "multi")], tmp_path)
    results = json.loads(output.strip().splitlines()[-1])
    assert results["class"] == ["MedicalImageClassificationPipeline", "MedformerForMultiTask"]
    assert {item["label"] for item in results["standard"]} == {"malignant", "normal"}
    assert {item["label"] for item in results["single"]} == {"malignant", "normal"}
    assert len(results["volume"]) == 3 and all(item["label"].startswith("LABEL_") for item in results["volume"])
    assert {item["label"] for item in results["dicom"]} == {"normal", "pneumonia"}
    for name in ("standard", "volume", "dicom", "single"):
        scores = [item["score"] for item in results[name]]
        assert scores == sorted(scores, reverse=True)
    assert sum(item["score"] for item in results["dicom"]) == pytest.approx(1.0, abs=1e-5)
