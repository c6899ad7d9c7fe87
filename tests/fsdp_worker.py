"""FSDP2 on CPU (gloo), started by `torch.distributed.run --nproc_per_node 2` from tests/test_distributed.py.

What accelerate's FSDP plugin does on GPUs, done with torch's `fully_shard` directly (accelerate 1.15 runs DDP when
launched with --use_fsdp on CPU): each `MedformerLayer` (`_no_split_modules`) is its own shard unit, then the root.
Checked against one unsharded process training on the same global batches: the weights after training, the full
state dict that `from_pretrained` reads, and a resume (model + optimizer) from a full-state checkpoint.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from medformer_hf import MedformerForMultiTask
from tests.conftest import make_tiny_config

# Gathering: whole tensors on process 0 (the others get empty dicts). Loading: process 0's copy is broadcast.
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
LOAD = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
# Parameters a run never used (the other dimensionality's patch embedding) have no optimizer state to restore.
LOAD_OPTIMIZER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module)
    return fully_shard(model)


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.rand(4, 1, 16, 16, 16, generator=generator), torch.randint(0, 11, (4,), generator=generator))
        for _ in range(steps)
    ]


def train(model, optimizer, data, rank: int | None) -> None:
    for pixels, labels in data:
        if rank is not None:  # each process its half of the global batch
            pixels, labels = pixels[2 * rank : 2 * rank + 2], labels[2 * rank : 2 * rank + 2]
        model(pixels, task="organ", labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def new_model(sharded: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The same initial weights every time; sharded before the optimizer sees its parameters."""
    torch.manual_seed(0)
    model = MedformerForMultiTask(make_tiny_config())
    model = shard(model) if sharded else model
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # state to resume, no Adam noise


def main() -> None:
    folder = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = batches(5)
    result = {}

    sharded, optimizer = new_model(sharded=True)
    result["sharded_parameters"] = sum(type(p).__name__ == "DTensor" for p in sharded.parameters())
    train(sharded, optimizer, data[:3], rank)
    weights = get_model_state_dict(sharded, options=FULL)  # collective
    optimizer_state = get_optimizer_state_dict(sharded, optimizer, options=FULL)
    if rank == 0:
        saved = MedformerForMultiTask(make_tiny_config())
        saved.save_pretrained(folder, state_dict=dict(weights))  # save_pretrained empties the dict it is given
    train(sharded, optimizer, data[3:], rank)
    finished = get_model_state_dict(sharded, options=FULL)

    resumed, resumed_optimizer = new_model(sharded=True)  # a new run, then the checkpoint
    set_model_state_dict(resumed, weights, options=LOAD)
    set_optimizer_state_dict(resumed, resumed_optimizer, optimizer_state, options=LOAD_OPTIMIZER)
    train(resumed, resumed_optimizer, data[3:], rank)
    resumed_weights = get_model_state_dict(resumed, options=FULL)

    if rank == 0:
        reference, reference_optimizer = new_model(sharded=False)
        train(reference, reference_optimizer, data[:3], None)
        loaded = MedformerForMultiTask.from_pretrained(folder).eval()
        with torch.no_grad():
            probe = data[0][0]
            result["saved_vs_reference"] = (
                (loaded(probe, task="organ").logits - reference.eval()(probe, task="organ").logits).abs().max().item()
            )
        reference.train()
        train(reference, reference_optimizer, data[3:], None)
        expected = reference.state_dict()
        result["finished_vs_reference"] = max((finished[k] - expected[k]).abs().max().item() for k in expected)
        result["resumed_vs_finished"] = max((resumed_weights[k] - finished[k]).abs().max().item() for k in finished)
        print("RESULT " + json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
