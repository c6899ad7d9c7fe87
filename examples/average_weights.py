"""Average the weights of fine-tunes of one pre-training into one model (a "model soup", Wortsman et al. 2022).

    python examples/average_weights.py --models outputs/seed0 outputs/seed1 --output_dir outputs/soup
    accelerate launch examples/evaluate.py --model outputs/soup --split validation --data_dir ../shared/data/medmnist

The uniform average of every model can be worse than each (models that did not start from one pre-training, or moved
far from it): keep it only if its validation metrics beat each model's. `--greedy --data_dir <folder>` makes that
choice itself: the greedy soup adds the models best first, each only if the mean validation AUC of the average does
not drop (multi-task models; the validation split of every task with a local MedMNIST file).
"""

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

import medformer_hf
from medformer_hf import MedformerConfig, MedformerForMultiTask, MedformerImageProcessor
from medformer_hf.data import MedformerCollator, build_multitask_dataset
from medformer_hf.hub import write_model_card
from medformer_hf.training import (
    RECORDED_INPUT_SIZES,
    HelpFormatter,
    average_weights,
    check_data_dir,
    evaluate_tasks,
    export_model_folder,
    greedy_soup,
    scorable_tasks,
    validation_score,
)


def validation_scorer(
    model: MedformerForMultiTask, processor: MedformerImageProcessor, data_dir: str | None, size: int
) -> Callable[[dict[str, torch.Tensor]], float]:
    """Weights -> mean validation AUC of `model` carrying them, over its tasks with a local MedMNIST file."""
    tasks = scorable_tasks(model.config, size, data_dir)["scored"]
    if not tasks:
        raise SystemExit(
            f"--greedy scores on validation images, but none of the tasks {list(model.config.tasks)} has a {size} px "
            "MedMNIST file in --data_dir: pass the folder of the .npz files (or set $MEDMNIST_ROOT)."
        )
    datasets = {name: build_multitask_dataset([name], "validation", size=size, data_dir=data_dir) for name in tasks}
    collators = {name: MedformerCollator(data, processor, list(model.config.tasks)) for name, data in datasets.items()}
    accelerator = Accelerator(cpu=not torch.cuda.is_available())

    def score(weights: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(weights)
        metrics, _ = evaluate_tasks(accelerator, model.to(accelerator.device), datasets, collators, batch_size=128)
        return validation_score(metrics)[0]  # fine-tuning's selection metric, the mean AUC

    print(f"scoring on the validation split of {', '.join(tasks)}")
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="two or more model folders or Hub ids")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace the model in a non-empty folder")
    parser.add_argument(
        "--greedy",
        action="store_true",
        help="greedy soup: models best first, each kept only if the mean validation AUC does not drop (needs the "
        "validation images: --data_dir)",
    )
    parser.add_argument("--data_dir", help="folder of MedMNIST .npz files (with --greedy)")
    parser.add_argument("--size", type=int, default=28, help="MedMNIST file size of the validation images (--greedy)")
    args = parser.parse_args()
    if not args.greedy and (args.data_dir is not None or args.size != 28):
        parser.error("--data_dir and --size choose the validation images of --greedy; add --greedy, or drop them.")
    check_data_dir(parser, args.data_dir)
    output_dir = Path(args.output_dir)
    if any(Path(model).is_dir() and Path(model).resolve() == output_dir.resolve() for model in args.models):
        parser.error(f"--output_dir {output_dir} is one of --models: pass another folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not args.overwrite_output_dir:
        parser.error(f"--output_dir {output_dir} is not empty: pass --overwrite_output_dir or another folder.")
    architecture = (MedformerConfig.from_pretrained(args.models[0]).architectures or ["MedformerModel"])[0]
    model_class = getattr(medformer_hf, architecture)
    models = [model_class.from_pretrained(model) for model in args.models]
    processor = MedformerImageProcessor.from_pretrained(args.models[0])
    for path in args.models[1:]:  # the average is only meaningful for models fed the same inputs
        if MedformerImageProcessor.from_pretrained(path).to_dict() != processor.to_dict():
            parser.error(f"{path}'s image processor differs from {args.models[0]}'s: its models saw other inputs.")
    if args.greedy and architecture != "MedformerForMultiTask":
        parser.error(f"--greedy scores multi-task models on their tasks; {args.models[0]} is a {architecture}.")
    soup = model_class.from_pretrained(args.models[0]) if args.greedy else models[0]  # greedy: a copy to score with
    try:
        if args.greedy:
            score = validation_scorer(soup, processor, args.data_dir, args.size)
            kept, weights, best = greedy_soup(models, score)
            kept_models = ", ".join(args.models[index] for index in kept)
            how = f"The greedy soup of {', '.join(args.models)}: {kept_models} kept (mean validation AUC {best:.4f})"
            print(how)
        else:
            weights = average_weights(models)
            how = f"The element-wise mean of the weights of {', '.join(args.models)}"
    except ValueError as error:
        parser.error(str(error))
    soup.load_state_dict(weights)
    for key in RECORDED_INPUT_SIZES:  # the sizes any of them records (older configs have none)
        setattr(soup.config, key, next((getattr(m.config, key) for m in models if getattr(m.config, key)), None))

    def write(folder: Path) -> None:
        soup.save_pretrained(folder)
        processor.save_pretrained(folder)
        write_model_card(
            folder,
            tasks=list(soup.config.tasks),
            training=f"{how} (`examples/average_weights.py`).",
        )

    export_model_folder(output_dir, write)
    print(f"saved the model to {output_dir.resolve()}")


if __name__ == "__main__":
    main()
