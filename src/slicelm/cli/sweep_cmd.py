"""``slicelm sweep MODEL --sparsities ...``: slice at several sparsities, measure, tabulate, plot."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path

from slicelm.cli.common import quiet_libraries
from slicelm.cli.eval_cmd import add_common_arguments, data_dir_from
from slicelm.cli.slice_cmd import (
    add_slicing_arguments,
    check_stream_width,
    fit_seqlens,
    slice_config_from,
    validate_slicing_arguments,
)
from slicelm.errors import SlicelmError


def parse_sparsities(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one sparsity")
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"sparsities must be in [0, 1), got {bad[0]}")
    return values


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="slice at several sparsities and measure perplexity and zero-shot accuracy",
        description="Slice MODEL at each sparsity (0 = the dense model, always measured as the reference), "
        "measure perplexity and zero-shot tasks, and write sweep.json, sweep.md and PNG plots to --out. "
        "Every measurement is stored as soon as it is made: rerunning the same command resumes an "
        "interrupted sweep, or only redraws the table and plots of a finished one.",
    )
    # imported when the parser is built, not when this module is: the module itself stays free of torch
    from slicelm.io.names import DEFAULT_MODEL

    parser.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"model alias, .gguf file, model folder or hub id (dense; default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--sparsities", type=parse_sparsities, default=(0.1, 0.2, 0.25, 0.3), help="e.g. 0,0.1,0.2,0.25,0.3"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: sweep-<model name>)")
    add_common_arguments(parser, batch_flag="--eval-batch-size")
    group = parser.add_argument_group("slicing")
    add_slicing_arguments(group, sweep=True)
    group.add_argument(
        "--save-models",
        action="store_true",
        help="keep each slice under OUT/models/ (resuming then reloads it)",
    )
    group = parser.add_argument_group("perplexity")
    group.add_argument(
        "--ppl-dataset", default="wikitext2", help="wikitext2, ptb, c4, or none to skip (default wikitext2)"
    )
    group.add_argument("--ppl-seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    group.add_argument("--ppl-windows", type=int, default=None, help="score only the first N windows (default all)")
    group = parser.add_argument_group("recovery (measure each slice again after fine-tuning it)")
    group.add_argument("--recover", choices=("lm", "kd"), default=None, help="recover each slice with this loss")
    group.add_argument(
        "--recover-tokens",
        type=int,
        default=RECOVERY_DEFAULTS["recover_tokens"],
        help="training tokens (default 131072)",
    )
    group.add_argument("--recover-data", default="c4", help="training text (default c4)")
    group.add_argument("--recover-full", action="store_true", help="full fine-tuning instead of LoRA")
    group.add_argument(
        "--recover-seqlen", type=int, default=RECOVERY_DEFAULTS["recover_seqlen"], help="training window (default 512)"
    )
    parser.set_defaults(run=run)


RECOVERY_DEFAULTS = {"recover_tokens": 131072, "recover_data": "c4", "recover_full": False, "recover_seqlen": 512}


def check_recovery_flags(args: argparse.Namespace) -> None:
    """The --recover-* flags configure --recover: without it they would be ignored, so they are refused."""
    if args.recover is not None:
        return
    given = [k for k, default in RECOVERY_DEFAULTS.items() if getattr(args, k) != default]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise SlicelmError(f"{flag} configures recovery, and no --recover is given; add --recover lm|kd or drop it")


def recovery_config(args: argparse.Namespace):
    """The --recover fine-tuning (None without it), validated now rather than after slicing."""
    if args.recover is None:
        return None
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.recover.config import FinetuneConfig

    return FinetuneConfig(
        loss=args.recover,
        tokens=args.recover_tokens,
        seqlen=args.recover_seqlen,
        lora_rank=None if args.recover_full else 32,
    )


def default_out(model: str) -> Path:
    name = Path(model.rstrip("/")).name or model
    return Path("sweep-" + re.sub(r"[^A-Za-z0-9._-]+", "-", name.removesuffix(".gguf")))


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.io.data import EVAL_SETS
    from slicelm.io.models import load_config, resolve_source
    from slicelm.measure.evaluation import resolve_tasks
    from slicelm.measure.evaluation.tasks import check_local_data
    from slicelm.measure.sweep import SweepConfig, run_sweep

    tasks = [] if args.tasks.strip().lower() in ("", "none") else resolve_tasks(args.tasks)
    data_dir = data_dir_from(args)
    if data_dir is not None:
        for task in tasks:
            check_local_data(task, data_dir)
    validate_slicing_arguments(args)
    check_recovery_flags(args)

    model_config = load_config(resolve_source(args.model))
    fit_seqlens(model_config, args, ("calib_seqlen",))
    for sparsity in args.sparsities:
        check_stream_width(model_config, sparsity, args.round_to, "--sparsities")
    for flag in ("ppl_seqlen", "eval_batch_size"):
        if getattr(args, flag) < 1:
            raise SlicelmError(f"--{flag.replace('_', '-')} must be a positive integer")
    if args.ppl_windows is not None and args.ppl_windows < 1:
        raise SlicelmError("--ppl-windows must be a positive integer")
    ppl_dataset = None if args.ppl_dataset.lower() == "none" else args.ppl_dataset.lower()
    if ppl_dataset is not None:
        if ppl_dataset not in EVAL_SETS:
            raise SlicelmError(f"unknown --ppl-dataset {args.ppl_dataset!r}; use {', '.join(EVAL_SETS)} or none")

    config = SweepConfig(
        model=args.model,
        sparsities=args.sparsities,
        tasks=tuple(tasks),
        limit=args.limit,
        eval_batch_size=args.eval_batch_size,
        data_dir=str(Path(data_dir).expanduser().resolve()) if data_dir else None,
        dtype=args.dtype,
        device=args.device,
        calib=args.calib,
        calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen,
        slicing=slice_config_from(args),
        ppl_dataset=ppl_dataset,
        ppl_seqlen=args.ppl_seqlen,
        ppl_windows=args.ppl_windows,
        save_models=args.save_models,
        recovery=recovery_config(args),
        recovery_data=args.recover_data,
    )
    out = args.out or default_out(args.model)

    def log(message: str) -> None:
        print(f"slicelm sweep: {message}", file=sys.stderr, flush=True)

    with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints notes to stdout
        summary = run_sweep(config, out, log=log)
    print(json.dumps({"out": str(out), "dense": summary["dense"], "points": summary["points"][1:]}, indent=2))
    return 0
