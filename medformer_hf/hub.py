"""The Hugging Face Hub side of a checkpoint: its model card (with a parseable `model-index`) and its upload."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import filter_repo_objects
from transformers.utils import logging

from .data.catalogue import BEST_PUBLISHED_28, CATALOGUE, RESNET18_BASELINES

logger = logging.get_logger(__name__)
TEMPLATE = Path(__file__).with_name("model_card_template.md")
# Training leftovers that never go to the Hub.
UPLOAD_IGNORE = [
    "checkpoints/*",
    "runs/*",
    "*.tmp",
    ".*",
    "**/.*",
    "reconstructions/*",
    "confusion_matrices/*",
    "**/confusion_matrices/*",
]
# Where `evaluate.py --test_time_flips` records its metrics, beside the model's single-view ones.
TEST_TIME_FLIPS_FOLDER = "test_time_flips"
# Splits `evaluate.py` evaluates; the test split's single-view metrics are the model folder's own (and its card's).
EVALUATION_SPLITS = ("test", "validation")
# The usage snippets' repo id in a card written without one.
REPO_PLACEHOLDER = "<repo>"
# The temporary folder a model is written into before it replaces the real one (`training.export_model_folder`).
EXPORT_PARTIAL = ".export-partial"


def evaluation_folder(model_folder: str | os.PathLike, split: str, test_time_flips: bool) -> Path:
    """Where `evaluate.py` records a split's metrics inside a model folder, so no evaluation overwrites another's:
    the test split in the folder itself (they fill the model card), flip-averaged ones in `test_time_flips/`, and
    another split in a subfolder named after it (`validation/`, `test_time_flips/validation/`)."""
    folder = Path(model_folder) / TEST_TIME_FLIPS_FOLDER if test_time_flips else Path(model_folder)
    return folder if split == "test" else folder / split


class HubError(RuntimeError):
    """A push that cannot happen (no token, Hub unreachable, refused); the message says what to do."""


def weights_fingerprint(model_folder: str | os.PathLike) -> str:
    """A hash of the folder's weight files (safetensors, or older `.bin` / `.pt`), which `evaluate.py` records beside
    its metrics: an earlier evaluation's figures are kept only for the weights they were measured on."""
    digest = hashlib.sha256()
    files = [path for pattern in ("*.safetensors", "*.bin", "*.pt") for path in Path(model_folder).glob(pattern)]
    for path in sorted(files):
        with path.open("rb") as weights:
            for block in iter(lambda: weights.read(2**20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def metrics_table(metrics: dict[str, dict[str, float]], split: str = "test") -> str:
    """Markdown table of per-dataset ACC/AUC on `split` next to MedMNIST v2's ResNet-18 (28) / ResNet-18 + 3D and the
    best published 28 px result, which are test-split figures (the column names say so)."""
    lines = [
        f"| dataset | {split} ACC | {split} AUC | ResNet-18 test ACC | ResNet-18 test AUC | best published test ACC "
        f"| best published test AUC | {split} samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, values in metrics.items():
        row = [f"{values['acc']:.3f}", f"{values['auc']:.3f}"]
        for reference in (RESNET18_BASELINES, BEST_PUBLISHED_28):
            row += [f"{reference[name][key]:.3f}" if name in reference else "–" for key in ("acc", "auc")]
        lines.append(f"| {name} | {' | '.join(row)} | {values.get('samples', '–')} |")
    return "\n".join(lines)


def write_model_card(
    folder: str | os.PathLike,
    repo_id: str | None = None,
    metrics: dict[str, dict[str, float]] | None = None,
    datasets: list[str] | None = None,
    base_model: str | None = None,
    tasks: list[str] | None = None,
    training: str = "",
    split: str = "test",
) -> ModelCard:
    """Write `README.md` into `folder`: Hub metadata (license, tags, datasets, base model, `model-index` with every
    metric) plus the card body. `ModelCard.load` parses the metrics back as `card.data.eval_results`.

    What a call leaves out (`repo_id`, `datasets`, `base_model`, `training` as None or empty) is kept from the card
    already in the folder, so `evaluate.py` adding metrics keeps what `finetune.py` wrote about the model; without
    one, `datasets` are the MedMNIST sets among `tasks`."""
    folder = Path(folder).resolve()
    card_path = folder / "README.md"
    previous = _previous_card(card_path)
    if previous is not None:
        if repo_id is None and REPO_PLACEHOLDER not in previous.text:  # it was written for a repo
            repo_id = previous.data.model_name
        if datasets is None:
            datasets = [dataset.removeprefix("medmnist/") for dataset in previous.data.datasets or []]
        base_model = base_model or previous.data.base_model
    elif datasets is None:
        datasets = [name for name in tasks or [] if name in CATALOGUE]
    name = repo_id or (folder.parent if folder.name == EXPORT_PARTIAL else folder).name  # the folder it becomes
    saved = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    classifier = "MedformerForImageClassification" in (saved.get("architectures") or [])
    recorded = saved.get("tasks") or {}
    dims = {spec.get("spatial_dims") for spec in recorded.values()}
    dims = dims if tasks and dims and None not in dims else {2, 3}  # unrecorded: it may take either
    training = training or _previous_section(card_path, "Training")
    # The usage snippet names the metadata of the checkpoint's first task that records it: a user who copies it for
    # that task's images gets what the task was trained with, never another modality's.
    described = [task for task in tasks or [] if {"modality", "body_part"} <= set(recorded.get(task) or {})]
    example = recorded[described[0]] if described else {"modality": "ct", "body_part": "chest"}
    metadata_note = (
        f"{described[0]}'s images are {example['modality']}, {example['body_part']}; "
        if described
        else "for example a chest CT; "
    ) + "name your image's own (config.modality_names, config.body_part_names)"
    eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=f"medmnist/{dataset}",
            dataset_name=dataset,
            dataset_split=split,
            metric_type=metric,
            metric_value=round(float(values[metric]), 4),
        )
        for dataset, values in (metrics or {}).items()
        for metric in ("acc", "auc")
    ]
    card_data = ModelCardData(
        model_name=name,
        library_name="transformers",
        pipeline_tag="image-classification",
        license="apache-2.0",
        tags=["medical-imaging", "medmnist"]
        + [f"{d}d" for d in (2, 3) if d in dims]
        + ["self-supervised-learning"]
        + (["multi-task"] if len(tasks or []) > 1 else [])
        + ["custom_code"],
        datasets=[f"medmnist/{dataset}" for dataset in datasets or []] or None,
        base_model=base_model,
        metrics=["accuracy", "roc_auc"] if metrics else None,
        eval_results=eval_results or None,
    )
    evaluation = (
        f"Metrics with the MedMNIST evaluator's definitions ({split} split):\n\n{metrics_table(metrics, split)}"
        + _test_time_flips_section(Path(folder), split)
        if metrics
        else "Not evaluated yet: run `examples/evaluate.py --model <this folder>` to fill this section."
        if tasks
        else "A pre-trained backbone without task heads: fine-tune it first "
        "(`examples/finetune.py --init_from <this folder>`), then evaluate the fine-tuned folder."
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=name,
        repo_id=repo_id or REPO_PLACEHOLDER,
        tasks=", ".join(tasks or []),
        classifier=classifier,
        modality=example["modality"],
        body_part=example["body_part"],
        metadata_note=metadata_note,
        training=training or "See the training configuration saved with the checkpoint.",
        evaluation=evaluation,
    )
    partial = Path(folder) / ".README.md.partial"
    card.save(partial)
    os.replace(partial, Path(folder) / "README.md")  # a kill mid-write keeps the previous card
    return card


def _test_time_flips_section(folder: Path, split: str) -> str:
    """The table `evaluate.py --test_time_flips` recorded beside the model, if it is flip-averaged and of `split`."""
    path = folder / TEST_TIME_FLIPS_FOLDER / "metrics.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record.get("split") != split or not record.get("test_time_flips"):
        return ""
    return (
        "\n\nThe same, with each set's probabilities averaged over the flips that keep its label "
        "(`examples/evaluate.py --test_time_flips`; for one image, the medical pipeline's `test_time_flips=True`; the "
        "metadata above holds the single-view figures):\n\n" + metrics_table(record["metrics"], split)
    )


def _previous_card(card_path: Path) -> ModelCard | None:
    """The card already at `card_path`; None when there is none, or when it does not parse (then it is written anew,
    with a warning, rather than failing after the metrics were recorded)."""
    try:
        return ModelCard.load(card_path, ignore_metadata_errors=True) if card_path.is_file() else None
    except (ValueError, yaml.YAMLError) as error:
        logger.warning(f"{card_path} does not parse ({type(error).__name__}); writing a new card in its place.")
        return None


def _previous_section(card_path: Path, heading: str) -> str:
    """The body of `## heading` in an existing card (so re-writing a card keeps what an earlier step wrote)."""
    if not card_path.is_file():
        return ""
    text = card_path.read_text()
    marker = f"\n## {heading}\n"
    if marker not in text:
        return ""
    return text.split(marker, 1)[1].split("\n## ", 1)[0].strip()


def upload_plan(folder: str | os.PathLike) -> list[str]:
    """The files `push_folder` would upload, relative to `folder` (training leftovers excluded)."""
    folder = Path(folder)
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return list(filter_repo_objects(files, ignore_patterns=UPLOAD_IGNORE))


def push_folder(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Create (if needed) the model repo and upload the checkpoint folder in one commit; returns the commit URL."""
    token = token or get_token()
    if not token:
        raise HubError(
            f"No Hugging Face token to push to {repo_id}: run `hf auth login`, set HF_TOKEN, or pass --hub_token."
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), ignore_patterns=UPLOAD_IGNORE, commit_message="Upload Medformer"
        )
    except Exception as error:  # network, HTTP and auth errors all end the push the same way
        raise HubError(
            f"Could not push {folder} to {repo_id} at {api.endpoint}: {type(error).__name__}: {error}. Check the "
            "network (or HF_ENDPOINT) and that the token may write to that repo; the folder is complete and can be "
            "pushed later with `hf upload`."
        ) from error
    return str(commit.commit_url)


def push_or_exit(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """`push_folder` for scripts: a failed push ends the program with a one-line error instead of a traceback."""
    try:
        return push_folder(folder, repo_id, token, private)
    except HubError as error:
        raise SystemExit(f"error: {error}") from None


def card_metrics(card: ModelCard) -> dict[str, dict[str, Any]]:
    """Per-dataset metrics parsed back from a card's `model-index`."""
    metrics: dict[str, dict[str, Any]] = {}
    for result in card.data.eval_results or []:
        metrics.setdefault(result.dataset_name, {})[result.metric_type] = result.metric_value
    return metrics
