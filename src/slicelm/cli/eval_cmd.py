"""``slicelm eval MODEL --tasks ...``: zero-shot accuracy of a dense or sliced model via lm-eval."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

from slicelm.cli.common import add_device_argument, fit_batch_size, quiet_libraries
from slicelm.errors import SlicelmError

DATA_DIR_ENV = "SLICELM_DATA_DIR"


def parse_limit(text: str) -> int | float:
    """``100`` -> 100 documents per task; ``0.1`` -> 10% of each task (lm-eval's convention)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if value >= 1:
        if value != int(value):
            raise argparse.ArgumentTypeError(f"a count must be a whole number, got {text}")
        return int(value)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


DEFAULT_EVAL_BATCH = 8


def add_common_arguments(parser: argparse.ArgumentParser, batch_flag: str = "--batch-size") -> None:
    """Flags shared by ``eval`` and ``sweep`` (where the lm-eval batch size is ``--eval-batch-size``)."""
    # imported when the parser is built, not when this module is: the module itself stays free of torch
    from slicelm.measure.evaluation.tasks import PAPER_TASKS

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
    parser.add_argument(
        batch_flag,
        dest="eval_batch_size",
        type=int,
        default=DEFAULT_EVAL_BATCH,
        help=f"lm-eval batch size (default: {DEFAULT_EVAL_BATCH}, or fewer if they would not fit in memory)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"offline data folder with the task files (default: ${DATA_DIR_ENV}; if unset, download "
        "lm-eval's stock datasets from the Hugging Face hub)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    add_device_argument(parser, "run the model")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="zero-shot accuracy with lm-evaluation-harness",
        description="Run lm-evaluation-harness zero-shot tasks on a dense or sliced model and print, as one "
        "JSON object, the metric the SliceGPT paper reports for each task and their average.",
    )
    # imported when the parser is built, not when this module is: the module itself stays free of torch
    from slicelm.io.names import DEFAULT_MODEL

    parser.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"model alias, .gguf file, model folder (dense or sliced) or hub id (default {DEFAULT_MODEL})",
    )
    add_common_arguments(parser)
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON object to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if slicelm wrote it before")
    parser.set_defaults(run=run)


def data_dir_from(args: argparse.Namespace) -> str | None:
    """``--data-dir``, else ``$SLICELM_DATA_DIR``, else ``../shared/data`` beside a checkout, else None (the hub)."""
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.io.data import resolve_data_dir

    found = resolve_data_dir(args.data_dir)
    return str(found) if found is not None else None


def pick_device(name: str | None):
    """``--device``: default cuda when available, else cpu; an unavailable device is one line."""
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.core.devices import resolve_device

    return resolve_device(name)


EVAL_CONTEXT = 1024  # tokens of the longest request a batch of the supported tasks pads to (an upper bound)


def fit_eval_batch(args: argparse.Namespace, device) -> int:
    """The memory preflight of ``slice``, for lm-eval's batches: an explicit --batch-size that would not
    fit is refused before loading; the default is lowered to what fits (CPU only; GPUs untested)."""
    if getattr(device, "type", str(device).split(":")[0]) != "cpu":
        return args.eval_batch_size
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.io.models import load_config, parse_dtype, resolve_source

    model_config = load_config(resolve_source(args.model))
    positions = getattr(model_config, "max_position_embeddings", None) or EVAL_CONTEXT
    explicit = None if args.eval_batch_size == DEFAULT_EVAL_BATCH else args.eval_batch_size
    seqlen = min(EVAL_CONTEXT, positions)
    return fit_batch_size(model_config, parse_dtype(args.dtype), seqlen, explicit, DEFAULT_EVAL_BATCH, "--batch-size")


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.io.models import load_model
    from slicelm.io.outputs import check_output_file, to_json, write_result_file
    from slicelm.measure.evaluation import evaluate_zeroshot, resolve_tasks
    from slicelm.measure.evaluation.tasks import check_local_data

    tasks = resolve_tasks(args.tasks)
    data_dir = data_dir_from(args)
    if data_dir is not None:  # fail on missing files before spending time loading the model
        for task in tasks:
            check_local_data(task, data_dir)
    if args.eval_batch_size < 1:
        raise SlicelmError(f"--batch-size must be at least 1, got {args.eval_batch_size}")
    device = pick_device(args.device)
    output = None
    if args.output is not None:  # checked now: finding out after the evaluation would lose it
        output = check_output_file(args.output, args.overwrite)

    args.eval_batch_size = fit_eval_batch(args, device)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    model.to(device)
    # lm-eval prints progress notes to stdout; keep stdout for the JSON object alone.
    with contextlib.redirect_stdout(sys.stderr):
        summary = evaluate_zeroshot(
            model,
            tokenizer,
            tasks,
            limit=args.limit,
            batch_size=args.eval_batch_size,
            data_dir=data_dir,
            model_name=args.model,
        )

    print(to_json(summary), flush=True)  # first: whatever happens to --output, the result is not lost
    if output is not None:
        try:
            write_result_file(output, summary)
        except OSError as exc:
            raise SlicelmError(
                f"could not write --output {output} ({exc.strerror or exc}); the result is above"
            ) from None
    return 0
