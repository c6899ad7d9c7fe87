"""The accuracy table of BENCHMARKS.md from the runs of run_accuracy.sh, and the single-task budgets those runs use.

    python benchmarks/accuracy_report.py steps <data_dir> <epochs> <alpha>     # "<dataset> <steps>" per local set
    python benchmarks/accuracy_report.py table <output_dir>                   # writes <output_dir>/accuracy.md
    python benchmarks/accuracy_report.py ablation <output_dir>                # writes <output_dir>/ablation.md
    python benchmarks/accuracy_report.py ablation <output_dir> <evaluation>   # the runs' <evaluation>/metrics.json

A single-task run gets the number of batches its set draws, on average, in the multi-task run (p_i ~ n_i^alpha, the
sampler's own formula), so the table compares equal training on every set.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from medformer_hf.data import BEST_PUBLISHED_28, CATALOGUE, RESNET18_BASELINES, TaskBatchSampler, local_datasets

RUNS = {
    "SSL + multi-task": "multitask_ssl",
    "SSL + multi-task, test-time flips": "multitask_ssl/test_time_flips",
    "multi-task, scratch": "multitask_scratch",
}


def single_task_steps(data_dir: Path, epochs: float, alpha: float, batch_size: int = 64) -> dict[str, int]:
    """Expected batches per local set in a multi-task run of `epochs` passes over the pool (as `--num_train_epochs`
    counts them, in the scripts' default dataset order)."""
    names = local_datasets(data_dir)
    sizes = [CATALOGUE[name].split_sizes["train"] for name in names]
    total_steps = math.ceil(epochs * sum(sizes) / batch_size)
    probabilities = TaskBatchSampler(sizes, batch_size=1, alpha=alpha, num_replicas=1, rank=0).probabilities
    return {name: max(1, round(total_steps * p)) for name, p in zip(names, probabilities, strict=True)}


def read_metrics(folder: Path, evaluation: str = "") -> dict[str, dict[str, float]]:
    """A run's test metrics; `evaluation`: the sub-folder of another evaluation of it (e.g. "unknown_metadata")."""
    path = folder / evaluation / "metrics.json"
    return json.loads(path.read_text())["metrics"] if path.is_file() else {}


def table(out: Path) -> str:
    columns = {label: read_metrics(out / folder) for label, folder in RUNS.items()}
    names = sorted(set().union(*columns.values()), key=list(CATALOGUE).index)
    columns["single-task, scratch"] = {
        name: values for name in names for values in read_metrics(out / "single_task" / name).values()
    }
    columns["ResNet-18 (28)"] = RESNET18_BASELINES
    columns["best published (28)"] = BEST_PUBLISHED_28
    header = ["dataset"] + [f"{label} {metric}" for label in columns for metric in ("ACC", "AUC")]
    header += ["SSL + multi-task − ResNet-18 (ACC, AUC)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ours = columns["SSL + multi-task"]
    for label, subset in [*((name, [name]) for name in names), ("mean", names)]:
        cells = []
        for values in columns.values():
            for metric in ("acc", "auc"):
                found = [values[n][metric] for n in subset if n in values]
                cells.append(f"{np.mean(found):.3f}" if len(found) == len(subset) else "–")
        gaps = [np.mean([ours[n][m] - RESNET18_BASELINES[n][m] for n in subset]) for m in ("acc", "auc")]
        cells.append(f"{gaps[0]:+.3f}, {gaps[1]:+.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(out: Path, evaluation: str = "") -> str:
    """One row per variant of run_recipe_ablation.sh (or arm of run_pretext_ablation.sh): test ACC/AUC per set, mean
    ± sample sd over the seeds run (`<out>/<variant>/<set>/seed<n>/metrics.json`; older single-seed runs:
    `<out>/<variant>/<set>/metrics.json`); with `evaluation`, from each run's `<evaluation>/metrics.json`."""
    variants = sorted(
        (path for path in out.iterdir() if path.is_dir()), key=lambda path: (path.name != "default", path.name)
    )
    names = sorted({run.name for variant in variants for run in variant.iterdir()}, key=list(CATALOGUE).index)
    header = ["variant", "seeds"] + [f"{name} {metric}" for name in names for metric in ("ACC", "AUC")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in variants:
        cells, seeds = [], set()
        for name in names:
            runs = sorted((variant / name).glob("seed*")) or [variant / name]  # seed folders, or an older single run
            found = [metrics[name] for metrics in (read_metrics(run, evaluation) for run in runs) if name in metrics]
            seeds.add(len(found))
            for metric in ("acc", "auc"):
                values = [entry[metric] for entry in found]
                spread = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""  # sample sd
                cells.append(f"{np.mean(values):.3f}{spread}" if values else "–")
        lines.append(f"| {variant.name} | {'/'.join(map(str, sorted(seeds)))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLES = {"table": (table, "accuracy.md"), "ablation": (ablation_table, "ablation.md")}


def main() -> None:
    command, *rest = sys.argv[1:]
    if command == "steps":
        for name, steps in single_task_steps(Path(rest[0]), float(rest[1]), float(rest[2])).items():
            print(name, steps)
    elif command in TABLES:
        if rest[1:2] and command != "ablation":
            sys.exit(f"'{command}' takes one folder; another evaluation (e.g. unknown_metadata) is for 'ablation'")
        make_table, filename = TABLES[command]
        text = make_table(Path(rest[0]), *rest[1:2])
        if rest[1:2]:  # another evaluation of the same runs: its own file
            filename = filename.replace(".md", f"_{rest[1]}.md")
        (Path(rest[0]) / filename).write_text(text + "\n")
        print(text)
    else:
        sys.exit(f"unknown command {command!r}: use 'steps <data_dir> <steps>', 'table <dir>' or 'ablation <dir>'")


if __name__ == "__main__":
    main()
