"""Average the weights of fine-tunes of one pre-training into one model (a uniform "model soup", Wortsman et al. 2022).

    python examples/average_weights.py --models outputs/seed0 outputs/seed1 --output_dir outputs/soup
    accelerate launch examples/evaluate.py --model outputs/soup --split validation --data_dir ../shared/data/medmnist

Keep the average only if its validation metrics beat each model's (finetune.py's `validation_metrics.json`): models
that did not start from one pre-training, or moved far from it, can average to a worse model than either.
"""

import argparse
from pathlib import Path

import medformer_hf
from medformer_hf import MedformerConfig, MedformerImageProcessor
from medformer_hf.hub import write_model_card
from medformer_hf.training import RECORDED_INPUT_SIZES, HelpFormatter, average_weights, export_model_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="two or more model folders or Hub ids")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace the model in a non-empty folder")
    args = parser.parse_args()
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
    try:
        weights = average_weights(models)
    except ValueError as error:
        parser.error(str(error))
    soup = models[0]
    soup.load_state_dict(weights)
    for key in RECORDED_INPUT_SIZES:  # the sizes any of them records (older configs have none)
        setattr(soup.config, key, next((getattr(m.config, key) for m in models if getattr(m.config, key)), None))

    def write(folder: Path) -> None:
        soup.save_pretrained(folder)
        processor.save_pretrained(folder)
        write_model_card(
            folder,
            tasks=list(soup.config.tasks),
            training=f"The element-wise mean of the weights of {', '.join(args.models)} "
            "(`examples/average_weights.py`).",
        )

    export_model_folder(output_dir, write)
    print(f"saved the average of {len(models)} {architecture} models to {output_dir.resolve()}")


if __name__ == "__main__":
    main()
