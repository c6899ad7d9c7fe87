"""The "Growing a checkpoint" table of BENCHMARKS.md from benchmarks/run_grow.sh's folders (test split).

python benchmarks/grow_report.py outputs/grow
"""

import json
import sys
from pathlib import Path

import numpy as np

ROUTES = {
    "frozen": "frozen backbone (`--train new_heads`)",
    "own_output": "frozen backbone, own Output Adaptformer (`--train new_heads_and_output`)",
    "adapters": "frozen backbone, own Output Adaptformer + Main Body adapters (`--train new_heads_and_adapters`)",
    "adapters_input": "the same + Input Adaptformer adapters (`--train new_heads_and_adapters --adapt_input`)",
    "replay": "full fine-tune, old sets replayed",
}
NEW = "breastmnist"


def load(folder: Path) -> dict[str, dict[str, float]]:
    return json.loads((folder / "metrics.json").read_text())["metrics"]


def seed_runs(out: Path, route: str) -> list[dict[str, dict[str, float]]]:
    """The route's finished runs: seed 0 in `<route>`, others in `<route>_seed<N>` (run_grow.sh's SEEDS)."""
    folders = [out / route, *sorted(out.glob(f"{route}_seed*"))]
    return [load(folder) for folder in folders if (folder / "metrics.json").exists()]


def mean_sd(values: list[float]) -> str:
    """Mean, and ± sample standard deviation when there are several seeds."""
    return f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "")


def main(out: Path) -> None:
    reference = load(out / "reference6")
    lines = [
        f"| route | seeds | {NEW} test AUC | {NEW} test ACC | old tasks: largest AUC drop | "
        "old tasks: mean AUC change |",
        "|---|---|---|---|---|---|",
    ]
    routes = {**ROUTES, "scratch": f"{NEW} alone from scratch"}
    # Runs of a route with `--label_smoothing 0.1` added live in `<route>_ls` (and `<route>_ls_seed<N>`).
    routes |= {f"{route}_ls": f"{label}, label smoothing 0.1" for route, label in routes.items()}
    for route, label in routes.items():
        runs = seed_runs(out, route)
        if not runs:
            continue
        new_task = [mean_sd([run[NEW][key] for run in runs]) for key in ("auc", "acc")]
        old_cells = ["–", "–"]
        if not route.startswith("scratch"):  # every seed's change of every old task; the worst and the mean
            changes = {
                (name, i): run[name]["auc"] - values["auc"]
                for name, values in reference.items()
                for i, run in enumerate(runs)
            }
            worst = min(changes, key=changes.get)
            old_cells = [f"{changes[worst]:+.4f} ({worst[0]})", f"{np.mean(list(changes.values())):+.4f}"]
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(new_task + old_cells) + " |")
    old = ["", "| old task | reference AUC | " + " | ".join(f"{route} AUC" for route in ROUTES) + " |"]
    old.append("|---|---|" + "---|" * len(ROUTES))
    for name, values in reference.items():
        cells = [f"{load(out / route)[name]['auc']:.4f}" for route in ROUTES]
        old.append(f"| {name} | {values['auc']:.4f} | " + " | ".join(cells) + " |")
    print("\n".join(lines + old))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/grow"))
