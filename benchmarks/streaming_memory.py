"""Compress a synthetic >=1.5B Llama-shaped model and record the peak memory of each path.

Builds the model (random weights, float32, one shard per layer) in a temporary folder, runs
``slicelm slice`` on it in a child process per mode — ``--stream`` (layer streaming) and/or the
in-memory path — and writes docs/results/streaming_<preset>.json/.md (streaming) and
docs/results/memory_<preset>.json/.md (both paths side by side) with: size on disk, peak resident
memory of the compressing process (ru_maxrss, which includes the Python/torch runtime), their ratio,
wall time, and the calibration size. The model and outputs are deleted unless --keep is given.

    python benchmarks/streaming_memory.py --preset 1.5b --calib-samples 16 --calib-seqlen 256 --modes stream,memory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from make_synthetic import build  # noqa: E402


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="1.5b")
    p.add_argument("--sparsity", type=float, default=0.25)
    p.add_argument("--calib", default="c4")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--max-memory", default="256MiB", help="RAM budget for calibration activations")
    p.add_argument("--work-dir", default=None, help="where the model is built (default: a temp folder)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--modes", default="stream", help="comma-separated: stream, memory (default stream)")
    args = p.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="slicelm-synthetic-"))
    source = work / f"llama-{args.preset}"
    results = {}
    try:
        t = time.perf_counter()
        if not (source / "config.json").is_file():
            build(source, args.preset)
        build_seconds = time.perf_counter() - t
        for mode in modes:
            results[mode] = measure(args, mode, source, work) | {"build_seconds": build_seconds}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if "stream" in results:
        write(results["stream"], REPO / "docs" / "results" / f"streaming_{args.preset}")
    if len(results) > 1:
        write_comparison(results, REPO / "docs" / "results" / f"memory_{args.preset}")
    print(json.dumps(results, indent=2))


def measure(args: argparse.Namespace, mode: str, source: Path, work: Path) -> dict:
    """Slice ``source`` in a child process in ``mode`` (stream or memory); its peak RSS and timings."""
    out = work / f"{source.name}-sliced-{mode}"
    cmd = [sys.executable, "-m", "slicelm", "slice", str(source), "--sparsity", str(args.sparsity)]
    cmd += ["--calib", args.calib, "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen)]
    cmd += ["--calib-batch-size", "4", "--out", str(out), "--overwrite", "--quiet"]
    if mode == "stream":
        cmd += ["--stream", "--max-memory", args.max_memory, "--offload-dir", str(work / "offload")]
    size = folder_bytes(source)
    t = time.perf_counter()
    # A fresh child per mode: ru_maxrss of RUSAGE_CHILDREN is the largest child so far, so measure
    # through a wrapper that reports its own peak.
    wrapper = [sys.executable, str(REPO / "benchmarks" / "peak_rss.py"), *cmd]
    done = subprocess.run(wrapper, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    child_peak = int(done.stdout.strip().splitlines()[-1])
    report = json.loads((out / "slicelm_report.json").read_text())
    result = {
        "mode": mode,
        "preset": args.preset,
        "params_before": report["params_before"],
        "params_after": report["params_after"],
        "bytes_on_disk": size,
        "sliced_bytes_on_disk": folder_bytes(out),
        "peak_rss_bytes": child_peak,
        "peak_rss_share_of_disk_size": child_peak / size,
        "wall_seconds": wall,
        "slicing_seconds": report["seconds"],
        "calibration": report["calibration"],
        "activations_max_memory": args.max_memory if mode == "stream" else None,
        "sparsity": args.sparsity,
        "cpu_count": os.cpu_count(),
        "command": " ".join(["slicelm"] + cmd[3:]).replace(str(work), "$WORK"),
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


def write_comparison(results: dict, out: Path) -> None:
    out.parent.joinpath(out.name + ".json").write_text(json.dumps(results, indent=2) + "\n")
    first = next(iter(results.values()))
    lines = [
        f"# Peak memory of slicing a synthetic {first['params_before'] / 1e9:.2f}B Llama, in memory and streamed",
        "",
        f"float32 weights, {first['bytes_on_disk'] / 2**30:.2f} GiB on disk; sparsity {first['sparsity']}; "
        f"calibration {first['calibration']['samples']} x {first['calibration']['max_seqlen']} tokens. Produced "
        "by `benchmarks/streaming_memory.py --modes stream,memory`; peak RSS of each child process (runtime "
        "included, about 0.7 GiB).",
        "",
        "| path | peak RSS | peak / size on disk | wall time |",
        "|---|---:|---:|---:|",
    ]
    for mode, r in results.items():
        name = {"stream": "`--stream` (layer streaming)", "memory": "in memory (default)"}[mode]
        lines.append(
            f"| {name} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['peak_rss_share_of_disk_size']:.2f}x | "
            f"{r['wall_seconds']:.0f} s |"
        )
    lines += ["", *(f"- {mode}: `{r['command']}`" for mode, r in results.items())]
    out.parent.joinpath(out.name + ".md").write_text("\n".join(lines) + "\n")


def write(r: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not with_suffix: the preset name "1.5b" has a dot in it.
    out.parent.joinpath(out.name + ".json").write_text(json.dumps(r, indent=2) + "\n")
    c = r["calibration"]
    lines = [
        f"# Layer-streaming compression of a synthetic {r['params_before'] / 1e9:.2f}B Llama-shaped model",
        "",
        "Random weights, float32, one safetensors shard per decoder layer, built by `benchmarks/make_synthetic.py` "
        "into a temporary folder (never committed). Produced by `benchmarks/streaming_memory.py`.",
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| parameters before / after (sparsity {r['sparsity']}) | {r['params_before'] / 1e9:.3f}B / "
        f"{r['params_after'] / 1e9:.3f}B |",
        f"| float32 size on disk | {r['bytes_on_disk'] / 2**30:.2f} GiB |",
        f"| sliced size on disk | {r['sliced_bytes_on_disk'] / 2**30:.2f} GiB |",
        f"| **peak resident memory of the compressing process** | **{r['peak_rss_bytes'] / 2**30:.2f} GiB** |",
        f"| peak memory / size on disk | **{r['peak_rss_share_of_disk_size']:.1%}** (target <= 35%) |",
        f"| wall time | {r['wall_seconds']:.0f} s on {r['cpu_count']} CPU cores |",
        f"| calibration | {c['samples']} samples, {c['tokens']} tokens (max length {c['max_seqlen']}), "
        f"batch {c['batch_size']} |",
        f"| activation budget | {r['activations_max_memory']} in RAM "
        f"({c.get('activations_spilled_to_disk', 0)} tensors spilled to memory-mapped files) |",
        "",
        f"Command: `{r['command']}`",
        "",
        "Peak memory is `ru_maxrss` of the child process, so it includes the Python, torch and transformers "
        "runtime (about 0.7 GiB before any weight is loaded).",
    ]
    out.parent.joinpath(out.name + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
