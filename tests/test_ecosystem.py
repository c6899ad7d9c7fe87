"""Medformer used by habit with the Hugging Face tools: Trainer, PEFT, torch.compile, ONNX, model cards."""

import json

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import Trainer, TrainingArguments

from medformer_hf import MedformerForImageClassification, MedformerForMultiTask, MedformerImageProcessor
from medformer_hf.data import CATALOGUE, load_medmnist
from medformer_hf.hub import card_metrics, write_model_card
from medformer_hf.integrations import LORA_TARGET_MODULES, MedformerDataCollator, medmnist_compute_metrics

from .conftest import DATA_DIR, make_tiny_config


@pytest.fixture(scope="module")
def breast(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return load_medmnist("breastmnist", data_dir=DATA_DIR, cache_dir=cache).with_format("numpy")


def trainer_for(model, dataset, collator, task_type, output_dir) -> Trainer:
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=6,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=1e-3,
        remove_unused_columns=False,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=2,
        seed=0,
    )
    return Trainer(
        model=model,
        args=arguments,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        data_collator=collator,
        compute_metrics=medmnist_compute_metrics(task_type),
    )


def test_ordinal_metrics_read_a_classifier_s_class_logits_and_the_multi_task_cumulative_ones():
    """RetinaMNIST's 5 grades: a classifier gives 5 class logits, the multi-task head 4 cumulative ones; both right
    and confident must score ACC 1 and AUC 1, not be read as 6 classes."""
    from transformers import EvalPrediction

    labels = np.array([0, 1, 2, 3, 4, 2])
    class_logits = 10.0 * np.eye(5)[labels]
    cumulative = np.where(labels[:, None] > np.arange(4), 10.0, -10.0)  # logit k: P(grade > k)
    compute = medmnist_compute_metrics("ordinal", num_labels=5)
    for logits in (class_logits, cumulative):
        assert compute(EvalPrediction(predictions=logits, label_ids=labels)) == {"acc": 1.0, "auc": 1.0}
    with pytest.raises(ValueError, match="has 4 logits, got 3"):
        compute(EvalPrediction(predictions=cumulative[:, :3], label_ids=labels))
    with pytest.raises(ValueError, match="pass num_labels=K"):
        medmnist_compute_metrics("ordinal")


def test_trainer_trains_and_evaluates_image_classification(breast, tmp_path):
    """The README's route: the task recorded in the config gives the labels, and the saved classifier scores a
    grayscale image in transformers' own pipeline (which makes RGB of it, with no metadata) as it was trained."""
    from PIL import Image
    from transformers import pipeline

    info = CATALOGUE["breastmnist"]
    config = make_tiny_config(tasks={"breastmnist": info.task_spec()})
    model = MedformerForImageClassification(config)
    assert model.config.id2label == dict(enumerate(info.labels))
    processor = MedformerImageProcessor.from_model_config(config, training_size=28)
    collator = MedformerDataCollator(processor)
    trainer = trainer_for(model, breast, collator, info.task_type, tmp_path)
    before = model.classifier.projection.weight.detach().clone()
    result = trainer.train()
    assert result.global_step == 6 and np.isfinite(result.training_loss)
    assert not torch.equal(before, model.classifier.projection.weight)
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_auc"] <= 1.0 and 0.0 <= metrics["eval_acc"] <= 1.0
    assert np.isfinite(metrics["eval_loss"])
    assert trainer.label_names == ["labels"]
    model.eval().save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    images = list(np.asarray(breast["test"][:2]["pixel_values"], dtype=np.uint8).reshape(2, 28, 28))
    with torch.no_grad():
        as_trained = model(**processor(images, modality="ultrasound", body_part="breast")).logits.softmax(-1)
    scores = pipeline("image-classification", model=str(tmp_path / "model"))([Image.fromarray(i) for i in images])
    for answer, probabilities in zip(scores, as_trained, strict=True):
        found = {entry["label"]: entry["score"] for entry in answer}
        assert found == pytest.approx({info.labels[k]: float(p) for k, p in enumerate(probabilities)}, abs=1e-5)


