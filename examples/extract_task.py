"""Take one task of a multi-task Medformer as a single-task `MedformerForImageClassification` folder (same
predictions), for `pipeline("image-classification")`, ONNX export and tools built for one head.

    python examples/extract_task.py --model checkpoints/medformer-small-medmnist --task organmnist3d \
        --output_dir outputs/organ
"""

import argparse
from pathlib import Path

from medformer_hf import MedformerForImageClassification, MedformerImageProcessor


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", required=True, help="multi-task folder or Hub id")
    parser.add_argument("--task", required=True, help="the task to keep")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    try:
        classifier = MedformerForImageClassification.from_multi_task(args.model, args.task)
    except ValueError as error:
        parser.error(str(error))
    classifier.save_pretrained(args.output_dir)
    MedformerImageProcessor.from_pretrained(args.model).save_pretrained(args.output_dir)
    print(f"saved the {args.task} classifier ({classifier.config.problem_type}) to {Path(args.output_dir).resolve()}")


if __name__ == "__main__":
    main()
