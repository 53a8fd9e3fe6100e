"""Zero-shot accuracy of SmolLM2-135M, dense and sliced, on the SliceGPT paper's seven tasks.

Writes docs/results/zeroshot_smollm2.{json,md}, zeroshot_smollm2_vs_lm_eval.json and, through
``slicelm sweep``'s machinery,
docs/results/sweep_smollm2/ (per-point results, sweep.md, PNG plots). Every measurement is
stored as soon as it is made, so an interrupted run resumes where it stopped and a finished one
only rewrites the reports.

It also records that ``slicelm eval`` returns exactly lm-eval's numbers on the real model: the
dense model is scored (a) by slicelm's evaluation path and (b) by plain ``lm_eval.simple_evaluate``
on lm-eval's stock task YAMLs pointed at the same files through its own json/arrow loaders
(``slicelm.measure.evaluation.reference``), on the first --compare-limit documents of all eight tasks.

    python benchmarks/zeroshot_smollm2.py --limit 100            # ~45 min on 2 busy CPU cores
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from slicelm.config import SliceConfig
from slicelm.io.data import resolve_data_dir
from slicelm.io.models import load_model
from slicelm.measure.evaluation import PAPER_METRICS, PAPER_TASKS, evaluate_zeroshot, make_lm, run_lm_eval
from slicelm.measure.evaluation.reference import reference_task_manager, write_reference_tasks
from slicelm.measure.sweep import SweepConfig, run_sweep

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"


def log(message: str) -> None:
    print(f"[zeroshot_smollm2] {message}", file=sys.stderr, flush=True)


def compare_with_lm_eval(model_name: str, data_dir: Path, limit: int, batch_size: int, cache: Path) -> dict:
    """slicelm's path vs plain lm-eval on reference YAMLs: every reported number, side by side."""
    settings = {"model": model_name, "limit": limit, "batch_size": batch_size, "data_dir": str(data_dir)}
    if cache.is_file() and (stored := json.loads(cache.read_text())).get("settings") == settings:
        log("comparison: stored")
        return stored
    tasks = [*PAPER_TASKS, "lambada_openai"]
    model, tokenizer = load_model(model_name)
    log(f"comparison: slicelm path, {len(tasks)} tasks, limit {limit}")
    start = time.perf_counter()
    ours = evaluate_zeroshot(model, tokenizer, tasks, limit=limit, batch_size=batch_size, data_dir=data_dir)
    ours_seconds = time.perf_counter() - start
    log("comparison: plain lm_eval.simple_evaluate on stock YAMLs + lm-eval's file loaders")
    with tempfile.TemporaryDirectory() as folder:
        manager = reference_task_manager(write_reference_tasks(folder, data_dir, tasks))
        start = time.perf_counter()
        direct = run_lm_eval(make_lm(model, tokenizer, batch_size=batch_size), tasks, manager, limit=limit)
        direct_seconds = time.perf_counter() - start
    rows = {}
    for task in tasks:
        metric = PAPER_METRICS[task]
        mine = ours["tasks"][task]
        theirs = direct["results"][task]
        rows[task] = {
            "metric": metric,
            "slicelm": mine[metric],
            "lm_eval": theirs[f"{metric},none"],
            "slicelm_stderr": mine[f"{metric}_stderr"],
            "lm_eval_stderr": theirs[f"{metric}_stderr,none"],
            "samples": mine["samples"],
        }
        rows[task]["identical"] = (
            rows[task]["slicelm"] == rows[task]["lm_eval"]
            and rows[task]["slicelm_stderr"] == rows[task]["lm_eval_stderr"]
        )
    result = {
        "settings": settings,
        "tasks": rows,
        "all_identical": all(r["identical"] for r in rows.values()),
        "seconds": {"slicelm": round(ours_seconds, 1), "lm_eval": round(direct_seconds, 1)},
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=2) + "\n")
    return result


