"""The "Growing a checkpoint" table of BENCHMARKS.md from benchmarks/run_grow.sh's folders (test split).

python benchmarks/grow_report.py outputs/grow
"""

import json
import sys
from pathlib import Path

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


def main(out: Path) -> None:
    reference, scratch = load(out / "reference6"), load(out / "scratch")
    lines = [
        f"| route | {NEW} test AUC | {NEW} test ACC | old tasks: largest AUC drop | old tasks: mean AUC change |",
        "|---|---|---|---|---|",
    ]
    for route, label in ROUTES.items():
        metrics = load(out / route)
        changes = {name: metrics[name]["auc"] - values["auc"] for name, values in reference.items()}
        worst = min(changes, key=changes.get)
        lines.append(
            f"| {label} | {metrics[NEW]['auc']:.3f} | {metrics[NEW]['acc']:.3f} | {changes[worst]:+.4f} ({worst}) | "
            f"{sum(changes.values()) / len(changes):+.4f} |"
        )
    lines.append(f"| {NEW} alone from scratch | {scratch[NEW]['auc']:.3f} | {scratch[NEW]['acc']:.3f} | – | – |")
    old = ["", "| old task | reference AUC | " + " | ".join(f"{route} AUC" for route in ROUTES) + " |"]
    old.append("|---|---|" + "---|" * len(ROUTES))
    for name, values in reference.items():
        cells = [f"{load(out / route)[name]['auc']:.4f}" for route in ROUTES]
        old.append(f"| {name} | {values['auc']:.4f} | " + " | ".join(cells) + " |")
    print("\n".join(lines + old))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/grow"))