def test_trainer_with_the_multitask_model_and_its_binary_logit(breast, tmp_path):
    config = make_tiny_config(tasks={"breastmnist": CATALOGUE["breastmnist"].task_spec()})
    model = MedformerForMultiTask(config)
    collator = MedformerDataCollator(MedformerImageProcessor.from_model_config(config), task="breastmnist")
    trainer = trainer_for(model, breast, collator, "binary", tmp_path)
    trainer.train()
    predictions = trainer.predict(breast["test"])
    assert predictions.predictions.shape == (156, 1)  # only `logits` is collected
    assert set(predictions.metrics) >= {"test_acc", "test_auc", "test_loss"}


def test_the_collator_refuses_rows_of_another_task_than_the_one_it_feeds(breast):
    """`load_medmnist` rows name their set; a collator told `task="pneumoniamnist"` would otherwise send BreastMNIST
    images and labels (same shape, same binary labels) to the PneumoniaMNIST head without a word."""
    specs = {name: CATALOGUE[name].task_spec() for name in ("breastmnist", "pneumoniamnist")}
    processor = MedformerImageProcessor.from_model_config(make_tiny_config(tasks=specs))
    rows = [breast["test"].with_format("numpy")[i] for i in range(4)]
    assert MedformerDataCollator(processor, task="breastmnist")(rows)["task"] == "breastmnist"
    with pytest.raises(ValueError, match=r"task='pneumoniamnist', but rows of this batch are from \['breastmnist'\]"):
        MedformerDataCollator(processor, task="pneumoniamnist")(rows)
    mixed = rows[:2] + [{**row, "task": "pneumoniamnist"} for row in rows[2:]]
    with pytest.raises(ValueError, match=r"are from \['pneumoniamnist'\]"):
        MedformerDataCollator(processor, task="breastmnist")(mixed)
    without_column = [{key: value for key, value in row.items() if key != "task"} for row in rows]
    assert MedformerDataCollator(processor, task="pneumoniamnist")(without_column)["task"] == "pneumoniamnist"


