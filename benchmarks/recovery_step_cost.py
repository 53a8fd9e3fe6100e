"""Where a recovery step's time goes: student, teacher and the two losses, measured separately.

One sliced student (LoRA rank 32 on every block linear, as ``slicelm finetune`` trains it), its dense
teacher and one batch of random tokens; each piece is timed --repeats times after a warm-up and the
median is reported. This is the measurement behind computing the teacher's logits on the fly
(rather than caching its top-k): the teacher's forward is a minority of a KD step.

    python benchmarks/recovery_step_cost.py --student runs/recovery/base-25

Writes docs/results/recovery_step_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
from speed import timed  # benchmarks/speed.py: warm-up, then wall-clock per repeat

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"


def main() -> None:
    from slicelm.io.models import load_model, resolve_source
    from slicelm.recover.config import FinetuneConfig
    from slicelm.recover.losses import kd_loss, lm_loss
    from slicelm.recover.student import prepare_student
    from slicelm.recover.teacher import recorded_source

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default=str(REPO / "runs" / "recovery" / "base-25"))
    p.add_argument("--teacher", default=None, help="default: the source the student's folder records")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--report-only", action="store_true", help="rewrite the markdown from the stored JSON")
    args = p.parse_args()
    if args.report_only:
        write_markdown(json.loads((RESULTS / "recovery_step_cost.json").read_text()))
        return
    torch.manual_seed(0)
    student, _ = load_model(resolve_source(args.student), dtype=torch.float32)
    teacher_name = args.teacher or recorded_source(args.student)
    teacher, _ = load_model(teacher_name, dtype=torch.float32)
    teacher.eval()
    model = prepare_student(student, FinetuneConfig(loss="kd", lora_rank=32))
    model.train()
    vocab = student.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch_size, args.seqlen))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        target = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
    free = torch.randn(args.batch_size, args.seqlen, vocab, requires_grad=True)

    def forward(m):
        return m(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def student_no_grad():
        with torch.no_grad():
            forward(model)

    def teacher_forward():
        with torch.no_grad():
            forward(teacher)

    def lm_step():
        lm_loss(forward(model), ids, mask).backward()

    def kd_step():
        kd_loss(forward(model)[:, :-1], target[:, :-1], mask[:, 1:], 1.0).backward()

    def lm_loss_alone():
        lm_loss(free, ids, mask).backward()

    def kd_loss_alone():
        kd_loss(free[:, :-1], target[:, :-1], mask[:, 1:], 1.0).backward()

    pieces = {
        "student forward (no grad)": student_no_grad,
        "teacher forward (no grad)": teacher_forward,
        "lm step: student forward + backward + loss": lm_step,
        "kd step without the teacher: student forward + backward + KL": kd_step,
        "lm loss alone (forward + backward on fixed logits)": lm_loss_alone,
        "kd loss alone (forward + backward on fixed logits)": kd_loss_alone,
    }
    seconds = {}
    for name, fn in pieces.items():
        seconds[name] = statistics.median(timed(fn, args.repeats))
        model.zero_grad(set_to_none=True)
        print(f"[step-cost] {name}: {seconds[name]:.2f}s", flush=True)
    lm = seconds["lm step: student forward + backward + loss"]
    kd = seconds["kd step without the teacher: student forward + backward + KL"] + seconds["teacher forward (no grad)"]
    result = {
        "settings": vars(args) | {"teacher": teacher_name, "threads": torch.get_num_threads()},
        "machine": platform.processor() or platform.machine(),
        "seconds": seconds,
        "kd_step_seconds": kd,
        "kd_over_lm": kd / lm,
        "teacher_share_of_kd_step": seconds["teacher forward (no grad)"] / kd,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recovery_step_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result)


def write_markdown(result: dict) -> None:
    settings, seconds = result["settings"], result["seconds"]
    kd, lm = result["kd_step_seconds"], seconds["lm step: student forward + backward + loss"]
    lines = [
        "# Cost of one recovery step",
        "",
        f"Produced by `benchmarks/recovery_step_cost.py`: student `{settings['student']}` with LoRA rank 32, teacher "
        f"`{settings['teacher']}`, one batch of {settings['batch_size']} x {settings['seqlen']} tokens, float32, "
        f"{settings['threads']} CPU threads; median of {settings['repeats']} after a warm-up.",
        "",
        "| piece | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {value:.2f} |" for name, value in seconds.items()]
    lines += [
        "",
        f"A KD step (teacher forward + student step with KL) takes {kd:.2f}s against an LM step's {lm:.2f}s "
        f"({kd / lm:.2f}x); the teacher's forward is {result['teacher_share_of_kd_step']:.0%} of it. The rest of the "
        "difference is the full-vocabulary KL (forward and backward) against a cross-entropy. Caching the teacher's "
        "(top-k) logits would not remove the teacher's forward from a one-pass run, since every training window is "
        "seen once and needs the teacher once either way; it pays only when the same windows are reused (several runs "
        "or epochs), so slicelm computes them on the fly. The held-out windows *are* reused at every evaluation: their "
        "KD targets are computed once per run and cached.",
    ]
    (RESULTS / "recovery_step_cost.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
