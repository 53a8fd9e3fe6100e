"""PNG plots of a sparsity sweep (``sweep.json``): each metric against sparsity and parameter count.

    python -m slicelm.measure.plots OUT_DIR/sweep.json     # redraw every plot next to the JSON file

Each figure has two panels sharing the y axis: the metric against the sparsity (%), and against the
number of parameters. Sliced models are a line with markers (and ± one standard error bars for
accuracies); the dense model is a dashed horizontal reference line and a star.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TASK_TITLES = {
    "piqa": "PIQA",
    "winogrande": "WinoGrande",
    "hellaswag": "HellaSwag",
    "arc_easy": "ARC-Easy",
    "arc_challenge": "ARC-Challenge",
    "openbookqa": "OpenBookQA",
    "boolq": "BoolQ",
    "lambada_openai": "LAMBADA (OpenAI)",
}
PPL_TITLES = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4"}


def _metrics(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each plottable metric: name (file stem), y label, values per point, stderr per point."""
    s = summary["settings"]
    points = summary["points"]
    out = []
    if s.get("ppl_dataset"):
        title = PPL_TITLES.get(s["ppl_dataset"], s["ppl_dataset"])
        out.append(
            {
                "name": "ppl",
                "label": f"{title} ppl",
                "title": f"{title} perplexity",
                "ylabel": f"{title} test perplexity (lower is better)",
                "values": [p["ppl"] for p in points],
                "stderr": None,
                "recovered": [(p.get("recovered") or {}).get("ppl") for p in points],
            }
        )
    for task in s["tasks"]:
        metric = points[0]["tasks"][task]["metric"]
        title = TASK_TITLES.get(task, task)
        out.append(
            {
                "name": task,
                "label": title,
                "title": f"{title} zero-shot {metric}",
                "ylabel": f"{title} {metric} (%)",
                "values": [100 * p["tasks"][task]["value"] for p in points],
                "stderr": [100 * (p["tasks"][task]["stderr"] or 0.0) for p in points],
                "recovered": [_recovered_task(p, task) for p in points],
            }
        )
    if s["tasks"]:
        out.append(
            {
                "name": "average",
                "label": "average",
                "title": f"Average over {len(s['tasks'])} zero-shot tasks",
                "ylabel": "average accuracy (%)",
                "values": [100 * p["average"] for p in points],
                "stderr": None,
                "recovered": [100 * p["recovered"]["average"] if p.get("recovered") else None for p in points],
            }
        )
    return out


def _recovered_task(point: dict[str, Any], task: str) -> float | None:
    recovered = point.get("recovered")
    return 100 * recovered["tasks"][task]["value"] if recovered else None


def _param_scale(points: list[dict[str, Any]]) -> tuple[float, str]:
    largest = max(p["params"] for p in points)
    return (1e9, "billions") if largest >= 1e9 else (1e6, "millions")


def plot_sweep(summary: dict[str, Any], out: str | Path) -> list[Path]:
    """Write ``sweep_<metric>.png`` for every metric (+ ``sweep_overview.png``); returns the paths."""
    import matplotlib  # optional dependency (the eval extra), slow to import: imported when plotting

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt  # after use("Agg"): pyplot picks its backend when imported

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = summary["points"]
    dense, sliced = points[0], points[1:]
    scale, unit = _param_scale(points)
    model = summary["settings"]["model"]
    limit = summary["settings"].get("limit")
    note = f" (first {limit} docs per task)" if limit and summary["settings"]["tasks"] else ""
    written = []
    for metric in _metrics(summary):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True, constrained_layout=True)
        xs_sets = (
            ([100 * p["sparsity"] for p in sliced], 0.0, "sparsity (% of hidden width removed)"),
            (
                [p["params"] / scale for p in sliced],
                dense["params"] / scale,
                f"parameters ({unit}; axis reversed: fewer to the right)",
            ),
        )
        for ax, (xs, dense_x, xlabel) in zip(axes, xs_sets, strict=True):
            ys = metric["values"][1:]
            errs = metric["stderr"][1:] if metric["stderr"] else None
            if xs:
                ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, color="tab:blue", label="sliced")
            recovered = [(x, y) for x, y in zip(xs, metric["recovered"][1:], strict=True) if y is not None]
            if recovered:
                ax.plot(*zip(*recovered, strict=True), marker="s", color="tab:green", label="sliced + recovery")
            dense_value = metric["values"][0]
            dense_label = f"dense model ({dense_value:.{1 if metric['stderr'] else 2}f})"
            ax.axhline(dense_value, color="tab:gray", linestyle="--", linewidth=1, label=dense_label)
            ax.errorbar(
                [dense_x],
                [metric["values"][0]],
                yerr=[metric["stderr"][0]] if metric["stderr"] else None,
                marker="*",
                markersize=12,
                capsize=3,
                color="tab:gray",
                linestyle="none",
            )
            ax.set_xlabel(xlabel)
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel(metric["ylabel"])
        axes[1].invert_xaxis()  # fewer parameters to the right, like higher sparsity on the left panel
        axes[0].legend(loc="best")
        fig.suptitle(f"{model}: {metric['title']}{note if metric['name'] != 'ppl' else ''}")
        path = out / f"sweep_{metric['name']}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    accuracies = [m for m in _metrics(summary) if m["name"] not in ("ppl",)]
    if accuracies:
        fig, ax = plt.subplots(figsize=(8.5, 4.5), constrained_layout=True)
        xs = [100 * p["sparsity"] for p in points]
        for m in accuracies:
            style = {"linewidth": 2.5, "color": "black"} if m["name"] == "average" else {"linewidth": 1}
            ax.plot(xs, m["values"], marker="o", label=m["label"], **style)
        ax.set_xlabel("sparsity (% of hidden width removed; 0 = dense model)")
        ax.set_ylabel("zero-shot accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.set_title(f"{model}: zero-shot accuracy against sparsity{note}")
        path = out / "sweep_overview.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m slicelm.measure.plots OUT_DIR/sweep.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    for written in plot_sweep(json.loads(path.read_text()), path.parent):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
