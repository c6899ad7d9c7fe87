"""Export a single-task Medformer classifier to ONNX for a fixed input shape, and check it with onnxruntime.

python examples/export_onnx.py --model outputs/classifier --input_shape 1 1 28 28 28 --output model.onnx
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from medformer_hf import MedformerForImageClassification
from medformer_hf.integrations import export_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder of a MedformerForImageClassification")
    parser.add_argument("--input_shape", type=int, nargs="+", required=True, help="B C H W or B C D H W")
    parser.add_argument("--output", default="model.onnx")
    args = parser.parse_args()
    if len(args.input_shape) not in (4, 5):
        parser.error(f"--input_shape needs 4 (2D) or 5 (3D) numbers, got {args.input_shape}.")
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model} has no config.json.")

    import onnxruntime

    model = MedformerForImageClassification.from_pretrained(args.model, dtype="float32").eval()
    path = export_onnx(model, args.output, tuple(args.input_shape))
    batch = args.input_shape[0]
    pixels = torch.randn(*args.input_shape)
    modality = torch.randint(0, len(model.config.modality_names), (batch,))
    body_part = torch.randint(0, len(model.config.body_part_names), (batch,))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"pixel_values": pixels.numpy(), "modality_ids": modality.numpy(), "body_part_ids": body_part.numpy()}
    (onnx_logits,) = session.run(["logits"], feeds)
    with torch.no_grad():
        torch_logits = model(pixels, modality_ids=modality, body_part_ids=body_part).logits.numpy()
    print(f"saved {path}; max |onnxruntime - torch| = {np.abs(onnx_logits - torch_logits).max():.2e}")


if __name__ == "__main__":
    main()
