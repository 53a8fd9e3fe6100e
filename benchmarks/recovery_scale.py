"""Peak memory of a KD LoRA run, before and after the blocked losses (issue 22's memory evidence).

Runs ``slicelm finetune BASE --loss kd`` for a few steps under ``benchmarks/peak_rss.py`` (the
process's own peak resident set) with the slicelm sources of a git revision (``--rev``, extracted
with ``git archive``) or of this checkout, and records the peak, the wall-clock and the run's
settings under a label:

    slicelm slice smollm2-135m --sparsity 0.25 --calib-samples 16 --calib-seqlen 512 --out runs/recovery/base-25
    python benchmarks/recovery_scale.py --base runs/recovery/base-25 --label before --rev 77969e6
    python benchmarks/recovery_scale.py --base runs/recovery/base-25 --label after-chunking --rev bb6a328
    python benchmarks/recovery_scale.py --base runs/recovery/base-25 --label final-checkpointing --rev 6713c35 \
        --extra --gradient-checkpointing on

    python benchmarks/recovery_scale.py --base runs/recovery/base-25 --label after-2-processes --rev cd6a84b \
        --extra --num-processes 2

(``OMP_NUM_THREADS=1``; ``--note`` says what a label measures. With several processes the peak is the
largest process's: ``ru_maxrss`` of the children.)

One process against data-parallel and sharded processes at the same global batch and seed, each
output scored by ``slicelm ppl`` on the first ``--ppl-windows`` WikiText-2 test windows of 2048:

    for extra in "" "--num-processes 2" "--num-processes 2 --fsdp"; do
        python benchmarks/recovery_scale.py --base runs-local/plain-0.85 --label ... --steps 8 --eval-every 2 \
            --ppl-windows 16 --extra $extra
    done

Writes docs/results/recovery_scale.{json,md} (entries are merged by label).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
NAME = "recovery_scale"


def sources(rev: str | None, scratch: Path) -> Path:
    """The src folder to put on PYTHONPATH: this checkout's, or a revision's extracted copy."""
    if rev is None:
        return REPO / "src"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(scratch)], input=archive.stdout, check=True)
    return scratch / "src"


def measure(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        src = sources(args.rev, scratch)
        out = scratch / "out"
        cmd = [sys.executable, "-m", "slicelm", "finetune", args.base, "--out", out, "--loss", "kd"]
        cmd += ["--data", "c4", "--data-dir", args.data_dir, "--steps", args.steps, "--seqlen", args.seqlen]
        cmd += ["--batch-size", args.batch_size, "--eval-windows", args.eval_windows]
        cmd += ["--eval-every", args.eval_every or args.steps]
        cmd += ["--quiet", *args.extra]
        env = os.environ | {"PYTHONPATH": str(src), "TOKENIZERS_PARALLELISM": "false"}
        t0 = time.perf_counter()
        run = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "peak_rss.py"), *map(str, cmd)],
            env=env,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t0
        if run.returncode != 0:
            sys.exit(f"finetune failed ({run.returncode}):\n{run.stderr[-3000:]}")
        peak = int(run.stdout.strip().splitlines()[-1])
        finetune = json.loads((out / "slicelm_report.json").read_text())["finetune"]
        scored = {}
        if args.ppl_windows:
            ppl = [sys.executable, "-m", "slicelm", "ppl", str(out), "--max-windows", str(args.ppl_windows)]
            ppl += ["--data-dir", args.data_dir, "--quiet"]
            t0 = time.perf_counter()
            done = subprocess.run(ppl, env=env, capture_output=True, text=True, check=True)
            scored = json.loads(done.stdout.strip().splitlines()[-1])
            scored = {"ppl": scored["ppl"], "ppl_windows": args.ppl_windows, "ppl_seconds": time.perf_counter() - t0}
    return scored | {
        "label": args.label,
        "note": args.note,
        "rev": args.rev or "working tree",
        "command": "slicelm " + " ".join(str(c) for c in cmd[3:]),
        "peak_rss_bytes": peak,
        "peak_rss_gib": round(peak / 2**30, 2),
        "wall_seconds": round(seconds, 1),
        "steps": finetune["steps"],
        "tokens": finetune["tokens"],
        "batch": f"{args.batch_size} x {args.seqlen}",
        "eval_windows": args.eval_windows,
        "gradient_checkpointing": finetune.get("gradient_checkpointing"),
        "processes": finetune.get("processes", 1),
        "distributed": finetune.get("distributed", "single"),
        "finetune_seconds": finetune.get("seconds"),
        "tokens_per_process": finetune.get("tokens_per_process"),
        "curve": finetune["curve"],
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "machine": platform.processor() or platform.machine(),
    }


def write_markdown(data: dict) -> None:
    lines = [
        "# Recovery at scale: peak memory of distillation",
        "",
        "Produced by `benchmarks/recovery_scale.py`: `slicelm finetune BASE --loss kd` (LoRA rank 32, teacher the "
        "recorded dense SmolLM2-135M, float32, CPU) for a few steps at batch 4 x 512, peak resident memory of the "
        "process (`ru_maxrss`, via `benchmarks/peak_rss.py`). Every step allocates the same; before training fixed "
        "glibc's mmap threshold the resident set still grew from step to step (freed activations stayed in the "
        "heap), so two steps show the difference; after it, a short run measures the peak.",
        "",
        "| label | what | sources | processes | peak RSS (GiB) | steps | tokens | held-out windows "
        "| gradient checkpointing | wall (s) | train loss | held-out KD before -> after |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for entry in data["runs"]:
        lines.append(
            f"| {entry['label']} | {entry.get('note', '')} | {entry['rev']} | {entry.get('processes', 1)} "
            f"| {entry['peak_rss_gib']:.2f} | {entry['steps']} "
            f"| {entry['tokens']:,} | {entry['eval_windows']} | {entry['gradient_checkpointing']} "
            f"| {entry['wall_seconds']:.0f} | {entry['curve'][-1].get('train_loss', float('nan')):.6f} "
            f"| {entry['curve'][0].get('heldout_kd', float('nan')):.6f} -> "
            f"{entry['curve'][-1].get('heldout_kd', float('nan')):.6f} |"
        )
    lines += [
        "",
        "Wall-clock is of a shared 2-core machine (other jobs ran alongside), so it compares runs only roughly. "
        "The base folders differ between `before` (made earlier; how it was calibrated was not recorded) and the rest "
        "(`slicelm slice smollm2-135m --sparsity 0.25 --calib-samples 16 --calib-seqlen 512`); memory does not "
        "depend on the calibration, the held-out losses do. With `--num-processes 2` the peak is the largest "
        "process's (each holds the student, the teacher and half the batch's activations).",
        "",
        "Commands:",
        "",
    ]
    lines += [f"- {e['label']}: `{e['command']}`" for e in data["runs"]]
    lines += processes_table([e for e in data["runs"] if "ppl" in e])
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines) + "\n")


def processes_table(runs: list[dict]) -> list[str]:
    """One process against data-parallel (DDP) and sharded (FSDP) processes: curves, perplexity, time."""
    if not runs:
        return []
    lines = [
        "",
        "## One process, DDP and FSDP at the same global batch and seed",
        "",
        f"Base `{Path(runs[0]['command'].split()[2]).name}`; the same command, run on 1 process, on 2 gloo processes "
        "data-parallel (`--num-processes 2`) and on 2 gloo processes sharded (`--num-processes 2 --fsdp`: each "
        "process holds half of every weight of the student, torch's FSDP2). Perplexity: `slicelm ppl` of the merged "
        "output, WikiText-2 test, first windows of 2048 as stated. Each process ran on one thread "
        "(`OMP_NUM_THREADS=1`) of a shared 2-core machine: wall-clock compares the runs only roughly. Losses are "
        "printed to 5 decimals; the JSON holds them whole (they agree to about 1e-7, the order of float sums). "
        "Without `--gradient-checkpointing on` the resident set of one process grows from step to step (glibc keeps "
        "freed activations in its heap, see above), so a 4-step run peaks higher than the 2-step rows above; the "
        "sharded processes hold half of the student each, which at 135M parameters is small beside the teacher, "
        "held whole by each process, and the activations.",
        "",
        "| label | what | processes | mode | tokens (per process) | train loss at evaluations | held-out KD by "
        "evaluation | WikiText-2 ppl (windows) | peak RSS GiB (largest process) | finetune s |",
        "|---|---|---:|---|---|---|---|---:|---:|---:|",
    ]
    for e in runs:
        train = ", ".join(f"{p['train_loss']:.5f}" for p in e["curve"] if "train_loss" in p)
        kd = ", ".join(f"{p['heldout_kd']:.5f}" for p in e["curve"] if "heldout_kd" in p)
        per = " + ".join(f"{t:,}" for t in e.get("tokens_per_process") or [e["tokens"]])
        lines.append(
            f"| {e['label']} | {e.get('note', '')} | {e['processes']} | {e.get('distributed', 'single')} "
            f"| {e['tokens']:,} ({per}) "
            f"| {train} | {kd} | {e['ppl']:.3f} ({e['ppl_windows']}) | {e['peak_rss_gib']:.2f} "
            f"| {e.get('finetune_seconds') or e['wall_seconds']:.0f} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="a sliced SmolLM2 folder (slicelm slice smollm2-135m ...)")
    p.add_argument("--label", required=True)
    p.add_argument("--note", default="", help="what this label measures (for the table)")
    p.add_argument("--rev", default=None, help="git revision whose src/ to measure (default: this checkout)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: --steps)")
    p.add_argument("--ppl-windows", type=int, default=0, help="score the output on this many WikiText-2 windows")
    p.add_argument("--data-dir", default=os.environ.get("SLICELM_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more finetune flags")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    path = RESULTS / f"{NAME}.json"
    data = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    if not args.report_only:
        entry = measure(args)
        data["runs"] = [e for e in data["runs"] if e["label"] != args.label] + [entry]
        path.write_text(json.dumps(data, indent=2) + "\n")
    write_markdown(data)


if __name__ == "__main__":
    main()
