"""Recovery fine-tuning on SmolLM2-135M: next-token loss against distillation, LoRA against full.

Everything goes through the real command line: ``slicelm slice`` makes each base (the default tied
SliceGPT layout at 25% and 30%, or any folder given with --base NAME=PATH), ``slicelm finetune``
recovers it with one token budget for every run, and ``slicelm ppl`` measures WikiText-2 test
perplexity (first 16 windows of 2048). Each run is stored under --work as it finishes (the
benchmark resumes); the dense teacher is the source recorded in the sliced folder.

Writes docs/results/recovery_smollm2.{json,md} and _curve.png (--name renames them): before/after
perplexity per run, the held-out (C4) loss curve, time, and a perplexity-vs-tokens curve for the
run given by --curve.

    python benchmarks/recovery_smollm2.py --tokens 131072
    python benchmarks/recovery_smollm2.py --runs 25:kd:lora --curve 25:kd:lora --monitor-ppl 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from slicelm.recover.teacher import recorded_source

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
DEFAULT_RUNS = "25:lm:lora,25:kd:lora,25:lm:full,25:kd:full,30:lm:lora,30:kd:lora,30:lm:full,30:kd:full"


def sh(cmd: list) -> subprocess.CompletedProcess:
    print("[recovery] " + " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"command failed: {cmd}")
    return done


def slicelm(*args) -> list:
    return [sys.executable, "-m", "slicelm", *args]


def ppl(folder: Path, args: argparse.Namespace, windows: int | None = None) -> dict:
    cmd = slicelm("ppl", folder, "--data-dir", args.data_dir, "--quiet")
    if windows is not None:
        cmd += ["--max-windows", windows]
    return json.loads(sh(cmd).stdout.strip().splitlines()[-1])


def base_folder(name: str, args: argparse.Namespace, work: Path) -> Path:
    """A sliced base model: '25'/'30' are SliceGPT sparsities in the default (tied) layout."""
    given = dict(item.split("=", 1) for item in args.base if "=" in item)
    if name in given:
        return Path(given[name])
    out = work / f"base-{name}"
    if not (out / "config.json").is_file():
        sh(
            slicelm(
                "slice",
                "smollm2-135m",
                "--sparsity",
                int(name) / 100,
                "--calib",
                "c4",
                "--calib-samples",
                args.calib_samples,
                "--calib-seqlen",
                args.calib_seqlen,
                "--data-dir",
                args.data_dir,
                "--out",
                out,
                "--overwrite",
                "--quiet",
            )
        )
    return out


def record_base(record: Path, name: str, folder: Path, measured: dict) -> None:
    """What the base is (its folder, layout and true parameter ratio) beside its perplexity."""
    report = json.loads((folder / "slicelm_report.json").read_text())
    planning = report.get("planning") or {}
    described = {"base": name, "folder": str(folder), "ppl": measured, "layout": report.get("layout")}
    described |= {"schedule": planning.get("schedule", "uniform"), "params_ratio": report.get("params_ratio")}
    record.write_text(json.dumps(described) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--runs",
        default=DEFAULT_RUNS,
        help="comma-separated BASE:LOSS:MODE[:LR][@DATA] (MODE lora, lora+ (with shortcuts and final), full; LR "
        "overrides --lr-lora/--lr-full for that run; DATA a finetune --data source, default c4)",
    )
    p.add_argument("--base", action="append", default=[], help="NAME=FOLDER: use an existing sliced folder")
    p.add_argument("--teacher", default=None, help="teacher for kd runs (default: the source each folder records)")
    p.add_argument("--tokens", type=int, default=131072, help="training tokens per run (default 131072)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr-lora", type=float, default=None)
    p.add_argument("--lr-full", type=float, default=None)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=1024)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--curve", default="", help="BASE:LOSS:MODE run that also records WikiText-2 ppl while training")
    p.add_argument("--monitor-ppl", type=int, default=4, help="windows for --curve's perplexity (default 4)")
    p.add_argument(
        "--full-set", default="", help="comma-separated runs (or base:NAME, or dense) also measured on all windows"
    )
    p.add_argument("--data-dir", default=os.environ.get("SLICELM_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--work", default=str(REPO / "runs" / "recovery"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--name", default="recovery_smollm2", help="result page: docs/results/NAME.{json,md}")
    args = p.parse_args()
    work = Path(args.work)
    (work / "points").mkdir(parents=True, exist_ok=True)
    runs = [r for r in args.runs.split(",") if r]
    for run in [] if args.report_only else runs:
        record = work / "points" / f"{slug(run)}.json"
        if record.is_file():
            continue
        spec, _, data = run.partition("@")
        data = data or "c4"
        base_name, loss, mode, *run_lr = spec.split(":")
        base = base_folder(base_name, args, work)
        dense_record = work / "points" / "dense.json"
        if not dense_record.is_file():  # the teacher itself: how much of the gap recovery closes
            dense = args.teacher or recorded_source(base)
            dense_record.write_text(json.dumps({"model": dense, "ppl": ppl(dense, args, args.windows)}) + "\n")
        base_record = work / "points" / f"base-{base_name}.json"
        if not base_record.is_file():
            record_base(base_record, base_name, base, ppl(base, args, args.windows))
        out = work / "models" / slug(run)
        cmd = slicelm("finetune", base, "--out", out, "--overwrite", "--data", data, "--data-dir", args.data_dir)
        cmd += ["--loss", loss, "--tokens", args.tokens, "--seqlen", args.seqlen, "--batch-size", args.batch_size]
        cmd += ["--quiet"] + (["--full"] if mode == "full" else [])
        if mode == "lora+":  # LoRA on the shortcut matrices and the tied final projection too
            cmd += ["--lora-extra", "shortcuts,final"]
        lr = float(run_lr[0]) if run_lr else (args.lr_full if mode == "full" else args.lr_lora)
        if args.teacher:
            cmd += ["--teacher", args.teacher]
        if lr is not None:
            cmd += ["--lr", lr]
        if run == args.curve:
            cmd += ["--monitor-ppl", args.monitor_ppl]
        resume = out.with_name(out.name + ".slicelm-work")
        if resume.exists():
            cmd.append("--resume")
        start = time.perf_counter()
        sh(cmd)
        wall = time.perf_counter() - start
        report = json.loads((out / "slicelm_report.json").read_text())["finetune"]
        result = {"run": run, "base": base_name, "loss": loss, "mode": mode, "data": data, "wall_seconds": wall}
        result["lr"] = report["config"]["peak_lr"]
        result |= {"ppl": ppl(out, args, args.windows), "finetune": report}
        record.write_text(json.dumps(result, indent=2) + "\n")
        print(f"[recovery] {run}: ppl {result['ppl']['ppl']:.2f}", file=sys.stderr, flush=True)
    for item in [] if args.report_only else [x for x in args.full_set.split(",") if x]:
        record = work / "points" / f"full-{slug(item)}.json"
        if record.is_file():
            continue
        if item == "dense":  # the teacher, recorded with the 16-window row
            folder = json.loads((work / "points" / "dense.json").read_text())["model"]
        elif item.startswith("base:"):
            folder = base_folder(item.split(":", 1)[1], args, work)
        else:
            folder = work / "models" / slug(item)
        record.write_text(json.dumps({"point": item, "ppl": ppl(folder, args)}) + "\n")
    write_report(args, work)


def slug(run: str) -> str:
    """A run's name as a file name: ``25:kd:lora:1e-3@alpaca`` -> ``25-kd-lora-1e-3-alpaca``."""
    return run.replace(":", "-").replace("@", "-")


