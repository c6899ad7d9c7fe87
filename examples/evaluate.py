"""Test-split ACC and AUC per dataset of a Medformer checkpoint, with the MedMNIST evaluator's definitions.

    accelerate launch examples/evaluate.py --model outputs/finetune --data_dir ../shared/data/medmnist

A multi-task folder (finetune.py) is scored on each of its MedMNIST tasks; a single-task classifier (the README's
Trainer route) on the MedMNIST set its config records (`config.tasks`). Writes metrics.json, metrics.md (next to
MedMNIST v2's ResNet-18 numbers) and confusion-matrix PNGs to --output_dir, by default into the model folder, each
evaluation to its own place so none overwrites another: the test split into the folder itself and its model card
(README.md, with a `model-index`), `--split validation` into <model>/validation/, `--test_time_flips` (each task's
probabilities averaged over the flips its catalogue entry declares label-safe) into <model>/test_time_flips/, and the
card keeps the single-view numbers a plain forward pass gives. Evaluating some of the model's sets (--datasets) there
updates theirs and keeps the others', if they were measured on the same weights (metrics.json records a hash of
them). Every sample is counted exactly once, also across processes.
"""

import argparse
import json
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from medformer_hf import MedformerConfig, MedformerForImageClassification, MedformerForMultiTask
from medformer_hf.data import CATALOGUE, MedformerCollator, build_multitask_dataset
from medformer_hf.data.medmnist import search_folders
from medformer_hf.hub import (
    EVALUATION_SPLITS,
    evaluation_folder,
    metrics_table,
    weights_fingerprint,
    write_model_card,
)
from medformer_hf.training import (
    HelpFormatter,
    check_data_dir,
    checkpoint_processor,
    evaluate_tasks,
    head_mismatch,
    scorable_tasks,
)
from medformer_hf.visualization import save_confusion_matrix


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument(
        "--model", required=True, help="a multi-task model (finetune.py) or a classifier (Trainer) folder"
    )
    parser.add_argument("--data_dir", help="folder of MedMNIST .npz files")
    parser.add_argument("--datasets", nargs="+", help="default: every task of the model it can score here")
    parser.add_argument("--split", choices=EVALUATION_SPLITS, default="test", help="which split to score")
    parser.add_argument(
        "--size",
        type=int,
        help="MedMNIST file size: 28, 64, 128 or 224 (default: 28; a model whose processor, or config without one, "
        "records one of the larger ones must be told which)",
    )
    parser.add_argument("--batch_size", type=int, default=128, help="images per forward")
    parser.add_argument(
        "--test_time_flips",
        action="store_true",
        help="average over every combination of the task's label-safe flips (catalogue), e.g. 8 views of a nodule",
    )
    parser.add_argument(
        "--output_dir",
        help="default: the model folder for the test split, <model>/validation for that split, both under "
        "<model>/test_time_flips with that flag",
    )
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model} has no config.json; pass a folder written by finetune.py.")
    check_data_dir(parser, args.data_dir)
    config = MedformerConfig.from_pretrained(args.model)
    args.classifier = "MedformerForImageClassification" in (config.architectures or [])
    tasks = list(config.tasks)
    medmnist_tasks = [name for name in tasks if name in CATALOGUE]
    if not medmnist_tasks:
        recorded = (
            f"the classifier's config.tasks records {tasks or 'no task'}, not a MedMNIST set"
            if args.classifier
            else f"the model's tasks {tasks} are not MedMNIST sets"
        )
        parser.error(
            f"{recorded}, which are what evaluate.py scores ({', '.join(CATALOGUE)}); score your "
            "own data with the model and `task_probabilities` (a classifier: `classifier_probabilities`)."
        )
    args.datasets = args.datasets and [name.lower() for name in args.datasets]
    unknown = [name for name in args.datasets or [] if name not in CATALOGUE]
    if unknown:
        parser.error(f"--datasets {unknown} are not MedMNIST sets; the model's MedMNIST tasks are {medmnist_tasks}.")
    if args.size is None:  # 28, unless the model takes one of MedMNIST's larger file sizes: then it must be said
        saved = Path(args.model) / "preprocessor_config.json"
        if saved.is_file():
            processor = json.loads(saved.read_text())
            sizes = [processor.get("size_2d"), processor.get("size_3d")]
        else:  # then the processor its config records feeds it (checkpoint_processor)
            sizes = [config.image_size_2d, config.image_size_3d]
        trained_at = {side for size in sizes for side in size or []}
        file_sizes = {size for name in medmnist_tasks for size in CATALOGUE[name].sizes}
        larger = sorted(trained_at & file_sizes - {28})
        if larger:
            parser.error(
                f"the model takes images of {larger[0]} px (its processor or config), a MedMNIST file size: pass "
                f"--size {larger[0]} to evaluate on those files, or --size 28 for 28 px files resized to it."
            )
        args.size = 28
    if args.datasets is None:  # every task it can score here; --datasets insists (and may download)
        groups = scorable_tasks(config, args.size, args.data_dir)
        args.datasets, unreadable = groups.pop("scored"), groups["whose head MedMNIST's metric cannot read"]
        if unreadable and not args.datasets:
            parser.error(head_mismatch(config, unreadable[0]))
        for reason, names in groups.items():
            if names:
                print(f"skipped tasks {reason}: {', '.join(names)}")
    missing = [name for name in args.datasets if name not in tasks]
    if missing or not args.datasets:
        parser.error(
            f"the model has no head for {missing} (its tasks are {tasks})."
            if missing
            else f"none of the model's tasks {medmnist_tasks} has a {args.size} px MedMNIST file in "
            f"{', '.join(map(str, search_folders(args.data_dir)))}: pass --data_dir <folder of the .npz files> (or set "
            "$MEDMNIST_ROOT), or name the sets in --datasets to download them."
        )
    for name in args.datasets:
        if problem := head_mismatch(config, name):
            parser.error(problem)
    model_folder = Path(args.model).resolve()
    default = evaluation_folder(model_folder, args.split, args.test_time_flips)
    args.output_dir = Path(args.output_dir).resolve() if args.output_dir else default
    for split in EVALUATION_SPLITS:  # the model's own records of other evaluations are not overwritten
        for flips in (False, True):
            if args.output_dir == evaluation_folder(model_folder, split, flips) != default:
                parser.error(
                    f"--output_dir {args.output_dir} holds the model's {split}-split metrics"
                    f"{', averaged over flips' if flips else ''}; leave --output_dir out (then {default}) or pass "
                    "another folder."
                )
    return args


