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
  heads             the head-removal step alone with the MLPs (one query head fewer per KV group,
                    the rest of the budget from every MLP alike)
  attn-blocks       the sub-block step alone with the MLPs (attention of the least sensitive 1/16 of
                    the layers removed, the rest from every MLP alike)

Peers (benchmark code, not slicelm): MLP channels only, the same number in every layer as ``mlp`` at
the same target, no refit of the output projection:

  activation        channels ranked by mean |activation| of the MLP intermediate (the writer's
                    input, act(gate) * up) over the calibration tokens, as Minitron ranks neurons
  torch-pruning     torch-pruning 1.6.1 (registry package ``torch-pruning==1.6.1``):
                    ``MetaPruner`` with its default ``MagnitudeImportance`` (group L2 norm of the
                    gate/up rows and down columns), every module but gate_proj/up_proj ignored

Each point runs in its own process (clean peak memory) and is stored under --work as soon as it is
measured, so an interrupted benchmark resumes; the statistics pass of the dense model is computed
once per calibration set and shared. Writes docs/results/compression_smollm2.{json,md,png}.

    python benchmarks/compression_smollm2.py                       # everything (hours on 2 CPU cores)
    python benchmarks/compression_smollm2.py --methods plain,mlp --targets 0.85
    python benchmarks/compression_smollm2.py --full-set plain@0.85  # full WikiText-2 test for a point