def write_report(sweep: dict, comparison: dict, settings: dict, out: Path) -> None:
    report = {"settings": settings, "points": sweep["points"], "comparison_with_lm_eval": comparison}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")

    tasks = list(PAPER_TASKS)
    points = sweep["points"]
    s = settings
    lines = [
        "# SmolLM2-135M zero-shot accuracy, dense and SliceGPT (lm-evaluation-harness)",
        "",
        f"Model `{s['model']}` (SmolLM2-135M-Instruct GGUF, dequantised to float32), zero-shot, "
        f"**`--limit {s['limit']}`**: the first {s['limit']} documents of each task, not the full sets. "
        f"Batch size {s['batch_size']}. Task data: the offline folder (stock lm-eval prompts and metrics, "
        f"see `slicelm.measure.evaluation.tasks`). Slicing: calibration {s['calib']} {s['calib_samples']} x "
        f"{s['calib_seqlen']} tokens, seed {s['seed']}. lm-eval {s['lm_eval']}, torch {s['torch']}, CPU "
        f"({s['threads']} threads, shared). Produced by `python benchmarks/zeroshot_smollm2.py`; plots "
        "and per-point files in [`sweep_smollm2/`](sweep_smollm2/sweep.md).",
        "",
        "Accuracy in %, ± one standard error (lm-eval's; about ±5 points at 100 documents, so only "
        "differences of ~10 points or more are meaningful here).",
        "",
        "| model | parameters | " + " | ".join(f"{t} ({PAPER_METRICS[t]})" for t in tasks) + " | average |",
        "|---|---:|" + "---:|" * (len(tasks) + 1),
    ]
    for p in points:
        name = "dense" if p["sparsity"] == 0 else f"sliced {p['sparsity']:.0%}"
        cells = [f"{100 * p['tasks'][t]['value']:.1f} ± {100 * p['tasks'][t]['stderr']:.1f}" for t in tasks]
        lines.append(f"| {name} | {p['params'] / 1e6:.1f}M | " + " | ".join(cells) + f" | {100 * p['average']:.1f} |")
    lines += [
        "",
        f"## Time per task at `--limit {s['limit']}` (seconds, CPU)",
        "",
        "| model | " + " | ".join(tasks) + " | total |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for p in points:
        name = "dense" if p["sparsity"] == 0 else f"sliced {p['sparsity']:.0%}"
        secs = [p["tasks"][t]["seconds"] for t in tasks]
        lines.append(f"| {name} | " + " | ".join(f"{x:.0f}" for x in secs) + f" | {sum(secs):.0f} |")
    lines += [
        "",
        "Wall-clock of one `evaluate_zeroshot` call per task (building the task included) on CPU cores "
        "shared with other jobs, so individual timings vary by up to ~2x between runs.",
        "",
        "Regenerate: rerun the same command; stored measurements are reused, so a finished run only "
        "rewrites these reports and the plots (plots alone: "
        "`python -m slicelm.measure.plots docs/results/sweep_smollm2/sweep.json`).",
    ]
    c = comparison
    lines += [
        "",
        f"## `slicelm eval` vs plain `lm_eval.simple_evaluate` (dense, first {c['settings']['limit']} docs)",
        "",
        "Plain lm-eval runs its stock task YAMLs with the datasets swapped for its generic json/arrow "
        "loaders over the same local files (`slicelm.measure.evaluation.reference`), on the same loaded model.",
        "",
        "| task | metric | slicelm eval | lm_eval | identical |",
        "|---|---|---:|---:|:---:|",
    ]
    for task, r in c["tasks"].items():
        lines.append(
            f"| {task} | {r['metric']} | {r['slicelm']:.4f} ± {r['slicelm_stderr']:.4f} | "
            f"{r['lm_eval']:.4f} ± {r['lm_eval_stderr']:.4f} | {'yes' if r['identical'] else '**no**'} |"
        )
    lines += ["", f"All identical: **{c['all_identical']}**."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsities", default="0.25")
    p.add_argument("--limit", type=int, default=100, help="documents per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--compare-limit", type=int, default=10, help="documents per task for the lm-eval comparison")
    p.add_argument("--calib", default="c4")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=1024)
    p.add_argument("--ppl-windows", type=int, default=0, help="also WikiText-2 perplexity on N windows (0: skip)")
    p.add_argument("--data-dir", help="offline data folder (else $SLICELM_DATA_DIR, else ../shared/data)")
    p.add_argument("--out", default=str(RESULTS / "zeroshot_smollm2"))
    args = p.parse_args()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    data_dir = resolve_data_dir(args.data_dir) or resolve_data_dir(str(REPO.parent / "shared" / "data"))
    config = SweepConfig(
        model=args.model,
        sparsities=tuple(float(x) for x in args.sparsities.split(",")),
        tasks=tuple(PAPER_TASKS),
        limit=args.limit,
        eval_batch_size=args.batch_size,
        data_dir=str(data_dir.resolve()),
        device="cpu",
        calib=args.calib,
        calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen,
        slicing=SliceConfig(seed=42, batch_size=4),
        ppl_dataset="wikitext2" if args.ppl_windows else None,
        ppl_windows=args.ppl_windows or None,
    )
    import lm_eval

    settings = {
        "model": args.model,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "calib": args.calib,
        "calib_samples": args.calib_samples,
        "calib_seqlen": args.calib_seqlen,
        "seed": 42,
        "data_dir": str(data_dir),
        "lm_eval": lm_eval.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "command": "python benchmarks/zeroshot_smollm2.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out)
    with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints notes to stdout
        comparison = compare_with_lm_eval(
            args.model,
            data_dir,
            args.compare_limit,
            args.batch_size,
            out.parent / "zeroshot_smollm2_vs_lm_eval.json",
        )
        sweep = run_sweep(config, out.parent / "sweep_smollm2", log=log)
    write_report(sweep, comparison, settings, out)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
