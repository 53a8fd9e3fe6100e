"""What the measured allocator (``--schedule auto``) scored: every candidate plan's KL, its true
parameter count, the measured layer sensitivities and the search's cost.

Runs ``slicelm slice MODEL --target-params T --plan-only`` (the plan is decided, nothing is sliced)
and tabulates the plan's ``planning`` report, or tabulates a plan file written that way before
(``--from-plan``). Writes ``docs/results/auto_candidates_<label>.{json,md}``.

    python benchmarks/auto_candidates.py --target 0.85                      # SmolLM2, C4 64 x 1024
    python benchmarks/auto_candidates.py --from-plan plan.json --label smollm2_0.85 --command "..."
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def run_plan_only(model: str, target: float, samples: int, seqlen: int, out: Path) -> str:
    command = [
        "slicelm", "slice", model, "--target-params", str(target), "--calib", "c4",
        "--calib-samples", str(samples), "--calib-seqlen", str(seqlen), "--plan-only", "--out", str(out),
    ]  # fmt: skip
    subprocess.run([sys.executable, "-m", "slicelm", *command[1:]], check=True)
    return " ".join(command)


def table(plan: dict, command: str) -> tuple[dict, str]:
    report = plan["planning"]
    dense = plan["model"]["params"]
    rows = sorted(report["candidates"], key=lambda c: c["score"])
    data = {
        "command": command,
        "dense_params": dense,
        "chosen": report["chosen"],
        "target_params": report.get("target_params"),
        "score": report["score"],
        "score_tokens": report["score_tokens"],
        "search_tokens": report["search_tokens"],
        "evaluations": report["evaluations"],
        "search_seconds": report["search_seconds"],
        "candidates": rows,
        "layer_sensitivity": report.get("layer_sensitivity"),
        "attention_sensitivity": report.get("attention_sensitivity"),
    }
    lines = [
        f"# Measured allocator candidates ({report['chosen']} chosen)",
        "",
        f"Command: `{command}`.",
        f"Score: {report['score']}, on {report['score_tokens']:,} held-out calibration tokens; refits of every "
        f"candidate on {report['search_tokens']:,} other calibration tokens; {report['evaluations']} end-to-end "
        f"evaluations in {report['search_seconds']:.0f} s (wall clock on this machine, shared).",
        "",
        "| candidate | KL per token | parameters | of dense |",
        "|---|---:|---:|---:|",
    ]
    for c in rows:
        mark = " **(chosen)**" if c["name"] == report["chosen"] else ""
        lines.append(f"| {c['name']}{mark} | {c['score']:.4f} | {c['params']:,} | {c['params'] / dense:.4f} |")
    for key, title in (("layer_sensitivity", "MLP"), ("attention_sensitivity", "attention removal")):
        values = report.get(key)
        if values:
            lines += ["", f"{title} sensitivity by layer (KL per token, that layer alone): "
                      + ", ".join(f"{v:.3g}" for v in values)]  # fmt: skip
    return data, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=1024)
    parser.add_argument("--from-plan", type=Path, help="tabulate a plan written by --plan-only")
    parser.add_argument("--command", default=None, help="the command that wrote --from-plan")
    parser.add_argument("--label", default=None)
    args = parser.parse_args()
    if args.from_plan:
        plan_file, command = args.from_plan, args.command or f"(plan file {args.from_plan})"
    else:
        plan_file = Path(tempfile.mkdtemp()) / "plan.json"
        command = run_plan_only(args.model, args.target, args.calib_samples, args.calib_seqlen, plan_file)
    plan = json.loads(plan_file.read_text())
    label = args.label or f"{args.model.replace('-', '_')}_{args.target:g}"
    data, markdown = table(plan, command)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"auto_candidates_{label}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"auto_candidates_{label}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
