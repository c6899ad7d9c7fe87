"""Take one task of a multi-task Medformer as a single-task `MedformerForImageClassification` folder (same
predictions), for `pipeline("image-classification")`, ONNX export and tools built for one head.

    python examples/extract_task.py --model checkpoints/medformer-small-medmnist --task organmnist3d \
        --output_dir outputs/organ
"""

import argparse
import json
from pathlib import Path

from medformer_hf import MedformerForImageClassification
from medformer_hf.hub import write_model_card
from medformer_hf.training import HelpFormatter, checkpoint_processor, export_model_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="multi-task folder or Hub id")
    parser.add_argument("--task", required=True, help="the task to keep")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace the model in a non-empty folder")
    args = parser.parse_args()
    output_dir, source = Path(args.output_dir), Path(args.model)
    if source.is_dir() and output_dir.resolve() == source.resolve():
        parser.error(f"--output_dir is the multi-task model's own folder {source}: pass another folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not args.overwrite_output_dir:
        parser.error(f"--output_dir {output_dir} is not empty: pass --overwrite_output_dir or another folder.")
    try:
        classifier = MedformerForImageClassification.from_multi_task(args.model, args.task)
    except ValueError as error:
        parser.error(str(error))
    processor = checkpoint_processor(args.model, classifier.config)
    # The classifier gives the same predictions, so the multi-task folder's recorded metrics for the task are its own.
    recorded = source / "metrics.json"
    evaluation = json.loads(recorded.read_text()) if recorded.is_file() else {"metrics": {}}
    metrics = {name: values for name, values in evaluation["metrics"].items() if name == args.task}

    def write(folder: Path) -> None:
        classifier.save_pretrained(folder)
        processor.save_pretrained(folder)
        write_model_card(
            folder,
            metrics=metrics,
            datasets=[args.task],
            base_model=None if source.exists() else args.model,
            tasks=[args.task],
            training=f"The {args.task} task of the multi-task model {args.model}, taken out with "
            f"`examples/extract_task.py`; same predictions. "
            + (f"Its {evaluation.get('split', 'test')} metrics are the multi-task model's." if metrics else ""),
            split=evaluation.get("split", "test"),
        )

    export_model_folder(output_dir, write)
    print(f"saved the {args.task} classifier ({classifier.config.problem_type}) to {output_dir.resolve()}")


if __name__ == "__main__":
    main()
