"""Export a trained Medformer classifier, or one task of a multi-task model, to ONNX for a fixed input shape, and
check it against PyTorch with onnxruntime.

    python examples/export_onnx.py --model outputs/finetune --task organmnist3d \
        --input_shape 1 1 28 28 28 --output model.onnx
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from medformer_hf import MedformerForImageClassification, MedformerForMultiTask
from medformer_hf.integrations import export_onnx
from medformer_hf.training import HelpFormatter

CLASSIFIERS = {
    "MedformerForMultiTask": MedformerForMultiTask,
    "MedformerForImageClassification": MedformerForImageClassification,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="folder of a trained classifier or multi-task model")
    parser.add_argument("--task", help="the task to export from a multi-task model (its raw logits)")
    parser.add_argument("--input_shape", type=int, nargs="+", required=True, help="B C H W or B C D H W")
    parser.add_argument("--output", default="model.onnx", help="ONNX file to write")
    args = parser.parse_args()
    if len(args.input_shape) not in (4, 5):
        parser.error(f"--input_shape needs 4 (2D) or 5 (3D) numbers, got {args.input_shape}.")
    config_file = Path(args.model) / "config.json"
    if not config_file.is_file():
        parser.error(f"--model {args.model} has no config.json.")
    saved_as = (json.loads(config_file.read_text()).get("architectures") or ["?"])[0]
    if saved_as not in CLASSIFIERS:
        parser.error(f"--model {args.model} holds a {saved_as}, which has no trained head: fine-tune it first.")

    import onnxruntime

    model, loading = CLASSIFIERS[saved_as].from_pretrained(args.model, dtype="float32", output_loading_info=True)
    if loading["missing_keys"]:  # never export a head that was initialised at random
        parser.error(f"--model {args.model} lacks trained weights for {sorted(loading['missing_keys'])[:3]} ...")
    try:
        path = export_onnx(model, args.output, tuple(args.input_shape), task=args.task)
    except ValueError as error:
        parser.error(str(error))
    task = {} if args.task is None else {"task": args.task}
    batch = args.input_shape[0]
    pixels = torch.randn(*args.input_shape)
    modality = torch.randint(-1, len(model.config.modality_names), (batch,))  # -1: not given
    body_part = torch.randint(-1, len(model.config.body_part_names), (batch,))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"pixel_values": pixels.numpy(), "modality_ids": modality.numpy(), "body_part_ids": body_part.numpy()}
    (onnx_logits,) = session.run(["logits"], feeds)
    with torch.no_grad():
        torch_logits = model(pixels, modality_ids=modality, body_part_ids=body_part, **task).logits.numpy()
    print(f"saved {path}; max |onnxruntime - torch| = {np.abs(onnx_logits - torch_logits).max():.2e}")


if __name__ == "__main__":
    main()