"""

from __future__ import annotations

import argparse
import importlib.metadata
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
    "heads": {"schedule": "heads", "layout": "slicegpt"},
    "attn-blocks": {"schedule": "attn-blocks", "layout": "slicegpt"},
}
# Peers: uniform MLP-channel removal at the width `mlp` plans for the target, no refit.
PEERS = ("activation", "torch-pruning")
ORDER = (*METHODS, *PEERS)
TARGETS = (0.95, 0.90, 0.85, 0.80, 0.75, 0.70)
UNIFORM = ("slicegpt", "mlp")  # the uniform plans the default must not lose to


def point_name(method: str, target: float) -> str:
    return f"{method}@{target:g}"


def run_point(args: argparse.Namespace, method: str, target: float) -> dict:
    """Slice and measure one point in this process (called in a child)."""
    import torch

    import slicelm
    from slicelm.config import SliceConfig
    from slicelm.io.data import load_calibration, load_eval_ids
    from slicelm.measure.perplexity import perplexity
    from slicelm.slicing import slice_model

    torch.set_num_threads(args.threads)
    data_dir = args.data_dir
    model, tokenizer = slicelm.load_model("smollm2-135m")
    dense = sum(p.numel() for p in model.parameters())
    calibration = load_calibration(
        "c4", tokenizer, n_samples=args.calib_samples, seqlen=args.calib_seqlen, seed=42, data_dir=data_dir
    )
    ids = load_eval_ids("wikitext2", tokenizer, data_dir=data_dir)
    result = {"method": method, "target": target, "dense_params": dense, "threads": args.threads}
    if method == "dense":
        params, report = dense, None
        seconds = 0.0
    elif method in PEERS:
        report = None
        start = time.perf_counter()
        result |= run_peer(model, calibration, method, target, args.round_to)
        seconds = result["slice_seconds"] = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters())
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
    if args.save_model and report is not None:  # for zero-shot or recovery runs on this point
        out = Path(args.work) / "models" / point_name(method, target)
        metadata = {"source_model": "smollm2-135m", "method": method, "target": target}
        slicelm.save_sliced(model, out, tokenizer, overwrite=True, metadata=metadata, report=report.to_dict())
        result["saved"] = str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out)
    return result


def uniform_mlp_width(model, target: float, round_to: int) -> int:
    """The intermediate width slicelm's ``--schedule mlp`` plans for ``target`` (the peers' width)."""
    from slicelm.allocate.budget import build_plan
    from slicelm.allocate.context import context_from_config
    from slicelm.config import SliceConfig

    config = SliceConfig(target_params=target, schedule="mlp", layout="plain", round_to=round_to)
    ctx, dense = context_from_config(model.config, config)
    plan, _ = build_plan(ctx, config, dense)
    widths = {w.mlp for w in plan.layers}
    assert len(widths) == 1, widths
    return widths.pop()


def run_peer(model, calibration: list, method: str, target: float, round_to: int) -> dict:
    """Remove MLP channels uniformly (``mlp``'s width) by a peer's importance, without refit."""
    from slicelm.core.arch import resolve
    from slicelm.modeling.modeling_slicelm import get_module
    from slicelm.steps.channels import intermediate_width

    layout = resolve(model)
    layers = list(get_module(model, layout.layers))
    width = uniform_mlp_width(model, target, round_to)
    intermediate = intermediate_width(layers[0], layout)
    before = sum(p.numel() for p in model.parameters())
    peer = _peer_importance(model, calibration, method, layout, layers, width, intermediate)
    # Only MLP channels went (gate and up rows, down columns; no biases): the stream and attention are whole.
    per_channel = (len(layout.mlp_inputs) + 1) * model.config.hidden_size
    after = sum(p.numel() for p in model.parameters())
    if after != before - len(layers) * (intermediate - width) * per_channel:
        raise RuntimeError(f"{method} removed {before - after:,} parameters, not only {intermediate - width} channels")
    return {"peer": peer | {"width": width}}


def _peer_importance(model, calibration, method, layout, layers, width, intermediate) -> dict:
    import torch

    from slicelm.modeling.modeling_slicelm import get_module
    from slicelm.steps.channels import intermediate_width, select_channels

    if method == "activation":
        sums = [torch.zeros(intermediate, dtype=torch.float64) for _ in layers]
        count = [0]

        def hook(i):
            def pre(module, inputs):  # the writer's input: the MLP intermediate, (B, T, I)
                sums[i].add_(inputs[0].detach().abs().to(torch.float64).sum(dim=(0, 1)))

            return pre

        handles = [
            get_module(layer, layout.mlp_outputs[0]).register_forward_pre_hook(hook(i))
            for i, layer in enumerate(layers)
        ]
        with torch.no_grad():
            for ids in calibration:  # full windows, no padding: every token counts
                model(ids.unsqueeze(0), use_cache=False)
                count[0] += ids.numel()
        for h in handles:
            h.remove()
        for i, layer in enumerate(layers):
            keep = torch.topk(sums[i] / count[0], width).indices.sort().values
            select_channels(layer, layout, keep, None)
        return {"importance": "mean |MLP intermediate| over the calibration tokens"}
    import torch_pruning as tp

    keep_modules = {id(get_module(layer, path)) for layer in layers for path in layout.mlp_inputs}
    ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in keep_modules]
    ignored += [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    example = calibration[0][:64].unsqueeze(0)
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(),  # the default: p=2, mean group reduction
        pruning_ratio=(intermediate - width - 0.5) / intermediate,  # int(I * (1 - ratio)) = width exactly
        ignored_layers=ignored,
        forward_fn=lambda m, x: m(x, use_cache=False).logits,
    )
    pruner.step()
    widths = sorted({intermediate_width(layer, layout) for layer in layers})
    if widths != [width]:
        raise RuntimeError(f"torch-pruning left MLP widths {widths}, expected {width} in every layer")
    version = importlib.metadata.version("torch-pruning")  # its __version__ string says 1.6.0 in 1.6.1
    return {"importance": f"torch-pruning {version} MagnitudeImportance() (p=2, group mean)"}


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
    protocol = (
        f"calibration C4 {args.calib_samples} x {args.calib_seqlen} tokens; perplexity WikiText-2 test, first "
        f"{args.windows} windows of 2048 tokens ({args.windows * 2047:,} predicted tokens)"
    )
    if dense:
        lines.append(f"Dense: {dense['params'] / 1e6:.1f}M parameters, ppl {dense['ppl']:.2f} ({protocol}).")
        lines.append("")
    methods = [m for m in ORDER if any(r["method"] == m for r in rows)]
    targets = sorted({r["target"] for r in rows if r["method"] != "dense"}, reverse=True)
    lines += [f"Every cell of this table: {protocol}.", ""]
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
    lines += [
        "",
        "Cells: perplexity (true parameters / dense). The peers `activation` and `torch-pruning` remove MLP "
        "channels only, the same number in every layer as `mlp` at that target, without refitting the output "
        "projection: `activation` ranks channels by the mean |activation| of the MLP intermediate (act(gate) * up, "
        "the input of down_proj) over the calibration tokens, as Minitron ranks neurons; `torch-pruning` is "
        "torch-pruning 1.6.1's `MetaPruner` with its default `MagnitudeImportance()` (group L2 norm of the gate "
        "and up rows and the down columns of a channel), every module except gate_proj and up_proj ignored, so "
        "that only the MLP channel groups are pruned, with one pruning ratio for every layer.",
        "",
    ]
    lines += default_against_uniform(by_name, targets, protocol)
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
    lines += auto_cost(by_name, targets)
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


def default_against_uniform(by_name: dict, targets: list[float], protocol: str) -> list[str]:
    """For each target: the default (auto) against the best uniform plan measured there."""
    out = [
        "The default (`auto`) against the best uniform plan (uniform SliceGPT `slicegpt`, uniform MLP `mlp`) at "
        f"each target; every number: {protocol}.",
        "",
        "| target | auto: ppl (params / dense) | best uniform: method, ppl (params / dense) | auto ≤ best uniform |",
        "|---:|---:|---:|:---:|",
    ]
    for t in targets:
        auto = by_name.get(point_name("auto", t))
        uniform = [r for m in UNIFORM if (r := by_name.get(point_name(m, t))) and "ppl" in r]
        best = min(uniform, key=lambda r: r["ppl"]) if uniform else None
        auto_cell = f"{auto['ppl']:.2f} ({auto['params_ratio']:.3f})" if auto and "ppl" in auto else "not run"
        best_cell = f"{best['method']}, {best['ppl']:.2f} ({best['params_ratio']:.3f})" if best else "not run"
        missing = [m for m in UNIFORM if not by_name.get(point_name(m, t))]
        if best and missing:
            best_cell += f"; {', '.join(missing)} not run"
        verdict = "yes" if auto and best and auto["ppl"] <= best["ppl"] else ("no" if auto and best else "")
        out.append(f"| {t:g} | {auto_cell} | {best_cell} | {verdict} |")
    return [*out, ""]


def auto_cost(by_name: dict, targets: list[float]) -> list[str]:
    """The default's compression time and peak memory beside uniform MLP's, per target."""
    out = [
        "Compression cost of the default beside uniform MLP's (each point in its own process with the torch threads "
        "shown, on a 2-core machine shared with other jobs, so seconds are upper bounds and a ratio between points "
        "with different threads is not a like-for-like cost):",
        "",
        "| target | auto slicing s (threads) | auto end-to-end evaluations | auto peak RSS GiB | mlp slicing s "
        "(of which statistics s) (threads) | mlp peak RSS GiB | auto / mlp time |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    shown = False
    for t in targets:
        auto, mlp = by_name.get(point_name("auto", t)), by_name.get(point_name("mlp", t))
        if not auto or "slice_seconds" not in auto:
            continue
        shown = True
        ratio = f"{auto['slice_seconds'] / mlp['slice_seconds']:.1f}x" if mlp else ""
        mlp_cells = (
            f"{mlp['slice_seconds']:.0f} ({statistics_cell(mlp)}) ({threads_cell(mlp)}) | {mlp['peak_rss_gib']:.2f}"
            if mlp
            else " | "
        )
        out.append(
            f"| {t:g} | {auto['slice_seconds']:.0f} ({threads_cell(auto)}) | {auto['planning'].get('evaluations')} | "
            f"{auto['peak_rss_gib']:.2f} | {mlp_cells} | {ratio} |"
        )
    return [*out, ""] if shown else []


def threads_cell(row: dict) -> str:
    """The torch threads a point ran with; points written before the count was recorded say so."""
    return str(row["threads"]) if "threads" in row else "not recorded"


def statistics_cell(row: dict) -> str:
    seconds = row.get("timings", {}).get("statistics")
    if seconds is None:
        return "none"
    return "cached" if seconds < 5 else f"{seconds:.0f}"


def plot(rows: list[dict], dense: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for method in ORDER:
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
