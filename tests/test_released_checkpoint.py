"""The released weights in checkpoints/: complete, small, and reproducing the test metrics recorded with them."""

import json

import pytest
from accelerate import Accelerator

from medformer_hf import MedformerForMultiTask, MedformerImageProcessor
from medformer_hf.data import CATALOGUE, MedformerCollator, build_multitask_dataset
from medformer_hf.hub import weights_fingerprint
from medformer_hf.training import evaluate_tasks

from .conftest import DATA_DIR, REPO_ROOT

CHECKPOINT = REPO_ROOT / "checkpoints" / "medformer-small-medmnist"


def test_released_checkpoint_is_complete_and_small():
    files = {path.name for path in CHECKPOINT.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "metrics.json"} <= files
    assert {"modeling_medformer.py", "configuration_medformer.py", "image_processing_medformer.py"} <= files
    assert sum(path.stat().st_size for path in CHECKPOINT.rglob("*") if path.is_file()) <= 25 * 2**20
    config = json.loads((CHECKPOINT / "config.json").read_text())
    recorded = json.loads((CHECKPOINT / "metrics.json").read_text())
    assert recorded["split"] == "test"
    for evaluation in ("", "test_time_flips", "validation"):  # evaluate.py keeps these rows for these weights only
        assert json.loads((CHECKPOINT / evaluation / "metrics.json").read_text())["weights"] == weights_fingerprint(
            CHECKPOINT
        )
    assert set(recorded["metrics"]) == set(config["tasks"]) and set(config["tasks"]) <= set(CATALOGUE)
    assert "ResNet-18" in (CHECKPOINT / "README.md").read_text()


@pytest.mark.parametrize(
    ("name", "test_time_flips"), [("breastmnist", False), ("retinamnist", False), ("breastmnist", True)]
)
def test_released_checkpoint_reproduces_its_recorded_test_metrics(name, test_time_flips, tmp_path):
    record = json.loads((CHECKPOINT / ("test_time_flips" if test_time_flips else "") / "metrics.json").read_text())
    assert record["test_time_flips"] == test_time_flips
    recorded = record["metrics"][name]
    model = MedformerForMultiTask.from_pretrained(CHECKPOINT)
    processor = MedformerImageProcessor.from_pretrained(CHECKPOINT)
    dataset = build_multitask_dataset([name], "test", data_dir=DATA_DIR, cache_dir=tmp_path)
    collator = MedformerCollator(dataset, processor, list(model.config.tasks))
    metrics, _ = evaluate_tasks(
        Accelerator(cpu=True), model, {name: dataset}, {name: collator}, batch_size=128, test_time_flips=test_time_flips
    )
    assert metrics[name]["samples"] == recorded["samples"] == CATALOGUE[name].split_sizes["test"]
    assert metrics[name]["acc"] == pytest.approx(recorded["acc"], abs=1e-6)
    assert metrics[name]["auc"] == pytest.approx(recorded["auc"], abs=1e-6)
