"""Run under accelerate with 2 processes: each writes the batches its TaskBatchSampler yields.

As in a training script, the Accelerator comes first; the sampler then reads the process group from accelerate.
"""

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from medformer_hf.data import TaskBatchSampler

state = Accelerator()
sampler = TaskBatchSampler([50, 300, 120], batch_size=8, alpha=0.5, seed=3, num_batches=40)
batches = list(sampler)
tasks = [int(sum(batch[0] >= offset for offset in sampler.offsets[1:])) for batch in batches]
output = Path(sys.argv[1]) / f"rank{state.process_index}.json"
output.write_text(json.dumps({"world": state.num_processes, "batches": batches, "tasks": tasks}))