def update_card_with_flips(model: str, split: str, task_names: list[str]) -> None:
    """Re-write the card from the folder's single-view metrics; it then adds the flip-averaged table beside them."""
    recorded = Path(model, "metrics.json")
    single_view = json.loads(recorded.read_text()) if recorded.is_file() else {}
    if single_view.get("split") != split:
        print(f"model card not updated: {recorded} holds no {split} metrics (run evaluate.py without the flips first)")
        return
    metrics = single_view["metrics"]
    write_model_card(model, metrics=metrics, tasks=task_names, split=split)


def recorded_metrics(folder: Path, evaluation: dict[str, Any], task_names: list[str]) -> dict[str, dict[str, float]]:
    """The per-set metrics an earlier evaluation recorded in one of the model's own folders, for sets the model
    still has, if it was the same evaluation (split, views, image size) of the same weights; otherwise none, and the
    record is replaced."""
    path = folder / "metrics.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    if any(record.get(key) != value for key, value in evaluation.items()):
        if record:
            print(f"replacing {path}: it records another evaluation ({ {key: record.get(key) for key in evaluation} })")
        return {}
    return {name: values for name, values in record["metrics"].items() if name in task_names}


def main() -> None:
    args = parse_args()
    accelerator = Accelerator()
    model_class = MedformerForImageClassification if args.classifier else MedformerForMultiTask
    model = accelerator.prepare(model_class.from_pretrained(args.model, dtype="float32"))
    processor = checkpoint_processor(args.model, accelerator.unwrap_model(model).config)
    task_names = list(accelerator.unwrap_model(model).config.tasks)
    with accelerator.main_process_first():
        datasets = {
            name: build_multitask_dataset([name], args.split, size=args.size, data_dir=args.data_dir)
            for name in args.datasets
        }
    collators = {name: MedformerCollator(data, processor, task_names) for name, data in datasets.items()}
    metrics, predictions = evaluate_tasks(
        accelerator, model, datasets, collators, args.batch_size, test_time_flips=args.test_time_flips
    )

    if accelerator.is_main_process:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        model_folder = Path(args.model).resolve()
        evaluation = {
            "split": args.split,
            "test_time_flips": args.test_time_flips,
            "size": args.size,
            "weights": weights_fingerprint(model_folder),
        }
        if args.output_dir == evaluation_folder(model_folder, args.split, args.test_time_flips):
            metrics = {**recorded_metrics(args.output_dir, evaluation, task_names), **metrics}  # keep the other sets
        record = {**evaluation, "metrics": metrics}
        (args.output_dir / "metrics.json").write_text(json.dumps(record, indent=2))
        table = metrics_table(metrics, args.split)
        views = ", mean over the label-safe flips" if args.test_time_flips else ""
        (args.output_dir / "metrics.md").write_text(f"{args.split} split of {args.model}{views}\n\n{table}\n")
        for name, (scores, labels) in predictions.items():
            if CATALOGUE[name].task_type != "multilabel":
                path = args.output_dir / "confusion_matrices" / f"{name}_{args.split}.png"
                title = f"{name} {args.split}{' (flips)' if args.test_time_flips else ''}"
                save_confusion_matrix(labels, scores.argmax(1), list(CATALOGUE[name].labels), path, title)
        if args.output_dir == evaluation_folder(model_folder, "test", test_time_flips=False):
            write_model_card(args.model, metrics=metrics, tasks=task_names, split=args.split)
        elif args.output_dir == evaluation_folder(model_folder, "test", test_time_flips=True):
            update_card_with_flips(args.model, args.split, task_names)
        print(table)
        print(f"metrics, table and confusion matrices in {args.output_dir}")


if __name__ == "__main__":
    main()
