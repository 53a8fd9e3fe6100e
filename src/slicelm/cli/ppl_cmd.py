"""``slicelm ppl``: perplexity of a model (original or sliced) on a test text, printed as JSON."""

from __future__ import annotations

import argparse
import time

from slicelm.cli.common import add_device_argument, fit_batch_size, quiet_libraries
from slicelm.errors import SlicelmError

DEFAULT_SEQLEN = 2048


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    # imported when the parser is built, not when this module is: the module itself stays free of torch
    from slicelm.io.names import DATA_DIR_ENV, DEFAULT_MODEL, DTYPE_NAMES, EVAL_SETS

    parser = subparsers.add_parser(
        "ppl",
        help="perplexity on WikiText-2 / PTB / C4 test text",
        description="Perplexity over non-overlapping windows of the test text (GPTQ/SliceGPT protocol). "
        "Prints one JSON object on stdout.",
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        metavar="MODEL_OR_DIR",
        help=f"alias, .gguf file, model folder (sliced or not) or hub id (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--dataset", default="wikitext2", help=f"one of {', '.join(EVAL_SETS)} (default: wikitext2)")
    parser.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN, help="tokens per window (default: 2048)")
    parser.add_argument("--max-windows", type=int, default=None, help="score only the first W windows (default: all)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="windows per forward pass (default 1; a larger one must fit in the memory available)",
    )
    parser.add_argument(
        "--score-from",
        type=int,
        default=0,
        help="score only predictions from this position of each window on (default 0: all; llama.cpp's "
        "llama-perplexity scores the second half, i.e. seqlen/2)",
    )
    parser.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPE_NAMES)} (default: float32)")
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"offline data folder (default: ${DATA_DIR_ENV}, else download from the Hugging Face hub)",
    )
    add_device_argument(parser, "run the model")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    quiet_libraries(progress=not args.quiet)
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.core.devices import resolve_device
    from slicelm.io.data import EVAL_SETS, load_eval_ids, resolve_data_dir
    from slicelm.io.models import load_config, load_model, parse_dtype, resolve_source
    from slicelm.io.outputs import to_json
    from slicelm.measure.perplexity import perplexity

    # Check everything cheap before loading a model, so mistakes fail in a second.
    if args.dataset not in EVAL_SETS:
        raise SlicelmError(f"unknown dataset {args.dataset!r}; use one of {', '.join(EVAL_SETS)}")
    if args.seqlen < 2:
        raise SlicelmError(f"--seqlen must be at least 2, got {args.seqlen}")
    if args.max_windows is not None and args.max_windows < 1:
        raise SlicelmError(f"--max-windows must be at least 1, got {args.max_windows}")
    if args.batch_size is not None and args.batch_size < 1:
        raise SlicelmError(f"--batch-size must be at least 1, got {args.batch_size}")
    dtype = parse_dtype(args.dtype)
    device = resolve_device(args.device)
    data_dir = resolve_data_dir(args.data_dir)
    source = resolve_source(args.model)
    model_config = load_config(source)
    max_positions = getattr(model_config, "max_position_embeddings", None)
    if max_positions is not None and args.seqlen > max_positions:
        raise SlicelmError(
            f"--seqlen {args.seqlen} is longer than the model's {max_positions} positions; lower --seqlen"
        )
    if device.type == "cpu":  # the memory preflight; on a GPU the device's memory decides (untested)
        args.batch_size = fit_batch_size(model_config, dtype, args.seqlen, args.batch_size, 1, "--batch-size")
    args.batch_size = args.batch_size or 1

    model, tokenizer = load_model(source, dtype=dtype)
    ids = load_eval_ids(args.dataset, tokenizer, data_dir)
    model.to(device)

    start = time.perf_counter()
    result = perplexity(
        model,
        ids,
        seqlen=args.seqlen,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        progress=not args.quiet,
        score_from=args.score_from,
    )
    report = {
        "model": args.model,
        "dataset": args.dataset,
        "data_dir": str(data_dir) if data_dir else None,
        "dtype": args.dtype,
        "device": str(device),
        "seqlen": result.seqlen,
        "score_from": args.score_from,
        "windows": result.windows,
        "tokens": result.tokens,
        "nll": result.nll,
        "ppl": result.ppl,
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(to_json(report, indent=None))
    return 0
