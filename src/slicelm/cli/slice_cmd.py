"""``slicelm slice``: slice a model, save it, and print a before/after report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from slicelm.errors import SlicelmError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slicelm.models import DEFAULT_MODEL

    p = sub.add_parser(
        "slice",
        help="slice a model with SliceGPT and save it as a Hugging Face folder",
        description="Slice a model with SliceGPT and save it as a Hugging Face folder.",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"hub id, folder, .gguf file or alias (default {DEFAULT_MODEL})",
    )
    p.add_argument("--sparsity", type=float, required=True, help="fraction of the hidden width to remove, in [0, 1)")
    add_slicing_arguments(p)
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward pass (default 8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--data-dir", help="offline data folder (else $SLICELM_DATA_DIR, else the Hugging Face hub)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--ppl-windows",
        type=int,
        default=0,
        help="also measure WikiText-2 test perplexity before and after on this many windows (default 0: skip)",
    )
    p.add_argument("--ppl-seqlen", type=int, default=2048, help="window length for --ppl-windows (default 2048)")
    p.add_argument(
        "--stream",
        action="store_true",
        help="never load the whole model: stream decoder layers from the safetensors files one at a time "
        "(for models larger than memory; needs a Hugging Face folder or hub id)",
    )
    p.add_argument("--max-memory", help="with --stream: RAM for calibration activations, e.g. 4GiB (default: no limit)")
    p.add_argument("--offload-dir", help="with --stream: where activations beyond --max-memory are memory-mapped")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def add_slicing_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Calibration and slicing flags shared by ``slice`` and ``sweep`` (one place for their defaults)."""
    parser.add_argument(
        "--calib", default="c4", help="calibration set: c4, alpaca, ptb, wikitext2 (train) or a .txt/.jsonl file"
    )
    parser.add_argument("--calib-samples", type=int, default=128, help="number of calibration sequences (default 128)")
    parser.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration sequence (default 2048)")
    parser.add_argument("--seed", type=int, default=42, help="calibration sampling seed (default 42)")
    parser.add_argument("--round-to", type=int, default=8, help="round widths down to a multiple of this (default 8)")
    parser.add_argument("--slice-head", action="store_true", help="also slice the input of the LM head")
    parser.add_argument(
        "--untie-head",
        action="store_true",
        help="for tied-embedding models, give the head its own weight (the paper's method; costs vocab x width "
        "parameters). Default: keep the tie",
    )


def validate(args: argparse.Namespace) -> None:
    """Check every flag before any work is done, so a mistake costs nothing and writes nothing."""
    from slicelm.checkpoint import check_output_dir
    from slicelm.data import CALIBRATION_SETS

    if not 0.0 <= args.sparsity < 1.0:
        raise SlicelmError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    for flag in ("calib_samples", "calib_seqlen", "batch_size", "round_to", "ppl_seqlen"):
        if getattr(args, flag) < 1:
            raise SlicelmError(f"--{flag.replace('_', '-')} must be a positive integer")
    if args.ppl_windows < 0:
        raise SlicelmError("--ppl-windows must be 0 or more")
    if args.stream and args.ppl_windows:
        raise SlicelmError("--ppl-windows needs the whole model in memory; with --stream, run `slicelm ppl OUT` after")
    if (args.max_memory or args.offload_dir) and not args.stream:
        raise SlicelmError("--max-memory and --offload-dir apply to --stream only")
    if args.max_memory:
        from slicelm.offload import parse_bytes

        try:
            args.max_memory_bytes = parse_bytes(args.max_memory)
        except ValueError as exc:
            raise SlicelmError(f"--max-memory: {exc}") from None
    calib = Path(args.calib)
    if args.calib not in CALIBRATION_SETS:
        if calib.suffix not in (".txt", ".jsonl"):
            raise SlicelmError(
                f"unknown calibration set {args.calib!r}; "
                f"use one of {', '.join(CALIBRATION_SETS)} or a .txt/.jsonl file"
            )
        if not calib.is_file():
            raise SlicelmError(f"calibration file {args.calib} does not exist")
    check_output_dir(args.out, args.overwrite)