def test_the_collators_label_smoothing_smooths_the_multi_task_models_own_loss(breast):
    """Trainer's label_smoothing_factor would put a softmax over a binary task's one logit; the collator's option
    reaches the model's own (sigmoid) smoothing instead, and is refused for the classifier, which has Trainer's."""
    config = make_tiny_config(tasks={"breastmnist": CATALOGUE["breastmnist"].task_spec()})
    model = MedformerForMultiTask(config).eval()
    processor = MedformerImageProcessor.from_model_config(config)
    rows = [breast["test"].with_format("numpy")[i] for i in range(8)]
    smoothed = MedformerDataCollator(processor, task="breastmnist", label_smoothing=0.2)(rows)
    plain = MedformerDataCollator(processor, task="breastmnist")(rows)
    with torch.no_grad():
        loss = model(**smoothed).loss
        expected = model(**plain, target_smoothing=0.2).loss
        unsmoothed = model(**plain).loss
    torch.testing.assert_close(loss, expected)
    assert not torch.isclose(loss, unsmoothed)
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        MedformerDataCollator(processor, label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        MedformerDataCollator(processor, task="breastmnist", label_smoothing=1.0)


def test_the_collator_reads_each_rows_image_as_given_and_keeps_float_labels(breast):
    """Rows as `datasets` gives them (plain integers, torch, numpy), floats in [0, 1] from a transform, images without
    a channel axis: all reach the model as the same image; 16-bit rows are the processor's to refuse; float
    (regression) labels stay float."""
    config = make_tiny_config()
    collator = MedformerDataCollator(MedformerImageProcessor.from_model_config(config), modality="ultrasound")
    rows = [breast["test"].with_format("numpy")[i] for i in range(3)]
    expected = collator(rows)["pixel_values"]
    as_lists = [breast["test"][i] for i in range(3)]
    as_torch = [breast["test"].with_format("torch")[i] for i in range(3)]
    as_floats = [{**row, "pixel_values": row["pixel_values"].astype(np.float32) / 255} for row in rows]
    no_channel = [{**row, "pixel_values": row["pixel_values"][0]} for row in rows]
    for variant in (as_lists, as_torch, as_floats, no_channel):
        torch.testing.assert_close(collator(variant)["pixel_values"], expected)
    with pytest.raises(ValueError, match="uint16 images have no agreed intensity range"):
        collator([{**row, "pixel_values": row["pixel_values"].astype(np.uint16) * 16} for row in rows])
    with pytest.raises(ValueError, match="outside uint8's 0..255"):
        collator([{**row, "pixel_values": np.asarray(row["pixel_values"], dtype=np.int64) * 16} for row in rows])
    volumes = [{"pixel_values": np.zeros((28, 28, 28), dtype=np.uint8), "label": 0.5}] * 2
    batch = collator(volumes)
    assert batch["pixel_values"].shape == (2, 1, 28, 28, 28)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [0.5, 0.5]
    # MedMNIST's own (N, 1) integer labels stay classes (the model refuses float class labels); several columns are
    # multi-label targets.
    as_column = [{**row, "label": np.asarray([row["label"]])} for row in rows]
    assert collator(as_column)["labels"].dtype == torch.long
    assert collator(as_column)["labels"].flatten().tolist() == [row["label"] for row in rows]
    multilabel = [{**row, "label": np.asarray([1, 0, 1])} for row in rows]
    assert collator(multilabel)["labels"].dtype == torch.float32
    with pytest.raises(ValueError, match="class_encode_column"):
        collator([{**row, "label": "malignant"} for row in rows])


def test_the_collator_reads_integer_columns_by_the_processors_intensity_settings():
    """`datasets` gives uint16 X-rays and int16 CT alike back as int64: with the processor's rescale_range, window or
    per-image normalisation the collator's rows reach the model as the original dtype's would; without, values past
    uint8 are refused, naming those settings."""
    rng = np.random.default_rng(0)
    xray = rng.integers(0, 4096, (2, 28, 28), dtype=np.uint16)
    ct = rng.integers(-1000, 1500, (2, 28, 28, 28), dtype=np.int16)
    for settings, images in (
        ({"rescale_range": [0, 4095]}, xray),
        ({"window": "soft_tissue"}, ct),
        ({"normalization": "image"}, ct),
    ):
        processor = MedformerImageProcessor(**settings)
        expected = processor(list(images), modality="ct")["pixel_values"]
        rows = [{"pixel_values": image.astype(np.int64).tolist()} for image in images]
        collated = MedformerDataCollator(processor, modality="ct")(rows)["pixel_values"]
        torch.testing.assert_close(collated, expected)
    with pytest.raises(ValueError, match="rescale_range=.*window=.*normalization='image'"):
        MedformerDataCollator(MedformerImageProcessor())([{"pixel_values": xray[0].astype(np.int64)}])


def test_lora_trains_only_adapters_and_head_and_merges_exactly(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = make_tiny_config(tasks=None, id2label={0: "a", 1: "b", 2: "c"})
    base = MedformerForImageClassification(config)
    base.save_pretrained(tmp_path / "base")
    frozen = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGET_MODULES, modules_to_save=["classifier"])
    model = peft.get_peft_model(base, lora)

    adapted = [m for n, m in base.named_modules() if n.split(".")[-1] in LORA_TARGET_MODULES and hasattr(m, "lora_A")]
    expected = sum(4 * (m.in_features + m.out_features) for m in adapted)
    expected += sum(p.numel() for p in MedformerForImageClassification(config).classifier.parameters())
    assert len(adapted) == 6 * (config.num_input_layers + config.num_hidden_layers + config.num_output_layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert all("lora_" in name or ".classifier.modules_to_save." in name for name in trainable)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pixels, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 3, (8,))
    for _ in range(5):
        model(pixel_values=pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        adapter_logits = model(pixel_values=pixels).logits
    base_weights = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in model.named_parameters()
    }
    for name, tensor in frozen.items():
        if name in base_weights and not name.startswith("classifier"):
            assert torch.equal(base_weights[name], tensor), name

    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(
        MedformerForImageClassification.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(pixel_values=pixels).logits, adapter_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(pixel_values=pixels).logits, adapter_logits, atol=1e-5, rtol=1e-5)
    assert type(merged) is MedformerForImageClassification


def test_model_card_metrics_parse_back(tmp_path):
    metrics = {"breastmnist": {"acc": 0.8654, "auc": 0.9012, "samples": 156}, "organmnist3d": {"acc": 0.9, "auc": 0.99}}
    write_model_card(tmp_path, repo_id="user/medformer", metrics=metrics, datasets=list(metrics), tasks=list(metrics))
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "apache-2.0" and "medical-imaging" in card.data.tags
    assert card.data.datasets == ["medmnist/breastmnist", "medmnist/organmnist3d"]
    assert card_metrics(card) == {
        name: {"acc": values["acc"], "auc": values["auc"]} for name, values in metrics.items()
    }
    assert (
        "Not for clinical use" in card.text
        and "| breastmnist | 0.865 | 0.901 | 0.863 | 0.901 | 0.865 | 0.919 | 156 |" in card.text
    )


def test_a_card_rewritten_with_metrics_keeps_what_training_wrote(tmp_path):
    """evaluate.py re-writes the card with only metrics and tasks: the repo id (its usage snippets), the base model,
    the training sets and the Training section finetune.py wrote stay."""
    sets = ["breastmnist", "organmnist3d", "vesselmnist3d"]
    metrics = {"breastmnist": {"acc": 0.9, "auc": 0.95}}
    for repo_id in ("alice/medformer-x", "medformer-x"):  # a Hub id without its owner is the user's repo
        write_model_card(
            tmp_path, repo_id=repo_id, datasets=sets, base_model="org/ssl", tasks=sets, training="Fine-tuned."
        )
        card = write_model_card(tmp_path, metrics=metrics, tasks=sets)
        assert card.data.model_name == repo_id and card.data.base_model == "org/ssl"
        assert card.data.datasets == [f"medmnist/{name}" for name in sets]
        assert f'from_pretrained("{repo_id}"' in card.text and "<repo>" not in card.text
        assert "Fine-tuned." in card.text and card_metrics(card) == metrics
    # A folder without a card (model.save_pretrained alone), or with one whose metadata does not parse: the MedMNIST
    # sets among its tasks, the usage snippets without a repo id.
    for previous in (None, "---\nmodel-index: [unclosed\n---\nhand-edited\n"):
        folder = tmp_path / f"plain_{previous is None}"
        folder.mkdir()
        if previous:
            (folder / "README.md").write_text(previous)
        card = write_model_card(folder, metrics=metrics, tasks=["breastmnist", "my_task"])
        assert card.data.datasets == ["medmnist/breastmnist"] and card.data.model_name == folder.name
        assert 'from_pretrained("<repo>"' in card.text and card_metrics(card) == metrics


def test_model_card_usage_names_the_checkpoints_own_metadata(tmp_path):
    """A user copies the card's snippet: for a chest X-ray task it must not pass another modality's metadata, which
    overrides the task's own (the card once named an abdominal CT for every checkpoint)."""
    spec = {"type": "binary", "num_labels": 2, "modality": "xray", "body_part": "chest"}
    (tmp_path / "config.json").write_text(json.dumps({"tasks": {"pneumoniamnist": spec}}))
    card = write_model_card(tmp_path, tasks=["pneumoniamnist"])
    assert 'processor(volume_or_image, modality="xray", body_part="chest")' in card.text
    assert "pneumoniamnist's images are xray, chest" in card.text and "abdomen" not in card.text
    backbone = tmp_path / "backbone"  # no tasks: an example, said to be one
    backbone.mkdir()
    assert "for example a chest CT" in write_model_card(backbone).text


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 1, 16, 16, 16)], ids=["2d", "3d"])
def test_onnx_export_matches_pytorch(tmp_path, shape):
    onnxruntime = pytest.importorskip("onnxruntime")
    from medformer_hf.integrations import export_onnx

    torch.manual_seed(0)
    model = MedformerForImageClassification(make_tiny_config(tasks=None, id2label={0: "a", 1: "b", 2: "c"})).eval()
    path = export_onnx(model, tmp_path / "model.onnx", shape)
    pixels = torch.randn(shape)
    modality, body_part = torch.tensor([2, 5]), torch.tensor([7, 1])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"pixel_values": pixels.numpy(), "modality_ids": modality.numpy(), "body_part_ids": body_part.numpy()}
    (onnx_logits,) = session.run(["logits"], feeds)
    with torch.no_grad():
        expected = model(pixels, modality_ids=modality, body_part_ids=body_part).logits.numpy()
    assert np.abs(onnx_logits - expected).max() <= 1e-4
    with torch.no_grad():  # the ids are real inputs of the graph, not constants baked in
        other = model(pixels).logits.numpy()
    assert np.abs(other - expected).max() > 1e-4


