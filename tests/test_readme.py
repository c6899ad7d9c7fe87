"""Every Python block of README.md runs as written.

Each block runs on its own (a fresh namespace), from a folder laid out like the repository: `checkpoints/` and
`../shared/data/medmnist` are the real ones; the README's placeholders are real files: `series_folder/` (DICOM
slices), `t1.nii.gz` and `scan.nii.gz` (NIfTI volumes) and `user/medformer` (a local folder where the README means
a Hub id: the released checkpoint, with its remote code).
"""

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from .conftest import DATA_DIR, REPO_ROOT

BLOCKS = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.DOTALL)


def _first_code_line(block: str) -> str:
    return next(line for line in block.splitlines() if line and not line.startswith(("import", "from")))[:40]


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory):
    pydicom = pytest.importorskip("pydicom")
    nibabel = pytest.importorskip("nibabel")
    from pydicom.data import get_testdata_file

    root = tmp_path_factory.mktemp("readme")
    (root / "shared" / "data").mkdir(parents=True)
    (root / "shared" / "data" / "medmnist").symlink_to(DATA_DIR.resolve())
    repo = root / "repo"
    (repo / "user").mkdir(parents=True)
    (repo / "checkpoints").symlink_to(REPO_ROOT / "checkpoints")
    (repo / "user" / "medformer").symlink_to(REPO_ROOT / "checkpoints" / "medformer-small-medmnist")
    (repo / "series_folder").mkdir()
    for index, z in enumerate([0.0, 2.5, 5.0, 7.5]):
        dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        dataset.ImagePositionPatient = [0.0, 0.0, z]
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.save_as(repo / "series_folder" / f"slice_{index}.dcm")
    from nibabel.testing import data_path

    volume = nibabel.load(f"{data_path}/anatomical.nii")
    for name in ("t1.nii.gz", "scan.nii.gz"):
        nibabel.save(volume, repo / name)
    yield repo
    shutil.rmtree(root, ignore_errors=True)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize("block", BLOCKS, ids=[_first_code_line(block) for block in BLOCKS])
def test_readme_block_runs_as_written(block, readme_folder, monkeypatch):
    if "peft" in block:
        pytest.importorskip("peft")
    monkeypatch.chdir(readme_folder)
    exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})


def test_the_readme_single_task_folder_carries_its_processor(readme_folder, monkeypatch):
    """The `from_multi_task` block once saved the model alone: pipelines and AutoImageProcessor could not load the
    folder, and a processor built by hand would feed the model another input size than it was trained at."""
    from transformers import AutoImageProcessor

    block = next(block for block in BLOCKS if '"organ-classifier"' in block)
    monkeypatch.chdir(readme_folder)
    exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})
    loaded = AutoImageProcessor.from_pretrained(readme_folder / "organ-classifier")
    released = AutoImageProcessor.from_pretrained(REPO_ROOT / "checkpoints" / "medformer-small-medmnist")
    assert loaded.to_dict() == released.to_dict()


def test_the_readme_trainer_folder_loads_in_the_image_classification_pipeline(readme_folder, monkeypatch):
    """The Trainer block once saved no processor and no training size: the pipeline could not load its folder, and a
    processor built from its config fed the 28 px model any size without a warning."""
    from transformers import pipeline

    from medformer_hf.data import CATALOGUE

    block = next(block for block in BLOCKS if "Trainer(" in block)
    monkeypatch.chdir(readme_folder)
    exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("transformers asked whether to run the folder's code"))
    classify = pipeline(
        "image-classification", model=str(readme_folder / "outputs" / "trainer"), trust_remote_code=True
    )
    assert type(classify.model).__module__ == "medformer_hf.modeling_medformer"  # the package's, not the folder's
    assert classify.image_processor.size_2d == [28, 28]
    assert classify.model.config.image_size_2d == [28, 28]
    scores = classify(Image.fromarray(np.zeros((224, 224), np.uint8)))
    labels = CATALOGUE["breastmnist"].task_spec()["labels"]
    assert sorted(score["label"] for score in scores) == sorted(labels)
