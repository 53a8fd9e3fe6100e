"""Zero-shot accuracy of several models side by side, through ``slicelm eval`` (the real lm-eval).

    python benchmarks/zeroshot_models.py --name zeroshot_compression --limit 200 \\
        dense=smollm2-135m slicegpt=runs/compression/models/slicegpt@0.85 mlp=runs/compression/models/mlp@0.85

Each model's result is stored under --work as soon as it is measured (a rerun resumes), then
docs/results/<name>.{json,md} get one row per model: the paper's metric per task with its standard
error, and the average of the seven SliceGPT tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
TASKS = "piqa,winogrande,hellaswag,arc_easy,arc_challenge,openbookqa,boolq"


def parameters(spec: str) -> int | None:
    """True parameter count of a model folder, from its config (meta device), or None for aliases."""
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        return None
    report = folder / "slicelm_report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        if data.get("params_after"):
            return data["params_after"]
    from transformers import AutoConfig

    from slicelm.io.memory import parameter_count

    return parameter_count(AutoConfig.from_pretrained(folder))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="NAME=MODEL (alias, folder or hub id)")
    p.add_argument("--name", required=True, help="results file stem under docs/results/")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-dir", default=os.environ.get("SLICELM_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--work", default=str(REPO / "runs" / "zeroshot"))
    p.add_argument("--note", default="", help="a sentence on how the models were made, for the page")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in args.models:
        name, spec = item.split("=", 1)
        record = work / f"{args.name}-{name}-limit{args.limit}.json"
        if not record.is_file():
            cmd = [sys.executable, "-m", "slicelm", "eval", spec, "--tasks", args.tasks, "--limit", str(args.limit)]
            cmd += ["--batch-size", str(args.batch_size), "--data-dir", args.data_dir, "--device", "cpu"]
            print(f"[zeroshot] {name}: {spec}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(done.stderr[-3000:])
            result = json.loads(done.stdout) | {"wall_seconds": time.perf_counter() - start}
            record.write_text(json.dumps(result, indent=2) + "\n")
        stored = json.loads(record.read_text())
        # A folder removed since its record was written keeps the count the record holds.
        rows.append({"name": name, "model": spec, **stored, "params": parameters(spec) or stored.get("params")})
    write(rows, args)


def write(rows: list[dict], args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")
    tasks = args.tasks.split(",")
    metric = {t: rows[0]["tasks"][t]["metric"] for t in tasks}
    # BoolQ is a yes/no task where small models sit near (or below) the majority class, so a shift in
    # answer bias moves the 7-task average by points: the other tasks' average is shown beside it.
    rest = [t for t in tasks if t != "boolq"] if "boolq" in tasks and len(tasks) > 1 else []
    lines = [
        f"# Zero-shot accuracy ({args.name})",
        "",
        f"Produced by `benchmarks/zeroshot_models.py` through `slicelm eval` (lm-eval, stock prompts, zero-shot), "
        f"first {args.limit} documents of each task, batch {args.batch_size}, offline task data. {args.note}",
        "",
        "| model | parameters | "
        + " | ".join(f"{t} ({metric[t]})" for t in tasks)
        + " | average |"
        + (" without boolq |" if rest else ""),
        "|---|---:|" + "---:|" * (len(tasks) + 1 + bool(rest)),
    ]
    for r in rows:
        cells = []
        for t in tasks:
            v = r["tasks"][t]
            err = v.get(f"{metric[t]}_stderr")
            cells.append(f"{100 * v[metric[t]]:.1f}" + (f" ± {100 * err:.1f}" if err else ""))
        params = f"{r['params'] / 1e6:.1f}M" if r["params"] else ""
        line = f"| {r['name']} | {params} | " + " | ".join(cells) + f" | {100 * r['average']:.1f} |"
        if rest:
            line += f" {100 * sum(r['tasks'][t][metric[t]] for t in rest) / len(rest):.1f} |"
        lines.append(line)
    lines += ["", "Accuracies in %, ± one standard error (lm-eval's)."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
