import json

import pytest
from transformers import AutoConfig

from medformer_hf import MedformerConfig, MedformerForMultiTask
from medformer_hf.configuration_medformer import AUTO_MAP

from .conftest import TASKS, make_tiny_config


def test_round_trip_keeps_tasks_and_vocabularies(tmp_path):
    config = make_tiny_config()
    config.save_pretrained(tmp_path)
    loaded = MedformerConfig.from_pretrained(tmp_path)
    assert loaded.tasks == config.tasks
    assert loaded.tasks["pneumonia"]["id2label"] == {0: "normal", 1: "pneumonia"}
    assert loaded.modality_names == config.modality_names
    assert loaded.auto_map == AUTO_MAP


def test_task_defaults_are_filled():
    task = make_tiny_config().tasks["age"]
    assert task == {
        "type": "regression",
        "num_labels": 2,
        "id2label": {0: "LABEL_0", 1: "LABEL_1"},
        "modality": "unknown",
        "body_part": "unknown",
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 30}, "hidden_size"),
        ({"num_latents": 0}, "num_latents"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_unit": 0}, "mask_unit"),
        ({"hidden_dropout_prob": -0.1}, "hidden_dropout_prob"),
        ({"patch_size_3d": 2.5}, "patch_size_3d"),
        ({"input_channels_2d": [1, 1]}, "input_channels_2d"),
        ({"image_size_2d": 28}, "image_size_2d must be 2 positive integers"),
        ({"image_size_3d": [28, 28]}, "image_size_3d"),
        ({"hidden_act": "gelu_fast2"}, "hidden_act must be one of .*'gelu_fast'"),
        ({"modality_names": ["ct", "unknown"]}, "modality_names"),
        ({"ssl_tasks": ["jigsaw"]}, "ssl_tasks"),
        ({"ssl_tasks": ["view_agreement"]}, "must include 'masked_reconstruction'"),
        ({"tasks": {"a.b": {"type": "binary", "num_labels": 2}}}, "without '.'"),
        ({"tasks": {"x": {"type": "segmentation", "num_labels": 2}}}, "segmentation"),
        ({"tasks": {"x": {"type": "binary", "num_labels": 3}}}, "num_labels=2"),
        ({"tasks": {"x": {"type": "multiclass", "num_labels": 3, "modality": "sonar"}}}, "sonar"),
        # A mapping's keys in insertion order, or a string's characters, would become the class names.
        ({"tasks": {"x": {"type": "binary", "labels": {"dog": 1, "cat": 0}}}}, "labels must be a list .* id2label"),
        ({"tasks": {"x": {"type": "binary", "labels": "ab"}}}, "labels must be a list"),
    ],
)
def test_bad_values_raise_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_tiny_config(**overrides)


def test_add_task_validates_and_refuses_duplicates():
    config = make_tiny_config()
    config.add_task("derma", type="multiclass", num_labels=7, modality="dermatoscopy", body_part="skin")
    assert config.task_output_size("derma") == 7
    assert config.task_output_size("pneumonia") == 1
    assert config.task_output_size("retina") == 4
    with pytest.raises(ValueError, match="already exists"):
        config.add_task("derma", type="binary", num_labels=2)
    assert set(TASKS) < set(config.tasks)


def test_tasks_set_after_construction_are_checked_like_those_given_to_it(tmp_path):
    """`from_pretrained(path, tasks=...)` (transformers sets the field on the loaded config) and `config.tasks = ...`
    go through the same checks and canonical form as `MedformerConfig(tasks=...)`."""
    from medformer_hf import MedformerForImageClassification, MedformerModel

    MedformerModel(make_tiny_config(tasks=None)).save_pretrained(tmp_path)
    spec = {"type": "multiclass", "labels": ["a", "b", "c"], "modality": "xray", "body_part": "chest"}
    model = MedformerForImageClassification.from_pretrained(tmp_path, tasks={"cxr": spec})
    assert model.config.tasks["cxr"]["id2label"] == {0: "a", 1: "b", 2: "c"}
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"} and model.classifier.projection.out_features == 3
    with pytest.raises(ValueError, match="labels must be a list"):
        MedformerForImageClassification.from_pretrained(tmp_path, tasks={"cxr": {**spec, "labels": {"a": 0}}})
    config = make_tiny_config()
    with pytest.raises(ValueError, match="sonar"):
        config.tasks = {"x": {"type": "binary", "num_labels": 2, "modality": "sonar"}}
    config.tasks = {"x": {"type": "binary", "num_labels": 2}}
    assert config.tasks["x"]["id2label"] == {0: "LABEL_0", 1: "LABEL_1"}


def test_a_near_miss_of_an_option_is_refused_not_kept_as_an_attribute(tmp_path):
    """PretrainedConfig keeps any keyword: `hidden_dim=64` would build a default-width model without a word. A saved
    config (which may hold fields of older versions) still loads, and transformers' own keywords still pass."""
    for misspelt, meant in (
        ("hidden_dim", "hidden_size"),
        ("mask_ration", "mask_ratio"),
        ("drop_path", "drop_path_rate"),
    ):
        with pytest.raises(ValueError, match=f"no option '{misspelt}'; did you mean '{meant}'"):
            MedformerConfig(**{misspelt: 1})
    config = MedformerConfig(num_labels=3, problem_type="single_label_classification", output_hidden_states=True)
    assert config.num_labels == 3 and config.output_hidden_states
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "mask_units": 2}))  # a field some older version wrote
    assert MedformerConfig.from_pretrained(tmp_path).hidden_size == config.hidden_size
    # An override at loading that transformers would drop is refused too; a real one applies.
    with pytest.raises(ValueError, match="no option 'hidden_dim'; did you mean 'hidden_size'"):
        AutoConfig.from_pretrained(tmp_path, hidden_dim=64)
    assert MedformerConfig.from_pretrained(tmp_path, hidden_size=64).hidden_size == 64
    with pytest.raises(ValueError, match="no option 'num_latent'; did you mean 'num_latents'"):
        MedformerForMultiTask.from_pretrained(tmp_path, num_latent=8)  # transformers: "unexpected keyword argument"
    # transformers reads a folder without config.json as an empty config: the default model's would come back.
    (tmp_path / "runs").mkdir()
    with pytest.raises(OSError, match="has no config.json"):
        MedformerConfig.from_pretrained(tmp_path / "runs")