def run(args: argparse.Namespace) -> int:
    validate(args)
    import torch

    from slicelm.arch import spec_for
    from slicelm.checkpoint import save_sliced
    from slicelm.data import load_calibration, load_eval_ids, resolve_data_dir
    from slicelm.models import load_config, load_model, load_tokenizer, resolve_source
    from slicelm.perplexity import perplexity
    from slicelm.slicing import SliceConfig, merge_report, slice_model

    progress = not args.quiet
    data_dir = resolve_data_dir(args.data_dir)
    source = resolve_source(args.model)
    if source.is_sliced:
        raise SlicelmError(f"{args.model} is already sliced; slice the original model instead")
    spec_for(load_config(source))  # refuse unsupported architectures before loading any weights
    config = SliceConfig(
        sparsity=args.sparsity,
        round_to=args.round_to,
        slice_head=args.slice_head,
        untie_head=args.untie_head,
        batch_size=args.batch_size,
    )

    # Data first: a missing file should fail before the (slow) weights are loaded.
    tokenizer = load_tokenizer(source)
    samples = load_calibration(
        args.calib,
        tokenizer,
        n_samples=args.calib_samples,
        seqlen=args.calib_seqlen,
        seed=args.seed,
        data_dir=data_dir,
    )
    eval_ids = load_eval_ids("wikitext2", tokenizer, data_dir=data_dir) if args.ppl_windows else None
    calibration = {
        "dataset": args.calib,
        "samples": args.calib_samples,
        "seqlen": args.calib_seqlen,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "tokens": int(sum(len(x) for x in samples)),
    }
    metadata = {
        "source_model": source.description,
        "calibration": calibration,
        "slice_config": {
            "sparsity": args.sparsity,
            "round_to": args.round_to,
            "slice_head": args.slice_head,
            "untie_head": args.untie_head,
        },
        "dtype": args.dtype,
    }
    extra = {
        "model": source.description,
        "sparsity": args.sparsity,
        "calibration": calibration,
        "load_seconds": 0.0,
        "perplexity_before": None,
        "perplexity_after": None,
        "torch": torch.__version__,
    }
    t0 = time.perf_counter()
    ppl_before = ppl_after = None
    if args.stream:
        report = _slice_streaming(args, source, tokenizer, samples, config, metadata, extra)
    else:
        model, tokenizer = load_model(source, dtype=args.dtype)
        load_seconds = time.perf_counter() - t0

        def ppl() -> dict[str, Any] | None:
            if eval_ids is None:
                return None
            result = perplexity(
                model, eval_ids, seqlen=args.ppl_seqlen, max_windows=args.ppl_windows, progress=progress
            )
            return {
                "dataset": "wikitext2",
                "ppl": result.ppl,
                "windows": result.windows,
                "seqlen": result.seqlen,
            }

        ppl_before = ppl()
        report = slice_model(model, samples, config, pad_token_id=tokenizer.pad_token_id, progress=progress)
        ppl_after = ppl()

        extra |= {"load_seconds": load_seconds, "perplexity_before": ppl_before, "perplexity_after": ppl_after}
    full_report = merge_report(report.to_dict(), extra)
    if args.stream:  # already written, report included, by slice_streaming
        out = Path(args.out)
    else:
        out = save_sliced(model, args.out, tokenizer, overwrite=args.overwrite, metadata=metadata, report=full_report)
    print(summary(full_report, out), file=sys.stderr)
    print(
        json.dumps(
            {k: full_report[k] for k in ("model", "sparsity", "params_before", "params_after")}
            | {
                "ppl_before": ppl_before and ppl_before["ppl"],
                "ppl_after": ppl_after and ppl_after["ppl"],
                "out": str(out),
            }
        )
    )
    return 0


def _slice_streaming(args: argparse.Namespace, source, tokenizer, samples, config, metadata, extra):
    """Streamed slicing straight from the safetensors files into ``args.out``."""
    from slicelm.models import parse_dtype
    from slicelm.streaming import slice_streaming

    if source.gguf_file:
        raise SlicelmError("--stream needs safetensors weights; GGUF files are dequantised whole (drop --stream)")
    folder = source.path
    if not Path(folder).is_dir():  # a hub id: fetch the files once, then stream from the local cache
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(folder, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
        except Exception as exc:  # offline, unknown repo, gated...: one line for the user
            raise SlicelmError(f"cannot download {source.description}: {str(exc).splitlines()[0]}") from None
    return slice_streaming(
        folder,
        args.out,
        samples,
        config,
        tokenizer=tokenizer,
        dtype=parse_dtype(args.dtype),
        max_memory=getattr(args, "max_memory_bytes", None),
        offload_dir=args.offload_dir,
        overwrite=args.overwrite,
        metadata=metadata,
        report_extra=extra,
        progress=not args.quiet,
    )


def summary(report: dict[str, Any], out: Path) -> str:
    """A short human-readable before/after table."""
    before, after = report["params_before"], report["params_after"]
    lines = [
        f"sliced {report['model']} at sparsity {report['sparsity']:.2f} -> {out}",
        f"  parameters      {before / 1e6:9.2f}M -> {after / 1e6:9.2f}M  ({after / before:.1%})",
    ]
    if report["perplexity_before"]:
        pb, pa = report["perplexity_before"], report["perplexity_after"]
        lines.append(
            f"  wikitext2 ppl   {pb['ppl']:9.2f}  -> {pa['ppl']:9.2f}   "
            f"({pb['windows']} windows x {pb['seqlen']} tokens)"
        )
    ev = list(report["explained_variance"].values())
    lines.append(f"  explained var.  min {min(ev):.3f}, mean {sum(ev) / len(ev):.3f} (kept share of stream energy)")
    lines.append(
        f"  slicing time    {report['seconds']['total']:.1f}s, peak RSS {report['peak_memory']['peak_rss_gib']:.2f} GiB"
    )
    return "\n".join(lines)
