"""Table (Markdown) and plot (PNG) of test AUC vs label fraction, SSL-initialised (fine-tuned, probed first, or with
the pretext tasks kept running) vs from scratch, mean +- std over seeds, from the metrics.json files that
run_label_efficiency.sh writes.

    python benchmarks/label_efficiency_report.py outputs/label_efficiency [--record runs.json]

With --record, the folder's runs are added to a JSON record of every run's test AUC (a run already there is
replaced) and the tables cover the whole record: a study whose run folders were lost (seeds run in other sessions)
is reported from the record, which is small enough to keep in git. The record keeps the settings of its runs and
refuses a folder made with other settings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# The initialisations run_label_efficiency.sh knows, in table order, with their column names and plot colours.
INIT_NAMES = {
    "ssl": "SSL init",
    "ssl_lpft": "SSL, probe first",
    "ssl_cotrain": "SSL, pretext kept",
    "scratch": "scratch",
}
SSL_INITS = ("ssl", "ssl_lpft", "ssl_cotrain")
COLOURS = {"ssl": (200, 60, 40), "ssl_lpft": (230, 150, 30), "ssl_cotrain": (120, 40, 160), "scratch": (40, 90, 200)}


def run_key(run: dict) -> tuple:
    """What tells two runs apart: a later run with the same key replaces the earlier one in a record."""
    return run["dataset"], run["fraction"], run["seed"], run["init"]


def folder_runs(root: Path) -> list[dict]:
    """One {dataset, fraction, seed, init, auc} per finished run under root."""
    runs = []
    for path in sorted(root.glob("*/fraction_*/seed_*/*/metrics.json")):
        dataset, fraction, seed, init = path.parts[-5], path.parts[-4], path.parts[-3], path.parent.name
        runs.append(
            {
                "dataset": dataset,
                "fraction": float(fraction.split("_")[1]),
                "seed": int(seed.split("_")[1]),
                "init": init,
                "auc": json.loads(path.read_text())["metrics"][dataset]["auc"],
            }
        )
    return runs


def merge_into_record(runs: list[dict], record_path: Path, settings: str | None) -> list[dict]:
    """Add runs to the record (replacing a run with the same dataset, fraction, seed and init), save it, return all."""
    record = json.loads(record_path.read_text()) if record_path.exists() else {"settings": settings, "runs": []}
    if settings is not None and record["settings"] not in (None, settings):
        raise SystemExit(f"{record_path} holds runs made with {record['settings']}, not {settings}: use another file.")
    merged = {run_key(run): run for run in record["runs"] + runs}
    record["settings"] = record["settings"] or settings
    record["runs"] = sorted(merged.values(), key=run_key)
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record["runs"]


def group(runs: list[dict]) -> dict[str, dict[str, dict[float, list[float]]]]:
    """{dataset: {init: {fraction: [test AUC per seed]}}}"""
    unknown = sorted({run["init"] for run in runs} - set(INIT_NAMES))
    if unknown:
        raise SystemExit(f"runs with initialisations {unknown} that the report does not know: {list(INIT_NAMES)}")
    results: dict = {}
    for run in sorted(runs, key=lambda run: (run["dataset"], run["seed"])):
        results.setdefault(run["dataset"], {}).setdefault(run["init"], {}).setdefault(run["fraction"], [])
        results[run["dataset"]][run["init"]][run["fraction"]].append(run["auc"])
    return results


def present(results: dict, candidates: tuple[str, ...]) -> list[str]:
    """The candidate initialisations that have runs, in the candidates' order."""
    return [init for init in candidates if any(init in inits for inits in results.values())]


def table(results: dict) -> str:
    inits_run = present(results, tuple(INIT_NAMES))
    header = " | ".join(f"{INIT_NAMES[init]} AUC" for init in inits_run)
    lines = [f"| dataset | labels | {header} | seeds |", "|---" * (len(inits_run) + 3) + "|"]
    for dataset, inits in results.items():
        for fraction in sorted({fraction for values in inits.values() for fraction in values}):
            values = [inits.get(init, {}).get(fraction, []) for init in inits_run]
            cells = [f"{np.mean(seeds):.3f} ± {np.std(seeds):.3f}" if seeds else "–" for seeds in values]
            counts = [len(seeds) for seeds in values]
            seeds = str(counts[0]) if len(set(counts)) == 1 else "/".join(map(str, counts))  # per column if they differ
            lines.append(f"| {dataset} | {fraction:.0%} | {' | '.join(cells)} | {seeds} |")
    return "\n".join(lines)