def write_report(args: argparse.Namespace, work: Path) -> None:
    points = {p.stem: json.loads(p.read_text()) for p in sorted((work / "points").glob("*.json"))}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"settings": vars(args), "points": points}, indent=2) + "\n")
    dense = points.get("dense", {}).get("ppl", {}).get("ppl")
    lines = [
        "# Recovery fine-tuning of sliced SmolLM2-135M",
        "",
        "Produced by `benchmarks/recovery_smollm2.py` (the `slicelm slice` / `finetune` / `ppl` commands). Bases: "
        f"{describe_bases(points)}; the ones it slices itself use c4 {args.calib_samples} x "
        f"{args.calib_seqlen} calibration. Training: the offline C4 sample (documents 1000+, never the test text; "
        "alpaca rows: the 5,000-record Alpaca subset in the Stanford template, packed into full windows), "
        f"{args.tokens:,} tokens per run in windows of {args.seqlen}, batch {args.batch_size}, AdamW + cosine "
        "schedule; `kd` distils the dense model (KL at temperature 1); LoRA rank 32, alpha 64 on every block linear. "
        f"Perplexity: WikiText-2 test, first {args.windows} windows of 2048"
        + (f"; dense {dense:.2f} (gap closed = (before - after) / (before - dense))." if dense else "."),
        "",
        "| base | data | loss | mode | peak lr | ppl before | ppl after | gap closed | held-out loss before → after | "
        "train time | teacher share |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in points.values():
        if "run" not in r:
            continue
        before = points.get(f"base-{r['base']}", {}).get("ppl", {}).get("ppl")
        curve = r["finetune"]["curve"]
        teacher = r["finetune"]["teacher_seconds"] / max(r["finetune"]["seconds"], 1e-9)
        lines.append(
            f"| {r['base']} | {r.get('data', 'c4')} | {r['loss']} | {r['mode']} | "
            f"{r['finetune']['config']['peak_lr']:g} | {before:.2f} | {r['ppl']['ppl']:.2f} | "
            f"{gap_closed(before, r['ppl']['ppl'], dense)} | "
            f"{curve[0]['heldout_lm']:.3f} → {curve[-1]['heldout_lm']:.3f} | {r['finetune']['seconds'] / 60:.1f} min | "
            f"{teacher:.0%} |"
        )
    lines += [
        "",
        "Held-out loss: next-token loss on windows of the run's own training source that it did not train on (C4 "
        "rows compare with each other, Alpaca rows with each other). "
        "Train time is the whole `finetune` loop on this machine, held-out evaluations included (and the curve run's "
        "WikiText-2 monitor); teacher share is the part spent in the teacher's forward passes.",
    ]
    fulls = [r for k, r in points.items() if k.startswith("full-")]
    if fulls:
        lines += ["", "Full WikiText-2 test set:", "", "| model | ppl | windows |", "|---|---:|---:|"]
        lines += [f"| {r['point']} | {r['ppl']['ppl']:.2f} | {r['ppl']['windows']} |" for r in fulls]
    curve_run = next((r for r in points.values() if r.get("run") == args.curve), None)
    if curve_run:
        lines += [
            "",
            f"Token-budget curve of `{args.curve}` (WikiText-2 ppl on {args.monitor_ppl} windows while "
            "training; one run, its cosine schedule spans the whole budget):",
            "",
            "| tokens | held-out C4 loss | WikiText-2 ppl |",
            "|---:|---:|---:|",
        ]
        for point in curve_run["finetune"]["curve"]:
            if "wikitext2_ppl" in point:
                lines.append(f"| {point['tokens']:,} | {point['heldout_lm']:.3f} | {point['wikitext2_ppl']:.2f} |")
        plot_curve(curve_run, args)
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


def gap_closed(before: float | None, after: float, dense: float | None) -> str:
    if before is None or dense is None or before <= dense:
        return ""
    return f"{(before - after) / (before - dense):.0%}"


def describe_bases(points: dict) -> str:
    named = {"25": "SliceGPT 25% (tied layout)", "30": "SliceGPT 30% (tied layout)"}
    parts = []
    for key, r in points.items():
        if key.startswith("base-"):
            what = named.get(r["base"]) or f"`{r.get('folder', r['base'])}`"
            if r.get("params_ratio"):
                layout, schedule = r.get("layout"), r.get("schedule")
                what += f" ({layout} layout, {schedule} schedule, {r['params_ratio']:.3f}x dense parameters)"
            parts.append(f"{r['base']} = {what}")
    return "; ".join(parts) or "none yet"


def plot_curve(run: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in run["finetune"]["curve"] if "wikitext2_ppl" in p]
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    ax.plot([p["tokens"] for p in points], [p["wikitext2_ppl"] for p in points], marker="o")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"WikiText-2 ppl ({args.monitor_ppl} windows of 2048)")
    ax.set_title(f"SmolLM2-135M {run['base']}% sliced, recovery by {run['loss']} ({run['mode']})")
    ax.grid(True, alpha=0.3)
    fig.savefig(RESULTS / f"{args.name}_curve.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
