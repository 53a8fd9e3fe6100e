"""Perplexity against *true* parameter count on SmolLM2-135M: SliceGPT against slicelm's mechanisms.

Every point slices the real SmolLM2-135M-Instruct (GGUF, dequantised to float32) to a fraction of
its dense parameter count with ``--target-params`` — shortcut matrices, a kept or untied head and
everything else that is stored are counted — and measures WikiText-2 test perplexity. Methods:

  slicegpt          SliceGPT (a PCA basis per point, shortcuts), tied head kept (slicelm's default)
  slicegpt-untied   the paper's layout: head untied
  plain             one PCA basis for the whole stream (no shortcuts; stock architecture)
  plain-channels    one width, channel selection without rotation (Minitron-style baseline)
  mlp               MLP channels only (structured OBS + refit), the same in every layer (stock)
  mlp-global        MLP channels only, per layer by a calibration proxy (one basis, no shortcuts)
  proxy-plain       stream width and MLP channels by the proxy, stock-shaped (slicelm's old auto, plain)
  proxy             stream (per-point bases) and per-layer MLP channels by the proxy (the old default)
  auto              the default command: the measured allocator (candidates scored end to end)
  auto-plain        the measured allocator with --layout plain

Each point runs in its own process (clean peak memory) and is stored under --work as soon as it is
measured, so an interrupted benchmark resumes; the statistics pass of the dense model is computed
once per calibration set and shared. Writes docs/results/compression_smollm2.{json,md,png}.

    python benchmarks/compression_smollm2.py                       # everything (hours on 2 CPU cores)
    python benchmarks/compression_smollm2.py --methods plain,mlp --targets 0.85
    python benchmarks/compression_smollm2.py --full-set plain@0.85  # full WikiText-2 test for a point
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

METHODS: dict[str, dict] = {
    "slicegpt": {"schedule": "uniform", "layout": "slicegpt"},
    "slicegpt-untied": {"schedule": "uniform", "layout": "slicegpt", "untie_head": True},
    "plain": {"schedule": "uniform", "layout": "plain"},
    "plain-channels": {"schedule": "uniform", "layout": "plain", "basis": "channels"},
    "mlp": {"schedule": "mlp", "layout": "plain"},
    "mlp-global": {"schedule": "mlp-global", "layout": "plain"},
    "proxy-plain": {"schedule": "proxy", "layout": "plain"},
    "proxy": {"schedule": "proxy", "layout": "slicegpt"},
    "auto": {"schedule": "auto", "layout": "slicegpt"},
    "auto-plain": {"schedule": "auto", "layout": "plain"},
}
TARGETS = (0.95, 0.90, 0.85, 0.80, 0.75, 0.70)


def point_name(method: str, target: float) -> str:
    return f"{method}@{target:g}"


def run_point(args: argparse.Namespace, method: str, target: float) -> dict:
    """Slice and measure one point in this process (called in a child)."""
    import torch

    import slicelm
    from slicelm.config import SliceConfig
    from slicelm.data import load_calibration, load_eval_ids
    from slicelm.perplexity import perplexity
    from slicelm.slicing import slice_model

    torch.set_num_threads(args.threads)
    data_dir = args.data_dir
    model, tokenizer = slicelm.load_model("smollm2-135m")
    dense = sum(p.numel() for p in model.parameters())
    calibration = load_calibration(
        "c4", tokenizer, n_samples=args.calib_samples, seqlen=args.calib_seqlen, seed=42, data_dir=data_dir
    )
    ids = load_eval_ids("wikitext2", tokenizer, data_dir=data_dir)
    result = {"method": method, "target": target, "dense_params": dense}
    if method == "dense":
        params, report = dense, None
        seconds = 0.0
    else:
        config = SliceConfig(target_params=target, round_to=args.round_to, **METHODS[method])
        cache = Path(args.work) / f"stats-{config.layout}-{args.calib_samples}x{args.calib_seqlen}"
        start = time.perf_counter()
        report = slice_model(
            model, calibration, config, pad_token_id=tokenizer.pad_token_id, progress=False, statistics_cache=cache
        )
        seconds = time.perf_counter() - start
        params = report.params_after
        result |= {
            "plan": report.plan,
            "planning": {k: v for k, v in report.planning.items() if k != "candidates"},
            "candidates": report.planning.get("candidates"),
            "slice_seconds": seconds,
            "timings": report.seconds,
            "mlp_error_mean": sum(report.mlp_error.values()) / len(report.mlp_error) if report.mlp_error else None,
        }
    windows = None if args.full_set else args.windows
    t = time.perf_counter()
    ppl = perplexity(model, ids, seqlen=2048, max_windows=windows, progress=False)
    result |= {
        "params": params,
        "params_ratio": params / dense,
        "ppl": ppl.ppl,
        "ppl_windows": ppl.windows,
        "ppl_seconds": time.perf_counter() - t,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if args.save_model and method != "dense":  # for zero-shot or recovery runs on this point
        out = Path(args.work) / "models" / point_name(method, target)
        metadata = {"source_model": "smollm2-135m", "method": method, "target": target}
        slicelm.save_sliced(model, out, tokenizer, overwrite=True, metadata=metadata, report=report.to_dict())
        result["saved"] = str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--targets", default=",".join(f"{t:g}" for t in TARGETS))
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=1024)
    p.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows of 2048 (default 16)")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=os.environ.get("SLICELM_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--work", default=str(REPO / "runs" / "compression"), help="per-point results and caches")
    p.add_argument(
        "--full-set", default="", help="comma-separated method@target points to measure on the full test set"
    )
    p.add_argument("--point", nargs=2, metavar=("METHOD", "TARGET"), help=argparse.SUPPRESS)
    p.add_argument("--save-models", default="", help="comma-separated method@target points to keep under --work")
    p.add_argument("--report-only", action="store_true", help="only rewrite the JSON, markdown and plot")
    p.add_argument("--save-model", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    if args.point:  # child process: one point, printed as JSON
        print(json.dumps(run_point(args, args.point[0], float(args.point[1]))))
        return

    points = [("dense", 1.0)] + [
        (m, float(t)) for m in args.methods.split(",") if m for t in args.targets.split(",") if t
    ]
    full = [tuple(x.split("@")) for x in args.full_set.split(",") if x]
    jobs = [(m, t, False) for m, t in points] + [(m, float(t), True) for m, t in full]
    for method, target, full_set in [] if args.report_only else jobs:
        name = point_name(method, target) + ("-full" if full_set else "")
        path = work / "points" / f"{name}.json"
        if path.is_file():
            continue
        cmd = [sys.executable, __file__, "--point", method, str(target)]
        cmd += ["--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen)]
        cmd += ["--windows", str(args.windows), "--round-to", str(args.round_to), "--threads", str(args.threads)]
        cmd += ["--data-dir", args.data_dir, "--work", str(work)] + (["--full-set", "x"] if full_set else [])
        if point_name(method, target) in args.save_models.split(","):
            cmd.append("--save-model")
        print(f"[compression] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            if "cannot be met" in done.stderr:  # e.g. an untied head cannot fit a 0.95 budget
                result = {"method": method, "target": target, "infeasible": done.stderr.strip().splitlines()[-1]}
            else:
                continue
        else:
            result = json.loads(done.stdout.strip().splitlines()[-1])
        result["wall_seconds"] = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(
            f"[compression] {name}: {json.dumps({k: result.get(k) for k in ('params_ratio', 'ppl')})}", file=sys.stderr
        )
    write_report(args, work)


def write_report(args: argparse.Namespace, work: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted((work / "points").glob("*.json"))]
    by_name = {}
    for r in rows:
        key = point_name(r["method"], r["target"]) + ("-full" if r.get("ppl_windows", 0) > args.windows else "")
        by_name[key] = r
    dense = by_name.get(point_name("dense", 1.0))
    summary = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)",
        "calibration": f"c4 (offline sample, documents 1000+), {args.calib_samples} x {args.calib_seqlen} tokens, "
        "seed 42",
        "perplexity": f"WikiText-2 test, first {args.windows} windows of 2048 tokens (rows marked full: all windows)",
        "round_to": args.round_to,
        "points": by_name,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compression_smollm2.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# Perplexity against true parameter count: SmolLM2-135M",
        "",
        f"Produced by `benchmarks/compression_smollm2.py`. Calibration: {summary['calibration']}. "
        f"Perplexity: {summary['perplexity']}. Widths rounded to multiples of {args.round_to}. No fine-tuning. "
        "Parameter counts are of the saved model (shortcuts, tied or untied head included).",
        "",
    ]
    if dense:
        lines.append(f"Dense: {dense['params'] / 1e6:.1f}M parameters, ppl {dense['ppl']:.2f}.")
        lines.append("")
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    targets = sorted({r["target"] for r in rows if r["method"] != "dense"}, reverse=True)
    lines.append("| method | " + " | ".join(f"target {t:g}" for t in targets) + " |")
    lines.append("|---|" + "---:|" * len(targets))
    for m in methods:
        cells = []
        for t in targets:
            r = by_name.get(point_name(m, t))
            if r is None:
                cells.append("")
            elif "infeasible" in r:
                cells.append("cannot")
            else:
                cells.append(f"{r['ppl']:.1f} ({r['params_ratio']:.3f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: perplexity (parameters / dense).", ""]
    measured = [r for r in rows if r["method"] in ("auto", "auto-plain") and r.get("candidates")]
    for r in measured:
        planning = r["planning"]
        lines += [
            f"How `{r['method']}` chose at target {r['target']:g}: {planning.get('evaluations')} end-to-end "
            f"evaluations (KL of the next-token distribution from dense, on {planning.get('score_tokens')} held-out "
            f"calibration tokens; candidates' refits on {planning.get('search_tokens')} other calibration tokens), "
            f"search {planning.get('search_seconds', 0):.0f} s of the {r['slice_seconds']:.0f} s slicing time; "
            f"chose **{planning.get('chosen')}**.",
            "",
            "| candidate | params / dense | KL per token |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {c['name']} | {c['params'] / r['dense_params']:.3f} | {c['score']:.4f} |" for c in r["candidates"]
        ]
        sens = planning.get("layer_sensitivity")
        if sens:
            lines += [
                "",
                "Measured layer sensitivity (KL with only that layer's MLP at the uniform width), layer 0 "
                "first: " + ", ".join(f"{v:.4f}" for v in sens),
            ]
        widths = [w.get("mlp") for w in r["plan"]["layers"]]
        lines += ["", f"Chosen MLP widths, layer 0 first: {widths}", ""]
    full_rows = [r for k, r in by_name.items() if k.endswith("-full")]
    if full_rows:
        lines += ["Full WikiText-2 test set:", "", "| point | params / dense | ppl (all windows) |", "|---|---:|---:|"]
        for r in full_rows:
            name = point_name(r["method"], r["target"])
            lines.append(f"| {name} | {r['params_ratio']:.3f} | {r['ppl']:.2f} ({r['ppl_windows']} windows) |")
        lines.append("")
    timing = [r for r in rows if r.get("slice_seconds") and r["target"] == 0.85]
    if timing:
        lines += ["Compression time and peak memory at target 0.85 (each point in its own process):", ""]
        lines += ["| method | slicing s | of which statistics s | peak RSS GiB |", "|---|---:|---:|---:|"]
        lines += [
            f"| {r['method']} | {r['slice_seconds']:.0f} | {statistics_cell(r)} | {r['peak_rss_gib']:.2f} |"
            for r in timing
        ]
        lines += [
            "",
            "The statistics pass (plain layout's basis, MLP removal curves) is cached per layout and calibration "
            "under --work and shared by the points: *cached* means this point read it from disk, so add the "
            "pass's own time (the largest figure in the column) for a cold run. SliceGPT needs no pass.",
            "",
        ]
    (RESULTS / "compression_smollm2.md").write_text("\n".join(lines) + "\n")
    plot(rows, dense)


def statistics_cell(row: dict) -> str:
    seconds = row["timings"].get("statistics")
    if seconds is None:
        return "none"
    return "cached" if seconds < 5 else f"{seconds:.0f}"


def plot(rows: list[dict], dense: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for method in METHODS:
        pts = sorted(
            (r["params_ratio"], r["ppl"])
            for r in rows
            if r["method"] == method and "ppl" in r and r.get("ppl_windows", 0) <= 16
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    if dense:
        ax.axhline(dense["ppl"], color="gray", linestyle="--", label=f"dense ({dense['ppl']:.1f})")
    ax.set_xlabel("parameters / dense (true count, as saved)")
    ax.set_ylabel("WikiText-2 perplexity (first 16 windows; log scale)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M: perplexity against parameters, no fine-tuning")
    fig.savefig(RESULTS / "compression_smollm2.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