def goal_table(results: dict) -> str:
    """The issue's goals, for each SSL initialisation that ran: SSL with 10% of the labels against from scratch with
    all of them per set ("clear" when every SSL seed beats every scratch seed), and the mean SSL - scratch gain at
    each label fraction over the sets both ran."""
    variants = present(results, SSL_INITS)
    lines = []
    for variant in variants:
        name = INIT_NAMES[variant]
        lines += [
            f"| dataset | {name}, 10% labels | scratch, 100% labels | difference | worst seed > scratch's best |",
            "|---|---|---|---|---|",
        ]
        clear = 0
        for dataset, inits in results.items():
            ssl, scratch = inits.get(variant, {}).get(0.1), inits.get("scratch", {}).get(1.0)
            if ssl and scratch:
                gap = float(np.mean(ssl) - np.mean(scratch))
                beats = min(ssl) > max(scratch)
                clear += beats
                row = f"{np.mean(ssl):.3f} | {np.mean(scratch):.3f} | {gap:+.3f} | {'yes' if beats else 'no'}"
                lines.append(f"| {dataset} | {row} |")
        lines += ["", f"Sets where 10% labels + {name} clearly beat 100% labels from scratch: {clear} (goal: 3).", ""]
    lines += [
        "| labels | "
        + " | ".join(f"mean {INIT_NAMES[variant]} − scratch test AUC (sets)" for variant in variants)
        + " |",
        "|---" * (len(variants) + 1) + "|",
    ]
    fractions = sorted(
        {fraction for inits in results.values() for init in variants for fraction in inits.get(init, {})}
    )
    for fraction in fractions:
        cells = []
        for variant in variants:
            gains = [
                float(np.mean(inits[variant][fraction]) - np.mean(inits["scratch"][fraction]))
                for inits in results.values()
                if fraction in inits.get(variant, {}) and fraction in inits.get("scratch", {})
            ]
            cells.append(f"{np.mean(gains):+.3f} ({len(gains)})" if gains else "–")
        lines.append(f"| {fraction:.0%} | {' | '.join(cells)} |")
    return "\n".join(lines)


WIDTH, HEIGHT, MARGIN = 320, 240, 40


def draw_panel(draw: ImageDraw.ImageDraw, dataset: str, inits: dict) -> None:
    """AUC (y, 0.5..1) against label fraction (log x), a line per initialisation, vertical bars = std over seeds."""
    fractions = sorted({fraction for values in inits.values() for fraction in values})
    low = float(np.log10(fractions[0]))

    def xy(fraction: float, auc: float) -> tuple[float, float]:
        x = MARGIN + (np.log10(fraction) - low) / max(-low, 1e-6) * (WIDTH - MARGIN - 20)
        return x, HEIGHT - MARGIN - (auc - 0.5) / 0.5 * (HEIGHT - 2 * MARGIN)

    draw.text((MARGIN, 8), f"{dataset}: test AUC vs labels", fill="black")
    draw.rectangle((MARGIN, MARGIN, WIDTH - 10, HEIGHT - MARGIN), outline="gray")
    for fraction in fractions:
        draw.text((xy(fraction, 0.5)[0] - 10, HEIGHT - MARGIN + 5), f"{fraction:.0%}", fill="black")
    for auc in (0.5, 0.75, 1.0):
        draw.text((5, xy(fractions[0], auc)[1] - 5), f"{auc:.2f}", fill="black")
    for row, init in enumerate(present({dataset: inits}, tuple(INIT_NAMES))):
        values = inits[init]
        points = [xy(fraction, float(np.mean(values[fraction]))) for fraction in sorted(values)]
        draw.line(points, fill=COLOURS[init], width=2)
        for (x, y), fraction in zip(points, sorted(values), strict=True):
            spread = float(np.std(values[fraction])) / 0.5 * (HEIGHT - 2 * MARGIN)
            draw.line([(x, y - spread), (x, y + spread)], fill=COLOURS[init], width=1)
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=COLOURS[init])
        draw.text((MARGIN + 8, MARGIN + 6 + 14 * row), init, fill=COLOURS[init])


def plot(results: dict, path: Path, columns: int = 4) -> None:
    rows = -(-len(results) // columns)
    image = Image.new("RGB", (WIDTH * min(columns, len(results)), HEIGHT * rows), "white")
    for panel, (dataset, inits) in enumerate(results.items()):
        tile = Image.new("RGB", (WIDTH, HEIGHT), "white")
        draw_panel(ImageDraw.Draw(tile), dataset, inits)
        image.paste(tile, (panel % columns * WIDTH, panel // columns * HEIGHT))
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the output folder of run_label_efficiency.sh")
    parser.add_argument("--record", type=Path, help="JSON record of every run to add the folder's runs to and report")
    args = parser.parse_args()
    runs = folder_runs(args.root)
    if args.record is not None:
        settings_file = args.root / "settings"
        settings = settings_file.read_text().strip() if settings_file.exists() else None
        runs = merge_into_record(runs, args.record, settings)
    results = group(runs)
    text = f"{table(results)}\n\n{goal_table(results)}\n"
    (args.root / "label_efficiency.md").write_text(text)
    plot(results, args.root / "label_efficiency.png")
    print(text)


if __name__ == "__main__":
    main()
