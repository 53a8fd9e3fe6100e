"""``slicelm eval MODEL --tasks ...``: zero-shot accuracy of a dense or sliced model via lm-eval."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from slicelm.errors import SlicelmError

DATA_DIR_ENV = "SLICELM_DATA_DIR"


def parse_limit(text: str) -> int | float:
    """``100`` -> 100 documents per task; ``0.1`` -> 10% of each task (lm-eval's convention)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value >= 1:
        if value != int(value):
            raise argparse.ArgumentTypeError(f"a count must be a whole number, got {text}")
        return int(value)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``eval`` and ``sweep``."""
    from slicelm.evaluation.tasks import PAPER_TASKS

    parser.add_argument(
        "--tasks",
        default=",".join(PAPER_TASKS),
        help="comma-separated tasks: piqa, winogrande, hellaswag, arc_easy, arc_challenge, openbookqa, "
        "boolq, lambada (default: the seven SliceGPT tasks)",
    )
    parser.add_argument(
        "--limit",
        type=parse_limit,
        default=None,
        help="score only the first N documents of each task (or a fraction < 1); default: all",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default: 8)")
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"offline data folder with the task files (default: ${DATA_DIR_ENV}; if unset, download "
        "lm-eval's stock datasets from the Hugging Face hub)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="zero-shot accuracy with lm-evaluation-harness",
        description="Run lm-evaluation-harness zero-shot tasks on a dense or sliced model and print, as one "
        "JSON object, the metric the SliceGPT paper reports for each task and their average.",
    )
    parser.add_argument("model", help="model alias, .gguf file, model folder (dense or sliced) or hub id")
    add_common_arguments(parser)
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON object to this file")
    parser.set_defaults(run=run)


def data_dir_from(args: argparse.Namespace) -> str | None:
    """``--data-dir``, else ``$SLICELM_DATA_DIR``, else None (the hub)."""
    return args.data_dir or os.environ.get(DATA_DIR_ENV) or None


def pick_device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SlicelmError(f"unknown device {name!r}; use e.g. cpu or cuda") from None


def run(args: argparse.Namespace) -> int:
    from slicelm.evaluation import evaluate_zeroshot, resolve_tasks
    from slicelm.evaluation.tasks import check_local_data
    from slicelm.models import load_model

    tasks = resolve_tasks(args.tasks)
    data_dir = data_dir_from(args)
    if data_dir is not None:  # fail on missing files before spending time loading the model
        for task in tasks:
            check_local_data(task, data_dir)
    if args.batch_size < 1:
        raise SlicelmError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = pick_device(args.device)

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    model.to(device)
    # lm-eval prints progress notes to stdout; keep stdout for the JSON object alone.
    with contextlib.redirect_stdout(sys.stderr):
        summary = evaluate_zeroshot(
            model,
            tokenizer,
            tasks,
            limit=args.limit,
            batch_size=args.batch_size,
            data_dir=data_dir,
            model_name=args.model,
        )
    text = json.dumps(summary, indent=2)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    print(text)
    return 0
