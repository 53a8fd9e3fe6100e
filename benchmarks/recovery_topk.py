"""Exact distillation against the teacher's top-k (``--kd-top-k``), at equal tokens (issue 22, bounded KD memory).

Runs ``slicelm finetune BASE --loss kd`` (LoRA) on the same base, data, seed and steps with the exact KL
over the whole vocabulary and with ``--kd-top-k K``, ``--repeats`` (2) times each in the order exact,
top-k, top-k, exact (a repeat measures only time and memory: its losses are the same), each under
``benchmarks/peak_rss.py``, and records per run: wall-clock, CPU time (user + system of the command and
its children, less sensitive than wall-clock to the other jobs of a shared machine), peak resident
memory, the teacher's seconds, the train loss, the held-out KD and next-token losses on the held-out
windows of the training text (both scored with the exact KL, whatever the training loss) and WikiText-2
test perplexity on the first few 2048-token windows
(``--monitor-ppl``), and the machine's load before and after:

    slicelm slice smollm2-135m --mlp-sparsity 0.25 --layout plain --calib-samples 16 --calib-seqlen 512 \\
        --out /work/tmp/topk/base-mlp25
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/recovery_topk.py --base /work/tmp/topk/base-mlp25

Writes docs/results/recovery_topk.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
NAME = "recovery_topk"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant, grandchildren included
    return usage.ru_utime + usage.ru_stime


def measure(args: argparse.Namespace, label: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="slicelm-topk-") as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "slicelm", "finetune", args.base, "--out", out, "--loss", "kd"]
        cmd += ["--data", "c4", "--data-dir", args.data_dir, "--steps", args.steps, "--seqlen", args.seqlen]
        cmd += ["--batch-size", args.batch_size, "--eval-windows", args.eval_windows, "--eval-every", args.steps]
        cmd += ["--lr", args.lr, "--monitor-ppl", args.ppl_windows, "--quiet", *extra]
        env = os.environ | {"PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false"}
        load_before, cpu_before = uptime(), children_cpu()
        t0 = time.perf_counter()
        run = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "peak_rss.py"), *map(str, cmd)],
            env=env,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t0
        cpu = children_cpu() - cpu_before
        if run.returncode != 0:
            sys.exit(f"finetune failed ({run.returncode}):\n{run.stderr[-3000:]}")
        peak = int(run.stdout.strip().splitlines()[-1])
        finetune = json.loads((out / "slicelm_report.json").read_text())["finetune"]
    first, last = finetune["curve"][0], finetune["curve"][-1]
    return {
        "label": label,
        "command": "slicelm " + " ".join(str(c) for c in cmd[3:]),
        "kd_top_k": finetune["config"].get("kd_top_k"),
        "wall_seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
        "train_seconds": round(finetune["seconds"], 1),
        "teacher_seconds": round(finetune["teacher_seconds"], 1),
        "peak_rss_bytes": peak,
        "peak_rss_gib": round(peak / 2**30, 3),
        "steps": finetune["steps"],
        "tokens": finetune["tokens"],
        "teacher_top_k": finetune.get("teacher_top_k", {}),
        "train_loss": last.get("train_loss"),
        "heldout_kd": [first.get("heldout_kd"), last.get("heldout_kd")],
        "heldout_lm": [first.get("heldout_lm"), last.get("heldout_lm")],
        "wikitext2_ppl": [first.get("wikitext2_ppl"), last.get("wikitext2_ppl")],
        "curve": finetune["curve"],
        "load_before": load_before,
        "load_after": uptime(),
    }


def write_markdown(data: dict) -> None:
    s = data["settings"]
    lines = [
        "# Exact distillation against the teacher's top-k, at equal tokens",
        "",
        "Produced by `benchmarks/recovery_topk.py`: `slicelm finetune BASE --loss kd` (LoRA rank 32) on the same "
        f"base, C4 windows, seed and steps with the exact KL over the vocabulary and with `--kd-top-k {s['k']}`: "
        f"{s['steps']} steps of {s['batch_size']} x {s['seqlen']} tokens, lr {s['lr']}, float32 on the CPU, "
        f"`OMP_NUM_THREADS={s['threads']}`, `nice -n 10`, one run after the other in the order of the table "
        "(the same settings give the same losses, so a repeat measures only the time and memory). "
        f"Base: `{s['base']}` ({s['base_made_by']}). Held-out: the first {s['eval_windows']} windows of "
        f"{s['seqlen']} tokens of the training text (never trained on), scored with the exact KL in both runs; "
        f"WikiText-2 test perplexity on its first {s['ppl_windows']} windows of 2048 tokens. Machine: "
        f"{s['machine']}, 2 cores shared with other jobs.",
        "",
        "| run | tokens | wall (s) | CPU (s) | teacher (s) | peak RSS (GiB) | train loss | held-out KD | "
        "held-out next-token | WikiText-2 ppl | load before / after |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for e in data["runs"]:
        kd, lm, ppl = e["heldout_kd"], e["heldout_lm"], e["wikitext2_ppl"]
        load = [x.split("load average:")[-1].strip() for x in (e["load_before"], e["load_after"])]
        lines.append(
            f"| {e['label']} | {e['tokens']:,} | {e['wall_seconds']:.0f} | {e['cpu_seconds']:.0f} "
            f"| {e['teacher_seconds']:.0f} | {e['peak_rss_gib']:.2f} | {e['train_loss']:.4f} "
            f"| {kd[0]:.4f} -> {kd[1]:.4f} | {lm[0]:.4f} -> {lm[1]:.4f} | {ppl[0]:.2f} -> {ppl[1]:.2f} "
            f"| {load[0]} / {load[1]} |"
        )
    lines += ["", "Means over each variant's runs:", ""]
    for label in dict.fromkeys(e["label"] for e in data["runs"]):
        runs = [e for e in data["runs"] if e["label"] == label]
        mean = {key: sum(e[key] for e in runs) / len(runs) for key in ("wall_seconds", "cpu_seconds", "peak_rss_gib")}
        peaks = ", ".join(f"{e['peak_rss_gib']:.2f}" for e in runs)
        lines.append(
            f"- {label} ({len(runs)} runs): wall {mean['wall_seconds']:.0f} s, CPU {mean['cpu_seconds']:.0f} s, "
            f"peak RSS {mean['peak_rss_gib']:.2f} GiB (runs {peaks})"
        )
    lines += [
        "",
        "The train loss is each run's own objective: the exact KL, or the KL over the top k and one bucket for the "
        "rest, which is never larger; compare the held-out columns. Wall-clock and CPU time are of a shared "
        "machine (load averages beside each run). Teacher (s) is the report's `teacher_seconds`: for the exact loss "
        "the teacher's forward to its final hidden states (held-out once, then every step; its head is projected "
        "inside the loss, counted in the step), with `--kd-top-k` one pass before the first step that also "
        "projects its head and selects the top k, so the two are not the same work. The top-k cache's size is in "
        "the JSON "
        "(`teacher_top_k.bytes`).",
        "",
        "Commands:",
        "",
    ]
    lines += [f"- {e['label']}: `{e['command']}`" for e in data["runs"]]
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="a sliced SmolLM2 folder (slicelm slice smollm2-135m ...)")
    p.add_argument(
        "--base-made-by",
        default="slicelm slice smollm2-135m --mlp-sparsity 0.25 --layout plain --calib-samples 16 --calib-seqlen 512",
        help="how the base was made (for the page)",
    )
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", default="2e-4")
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--ppl-windows", type=int, default=2)
    p.add_argument("--data-dir", default=os.environ.get("SLICELM_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--repeats", type=int, default=2, help="runs of each, in the order exact, top-k, top-k, exact")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    path = RESULTS / f"{NAME}.json"
    if args.report_only:
        write_markdown(json.loads(path.read_text()))
        return
    settings = {
        "base": args.base,
        "base_made_by": args.base_made_by,
        "k": args.k,
        "steps": args.steps,
        "seqlen": args.seqlen,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "eval_windows": args.eval_windows,
        "ppl_windows": args.ppl_windows,
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    }
    variants = {"exact": [], f"top-{args.k}": ["--kd-top-k", str(args.k)]}
    order = [*variants, *reversed(variants)] * (args.repeats // 2) + [*variants] * (args.repeats % 2)  # ABBA
    runs = [measure(args, label, variants[label]) for label in order]
    data = {"settings": settings, "runs": runs}
    path.write_text(json.dumps(data, indent=2) + "\n")
    write_markdown(data)


if __name__ == "__main__":
    main()
