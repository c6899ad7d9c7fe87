"""One of the two gloo processes of `test_info_nce_takes_every_process_rows_as_candidates_when_training` (a fresh
interpreter each: forking a test process whose thread pools are running can hang). Usage: RANK PORT OUTPUT."""

import sys

import torch
import torch.distributed as dist

from medformer_hf.modeling_medformer import info_nce

rank, port, output = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
first, second = torch.randn(6, 8), torch.randn(6, 8)  # the test draws the same rows
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
rows = slice(rank * 3, rank * 3 + 3)
mine_first, mine_second = first[rows].clone().requires_grad_(), second[rows].clone().requires_grad_()
loss = info_nce(mine_first, mine_second, 0.2, across_processes=True)
loss.backward()
try:  # batches of other sizes would give wrong targets (or hang on NCCL): refused on every process
    info_nce(mine_first[rank:], mine_second[rank:], 0.2, across_processes=True)
    refused = ""
except ValueError as error:
    refused = str(error)
torch.save(
    {
        "loss": loss.detach(),
        "first_grad": mine_first.grad / 2,  # / 2: DDP averages over the processes
        "second_grad": mine_second.grad / 2,
        "local": info_nce(mine_first, mine_second, 0.2).detach(),  # a preview, maybe on this process only
        "refused": refused,
    },
    output,
)
dist.destroy_process_group()