def test_onnx_export_refuses_a_shape_the_task_was_not_trained_on(tmp_path):
    """The exported graph has no data checks (a colour image for a grayscale task would be read as its first channel),
    so the export itself refuses such a shape, before anything is written."""
    pytest.importorskip("onnxruntime")
    from medformer_hf.integrations import export_onnx

    model = MedformerForMultiTask(make_tiny_config(tasks={"xray": CATALOGUE["pneumoniamnist"].task_spec()})).eval()
    for shape, message in [
        ((1, 3, 28, 28), r"has 3 channels; the task takes 1-channel images: pass \(1, 1, "),
        ((1, 1, 28, 28, 28), "2D"),
    ]:
        with pytest.raises(ValueError, match=message):
            export_onnx(model, tmp_path / "model.onnx", shape, task="xray")
    assert not (tmp_path / "model.onnx").exists()


def test_export_script_runs(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("onnxruntime")
    from .conftest import REPO_ROOT

    model = MedformerForImageClassification(make_tiny_config(tasks=None, id2label={0: "a", 1: "b"}))
    model.save_pretrained(tmp_path / "classifier")
    command = [
        sys.executable,
        str(REPO_ROOT / "examples" / "export_onnx.py"),
        "--model",
        str(tmp_path / "classifier"),
        "--input_shape",
        "1",
        "1",
        "28",
        "28",
        "--output",
        str(tmp_path / "model.onnx"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    difference = float(result.stdout.strip().splitlines()[-1].split("= ")[-1])
    assert difference <= 1e-4 and (tmp_path / "model.onnx").is_file()


def test_extract_task_writes_a_carded_classifier_and_never_over_another_model(tmp_path):
    """The extracted folder carries a card with the task's recorded metrics; a non-empty folder needs
    --overwrite_output_dir, and then the other model's card and metrics go (no 7-task metrics beside one head)."""
    import json
    import subprocess
    import sys

    from .conftest import REPO_ROOT

    released = REPO_ROOT / "checkpoints" / "medformer-small-medmnist"
    script = [sys.executable, str(REPO_ROOT / "examples" / "extract_task.py"), "--model", str(released)]
    target = tmp_path / "breast"
    target.mkdir()
    (target / "metrics.json").write_text('{"metrics": {"pneumoniamnist": {"acc": 0.9, "auc": 0.9}}}')
    refused = subprocess.run([*script, "--task", "breastmnist", "--output_dir", str(target)], capture_output=True)
    assert refused.returncode == 2 and b"--overwrite_output_dir" in refused.stderr
    done = subprocess.run(
        [*script, "--task", "breastmnist", "--output_dir", str(target), "--overwrite_output_dir"], capture_output=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (target / "metrics.json").exists()
    recorded = json.loads((released / "metrics.json").read_text())["metrics"]["breastmnist"]
    card = card_metrics(ModelCard.load(target / "README.md"))
    assert card == {"breastmnist": {"acc": round(recorded["acc"], 4), "auc": round(recorded["auc"], 4)}}
    assert MedformerForImageClassification.from_pretrained(target).config.num_labels == 2
    # The card is titled by the folder, and tells how to call a one-task 2D classifier (no task=).
    card = ModelCard.load(target / "README.md")
    assert card.data.model_name == "breast" and "\n# breast\n" in card.text
    assert "task=<name>" not in card.text and 'pipeline("image-classification"' in card.text
    assert "2d" in card.data.tags and not {"3d", "multi-task"} & set(card.data.tags)


def test_average_weights_writes_the_mean_model_and_refuses_other_inputs(tmp_path):
    """Two fine-tunes of one architecture average into a loadable folder with the processor and a card; a model fed
    other inputs (another processor) is refused with the reason, and nothing is written."""
    import subprocess
    import sys

    from .conftest import REPO_ROOT

    tasks = {name: CATALOGUE[name].task_spec() for name in ("pneumoniamnist",)}
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folders.append(tmp_path / f"seed{seed}")
        MedformerForMultiTask(make_tiny_config(tasks=tasks)).save_pretrained(folders[-1])
        MedformerImageProcessor().save_pretrained(folders[-1])
    script = [sys.executable, str(REPO_ROOT / "examples" / "average_weights.py"), "--models", *map(str, folders)]
    done = subprocess.run([*script, "--output_dir", str(tmp_path / "soup")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    soup = MedformerForMultiTask.from_pretrained(tmp_path / "soup")
    first, second = (MedformerForMultiTask.from_pretrained(folder).state_dict() for folder in folders)
    for name, value in soup.state_dict().items():
        torch.testing.assert_close(value, (first[name] + second[name]) / 2)
    saved = MedformerImageProcessor.from_pretrained(folders[0]).to_dict()
    assert MedformerImageProcessor.from_pretrained(tmp_path / "soup").to_dict() == saved
    assert "element-wise mean" in (tmp_path / "soup" / "README.md").read_text()
    # Greedy: scored on the real validation images; the saved weights are those of the models it says it kept.
    greedy = [*script, "--greedy", "--data_dir", str(DATA_DIR), "--output_dir", str(tmp_path / "greedy")]
    done = subprocess.run(greedy, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "scoring on the validation split of pneumoniamnist" in done.stdout
    kept = done.stdout.split(f"{folders[1]}: ")[1].split(" kept (mean validation AUC")[0].split(", ")
    greedy_soup = MedformerForMultiTask.from_pretrained(tmp_path / "greedy").state_dict()
    states = {str(folder): state for folder, state in zip(folders, (first, second), strict=True)}
    for name, value in greedy_soup.items():
        torch.testing.assert_close(value, sum(states[folder][name] for folder in kept) / len(kept))
    assert "greedy soup" in (tmp_path / "greedy" / "README.md").read_text()
    stray = subprocess.run(
        [*script, "--data_dir", str(DATA_DIR), "--output_dir", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert stray.returncode == 2 and "add --greedy" in stray.stderr
    absent = [*script, "--greedy", "--data_dir", str(tmp_path / "absent"), "--output_dir", str(tmp_path / "x")]
    missing = subprocess.run(absent, capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and not (tmp_path / "x").exists()
    MedformerImageProcessor(size_2d=[84, 84]).save_pretrained(folders[1])
    refused = subprocess.run([*script, "--output_dir", str(tmp_path / "refused")], capture_output=True, text=True)
    assert refused.returncode == 2 and "image processor differs" in refused.stderr
    assert not (tmp_path / "refused").exists()


def _graph_breaks(model, **inputs) -> int:
    explanation = torch._dynamo.explain(model)(**inputs)
    return explanation.graph_break_count


def test_torch_compile_has_no_graph_breaks_and_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    tasks = {name: CATALOGUE[name].task_spec() for name in ("organmnist3d", "pneumoniamnist")}
    config = make_tiny_config(tasks=tasks, id2label={0: "a", 1: "b"})
    volumes = torch.randn(2, 1, 16, 16, 16)
    assert _graph_breaks(MedformerForImageClassification(config).eval(), pixel_values=volumes) == 0
    assert _graph_breaks(MedformerForMultiTask(config).eval(), pixel_values=volumes, task="organmnist3d") == 0
    gray_as_rgb = torch.randn(2, 1, 28, 28).expand(-1, 3, -1, -1)  # read as its one channel, with no data check
    assert _graph_breaks(MedformerForMultiTask(config).eval(), pixel_values=gray_as_rgb, task="pneumoniamnist") == 0
    model = MedformerForMultiTask(config).eval()
    compiled = torch.compile(model)
    with torch.no_grad():
        for shape, task in (((2, 1, 16, 16, 16), "organmnist3d"), ((3, 1, 28, 28), "pneumoniamnist")):
            pixels = torch.randn(shape)
            eager = model(pixels, task=task).logits
            torch.testing.assert_close(compiled(pixels, task=task).logits, eager, atol=1e-5, rtol=1e-5)
