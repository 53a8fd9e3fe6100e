"""``slicelm slice``: slice a model, save it, and print a before/after report.

Order of work, so that every mistake is found before it costs anything: flags; the output folder
(checked and claimed); the model's config (architecture, widths, positions); the tokenizer and the
calibration data; only then the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from slicelm.cli.common import add_device_argument, quiet_libraries
from slicelm.errors import SlicelmError, first_line

DEFAULT_SEQLEN = 2048


def add_parser(sub: argparse._SubParsersAction) -> None:
    # imported when the parser is built, not when this module is: the module itself stays free of torch
    from slicelm.io.names import DEFAULT_MODEL, FORMAT_NAMES

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
    add_slicing_arguments(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--data-dir",
        help="offline data folder (else $SLICELM_DATA_DIR, else ../shared/data beside a checkout, else the hub)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder (a new one, or one slicelm wrote, with --overwrite); with --plan-only, the plan file",
    )
    p.add_argument(
        "--plan-only",
        action="store_true",
        help="decide every width and write the plan (JSON) to --out without slicing; follow it later with --plan",
    )
    p.add_argument(
        "--plan",
        metavar="PLAN.json",
        help="follow this plan (from --plan-only, a folder's slicing_plan.json, by hand or another tool) instead "
        "of planning; it is checked against the model first",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out if it is an earlier slicelm output (nothing else)"
    )
    p.add_argument(
        "--format",
        choices=FORMAT_NAMES,
        default="auto",
        help="what --out holds: stock (the original architecture; one-basis plans of one width), decilm (a "
        "DeciLM / Nemotron-NAS folder: one-basis plans whose layers differ, Llama/Mistral/Qwen2), slicelm "
        "(remote code; every plan). Default auto: the first of these that holds the plan",
    )
    add_device_argument(p, "compute (the model stays in CPU memory; each layer visits the device)")
    p.add_argument(
        "--ppl-windows",
        type=int,
        default=0,
        help="also measure WikiText-2 test perplexity before and after on this many windows (default 0: skip)",
    )
    p.add_argument(
        "--ppl-seqlen",
        type=int,
        default=None,
        help=f"window length for --ppl-windows (default {DEFAULT_SEQLEN}, or the model's positions if fewer)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="never load the whole model: stream decoder layers from the safetensors files one at a time "
        "(for models larger than memory; needs a Hugging Face folder or hub id). Chosen automatically when "
        "the model and its calibration activations would not fit in the memory available",
    )
    p.add_argument(
        "--max-memory", help="when streaming: RAM for calibration activations, e.g. 4GiB (default: no limit)"
    )
    p.add_argument("--offload-dir", help="when streaming: where activations beyond --max-memory are memory-mapped")
    p.add_argument("--quiet", action="store_true", help="no progress bars (slicelm's or the libraries')")
    p.set_defaults(run=run)


def add_slicing_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, sweep: bool = False) -> None:
    """Calibration and slicing flags shared by ``slice`` and ``sweep`` (one place for their defaults).

    ``sweep``: the sweep sets the stream sparsity per point itself.
    """
    # imported when the parser is built, not when this module is: the module itself stays free of torch
    from slicelm.config import BASES, DEFAULT_SCHEDULE, LAYOUTS, SCHEDULES
    from slicelm.core.plan import STREAM_LAYOUTS

    if not sweep:
        parser.add_argument(
            "--sparsity", type=float, default=None, help="fraction of the stream's width to remove, in [0, 1)"
        )
        parser.add_argument(
            "--target-params",
            type=float,
            default=None,
            help="instead of sparsities: the wanted fraction of the dense model's true parameter count, in (0, 1); "
            "slicelm chooses the widths (see --schedule)",
        )
    parser.add_argument(
        "--mlp-sparsity",
        type=float,
        default=None,
        help="fraction of every MLP's intermediate channels to remove (with a least-squares refit), in [0, 1)",
    )
    if not sweep:
        parser.add_argument(
            "--schedule",
            choices=SCHEDULES,
            default=None,
            help="how --target-params is spent: auto (candidate plans — the uniform ones among them — scored end to "
            "end on held-out calibration windows; the best is kept), uniform (stream width only, the paper), mlp "
            "(MLP channels, the same in every layer), mlp-global and proxy (per-layer allocations by a "
            "calibration proxy; measured to lose, kept for comparison), mlp-levels (per-layer MLP widths along "
            "measured KL removal curves; lost to auto's shaped widths, kept for comparison), heads and attn-"
            "blocks (one attention head fewer per KV group, or the attention of the least sensitive 1/16 of the "
            "layers removed, the rest from every MLP: the new steps alone, for comparison), layers (the least "
            "sensitive 1/16 of the layers removed whole, the rest from every MLP; stock architecture, any "
            "family). Families without the rotation (gemma2, gemma3_text, olmo2, qwen2_moe) spend it on the "
            "structure-local steps: auto scores uniform MLP channels, heads and whole layers there and keeps the "
            "best (heads: olmo2 refused). Default "
            f"{DEFAULT_SCHEDULE}",
        )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="slicegpt",
        help="; ".join(f"{name}: {layout.help}" for name, layout in STREAM_LAYOUTS.items()) + ". Default slicegpt",
    )
    parser.add_argument(
        "--basis",
        choices=BASES,
        default="pca",
        help="pca (SliceGPT); channels (keep the most active channels, no rotation); identity/random (baselines)",
    )
    parser.add_argument(
        "--calib", default="c4", help="calibration set: c4, alpaca, ptb, wikitext2 (train) or a .txt/.jsonl file"
    )
    parser.add_argument("--calib-samples", type=int, default=128, help="number of calibration sequences (default 128)")
    parser.add_argument(
        "--calib-seqlen",
        type=int,
        default=None,
        help=f"tokens per calibration sequence (default {DEFAULT_SEQLEN}, or the model's positions if fewer)",
    )
    parser.add_argument(
        "--calib-batch-size",
        "--batch-size",
        dest="calib_batch_size",
        type=int,
        default=8,
        help="calibration sequences per forward pass (default 8; --batch-size is the old name)",
    )
    parser.add_argument("--seed", type=int, default=42, help="calibration sampling seed (default 42)")
    parser.add_argument("--round-to", type=int, default=8, help="round widths down to a multiple of this (default 8)")
    parser.add_argument("--slice-head", action="store_true", help="also slice the input of the LM head")
    parser.add_argument(
        "--untie-head",
        action="store_true",
        help="for tied-embedding models, give the head its own weight (the paper's method; costs vocab x width "
        "parameters). Default: keep the tie",
    )


def _check_on_config(**fields: float) -> None:
    """The range rules live on SliceConfig: ask it, and name the flag in its one-line refusal."""
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.config import SliceConfig

    try:
        SliceConfig(**fields)
    except SlicelmError as exc:
        raise SlicelmError(f"--{exc}") from None


def validate_slicing_arguments(args: argparse.Namespace) -> None:
    """Check the shared calibration/slicing flags (no files opened)."""
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.io.data import CALIBRATION_SETS

    for flag in ("calib_samples", "calib_seqlen", "calib_batch_size", "round_to"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SlicelmError(f"--{flag.replace('_', '-')} must be a positive integer")
    if args.mlp_sparsity is None:  # not given (None tells a given 0 apart)
        args.mlp_sparsity = 0.0
    _check_on_config(mlp_sparsity=args.mlp_sparsity)
    if args.calib not in CALIBRATION_SETS:
        calib = Path(args.calib).expanduser()
        if calib.suffix.lower() not in (".txt", ".jsonl"):
            raise SlicelmError(
                f"unknown calibration set {args.calib!r}; "
                f"use one of {', '.join(CALIBRATION_SETS)} or a .txt/.jsonl file"
            )
        if not calib.is_file():
            raise SlicelmError(f"calibration file {args.calib} does not exist")


def validate(args: argparse.Namespace) -> None:
    """Check every flag before any work is done, so a mistake costs nothing and writes nothing."""
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.config import DEFAULT_SCHEDULE
    from slicelm.core.plan import SlicingPlan

    args.followed_plan = None
    if args.schedule is not None and args.target_params is None:
        raise SlicelmError(
            f"--schedule {args.schedule} chooses how --target-params is spent; with "
            + ("--plan" if args.plan is not None else "--sparsity/--mlp-sparsity")
            + " the widths are given, so it has no effect: drop it, or give --target-params"
        )
    args.schedule = args.schedule or DEFAULT_SCHEDULE
    if args.ppl_seqlen is not None and not args.ppl_windows:
        raise SlicelmError("--ppl-seqlen is the window of --ppl-windows, which is 0 (skip); give --ppl-windows N")
    if args.plan is not None:
        if args.plan_only:
            raise SlicelmError("--plan follows a plan and --plan-only writes one; give one of them")
        if args.target_params is not None or args.sparsity is not None or args.mlp_sparsity:
            raise SlicelmError("the plan decides every width; drop --sparsity/--mlp-sparsity/--target-params")
        path = Path(args.plan).expanduser()
        if not path.is_file():
            raise SlicelmError(f"plan file {args.plan} does not exist")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SlicelmError(f"plan file {args.plan} is not JSON ({first_line(exc)})") from None
        if not isinstance(data, dict):
            raise SlicelmError(f"plan file {args.plan} is not a slicing plan (a JSON object)")
        args.followed_plan = SlicingPlan.from_dict(data)
        args.sparsity = 0.0
        validate_slicing_arguments(args)
        _validate_run_flags(args)
        return
    if args.target_params is not None:
        if args.sparsity is not None or args.mlp_sparsity:
            raise SlicelmError("give either --target-params or --sparsity/--mlp-sparsity, not both")
        if not 0.0 < args.target_params < 1.0:
            raise SlicelmError(
                f"--target-params is a fraction of the dense model's parameters in (0, 1), got {args.target_params}"
            )
    elif args.sparsity is None and not args.mlp_sparsity:
        if args.mlp_sparsity is not None:  # given, and 0
            raise SlicelmError(
                "--mlp-sparsity 0 removes no MLP channels, and no --sparsity is given: nothing would be sliced; "
                "give a positive --mlp-sparsity, --sparsity or --target-params"
            )
        raise SlicelmError("give --sparsity (stream), --mlp-sparsity (MLP channels) or --target-params (a budget)")
    args.sparsity = args.sparsity or 0.0
    _check_on_config(sparsity=args.sparsity)
    validate_slicing_arguments(args)
    _validate_run_flags(args)


def _validate_run_flags(args: argparse.Namespace) -> None:
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.core.offload import parse_bytes

    if args.plan_only and (args.ppl_windows or args.stream):
        raise SlicelmError("--plan-only writes a plan and slices nothing; drop --ppl-windows/--stream")
    _validate_format(args)
    if args.ppl_seqlen is not None and args.ppl_seqlen < 2:
        raise SlicelmError("--ppl-seqlen must be at least 2")
    if args.ppl_windows < 0:
        raise SlicelmError("--ppl-windows must be 0 or more")
    if args.stream and args.ppl_windows:
        raise SlicelmError("--ppl-windows needs the whole model in memory; with --stream, run `slicelm ppl OUT` after")
    if args.offload_dir and not (args.stream or args.max_memory):
        raise SlicelmError("--offload-dir applies when streaming (--stream or --max-memory)")
    if args.offload_dir:
        check_offload_dir(Path(args.offload_dir).expanduser())
    args.max_memory_bytes = None
    if args.max_memory:
        try:
            args.max_memory_bytes = parse_bytes(args.max_memory)
        except ValueError as exc:
            raise SlicelmError(f"--max-memory: {exc}") from None


def check_offload_dir(folder: Path) -> None:
    """--offload-dir must be a folder slicelm can create files in (probed in the nearest existing
    folder with a temporary entry removed at once, so nothing is left)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise SlicelmError(f"--offload-dir {folder}: {probe} is a file, not a folder; give a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".slicelm-probe-", dir=probe)).rmdir()
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
        raise SlicelmError(f"--offload-dir {folder}: cannot write to {probe} ({reason}); give another folder") from None


def _validate_format(args: argparse.Namespace) -> None:
    """Refuse a --format that the flags alone show cannot hold the plan (the model's family is
    checked with its config, a followed plan in full, see check_model_config)."""
    from slicelm.core.plan import STREAM_LAYOUTS  # light (no torch), but kept with the command's other imports

    fmt = getattr(args, "format", "auto")
    if fmt == "auto":
        return
    if args.plan_only:
        raise SlicelmError("--format chooses the folder written; --plan-only writes a plan (give --format later)")
    if args.stream:
        raise SlicelmError("--stream writes the format auto picks (stock, decilm or slicelm); drop --format")
    if fmt not in ("stock", "decilm") or args.followed_plan is not None:
        return
    if STREAM_LAYOUTS[args.layout].shortcuts and args.sparsity > 0:
        raise SlicelmError(f"--format {fmt} cannot hold the slicegpt layout's shortcut matrices; add --layout plain")
    if fmt == "stock" and args.target_params is not None and args.schedule == "mlp-global":
        raise SlicelmError(
            "--format stock holds one MLP width and --schedule mlp-global gives every layer its own; use "
            "--format decilm or another --schedule"
        )


def fit_seqlens(model_config: Any, args: argparse.Namespace, flags: tuple[str, ...]) -> None:
    """Default sequence lengths to min(2048, the model's positions); refuse explicit ones beyond them."""
    positions = getattr(model_config, "max_position_embeddings", None)
    for flag in flags:
        length = getattr(args, flag)
        if length is None:
            setattr(args, flag, min(DEFAULT_SEQLEN, positions or DEFAULT_SEQLEN))
        elif positions is not None and length > positions:
            name = "--" + flag.replace("_", "-")
            raise SlicelmError(f"{name} {length} is longer than the model's {positions} positions; lower {name}")


def check_model_config(model_config: Any, config: Any, args: argparse.Namespace) -> None:
    """What the config alone can refuse: the architecture and layout, the widths or the budget (or a
    plan made for another model), sequences beyond its positions. Nothing is loaded (structures are
    built on the meta device)."""
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.allocate.checks import check_against_config, check_plan_against_config
    from slicelm.layouts.checkpoint import choose_format
    from slicelm.layouts.decilm import family_refusal
    from slicelm.steps.local import check_local_config

    if config.untie_head and not getattr(model_config, "tie_word_embeddings", False):
        raise SlicelmError(
            f"--untie-head: {args.model} has no tied head (its head has its own weight already); drop --untie-head"
        )
    fmt = getattr(args, "format", "auto")
    local = False
    following = getattr(args, "followed_plan", None) is not None
    if not following and config.target_params is None:
        check_stream_width(model_config, config.sparsity, config.round_to)
    if following:
        check_plan_against_config(model_config, args.followed_plan)
        choose_format(args.followed_plan, model_config, fmt)
    elif check_local_config(model_config, config):  # structure-local steps check their own plan
        local = True
    else:
        try:
            check_against_config(model_config, config)
        except SlicelmError as exc:
            cause = forced_untie(model_config, config)
            if cause is None or config.target_params is None:
                raise
            raise SlicelmError(f"{exc}. The cause: {cause[0]}") from None
    if local and getattr(args, "plan_only", False):
        raise SlicelmError(
            f"--plan-only: {model_config.model_type} is pruned by the structure-local steps, which choose and prune "
            "in one pass on the calibration data (their plan is in the output's report); drop --plan-only"
        )
    if local and fmt not in ("auto", "stock"):
        raise SlicelmError(f"--format {fmt}: {model_config.model_type} is pruned by the structure-local steps (stock)")
    if fmt == "decilm" and family_refusal(model_config) is not None:
        raise SlicelmError(f"--format decilm: {family_refusal(model_config)}")
    fit_seqlens(model_config, args, ("calib_seqlen", "ppl_seqlen"))


def forced_untie(model_config: Any, config: Any) -> tuple[str, int] | None:
    """(in words, parameters added) when slicing must untie a tied head: a LayerNorm family's embedding
    cannot stay the head once the stream is centred, so the head gets its own vocab x width weight."""
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.core.arch import spec_for

    if not getattr(model_config, "tie_word_embeddings", False) or config.untie_head:
        return None
    try:
        if spec_for(model_config).norm != "layer":
            return None
    except SlicelmError:
        return None
    vocab, hidden = model_config.vocab_size, model_config.hidden_size
    added = vocab * hidden
    return (
        f"{model_config.model_type} normalises with LayerNorm, so slicing unties its tied head: the head gets its "
        f"own {vocab:,} x {hidden} weight, {added:,} parameters that the dense model shares with its embedding",
        added,
    )


def check_stream_width(model_config: Any, sparsity: float, round_to: int, flag: str = "--sparsity") -> None:
    """Refuse a stream sparsity that leaves less than one ``--round-to`` step of the stream's width."""
    hidden = getattr(model_config, "hidden_size", None)
    kept = (hidden or 0) * (1.0 - sparsity)
    if not hidden or not sparsity or int(kept) >= round_to:
        return
    if round_to > hidden // 2:  # the step, not the sparsity, is what leaves nothing
        raise SlicelmError(
            f"--round-to {round_to} leaves no width of the model's {hidden}-wide stream at {flag} {sparsity:g} "
            f"(it keeps {kept:.1f} channels); lower --round-to"
        )
    raise SlicelmError(
        f"{flag} {sparsity:g} keeps {kept:.1f} of the model's {hidden} stream channels, less than one --round-to "
        f"step of {round_to}: nothing would be left; use at most {flag} {1.0 - round_to / hidden:.4g} "
        "(or lower --round-to)"
    )


def run(args: argparse.Namespace) -> int:
    validate(args)
    quiet_libraries(progress=not args.quiet)
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.core.devices import resolve_device
    from slicelm.core.plan import STREAM_LAYOUTS
    from slicelm.io.models import resolve_source
    from slicelm.io.outputs import OutputClaim
    from slicelm.layouts.checkpoint import OUTPUT_KIND
    from slicelm.layouts.decilm import is_decilm_folder
    from slicelm.layouts.plain import OUTPUT_KIND as PLAIN_KIND

    args.device = resolve_device(args.device)
    source = resolve_source(args.model)
    if source.is_sliced:
        raise SlicelmError(f"{args.model} is already sliced; slice the original model instead")
    if not source.gguf_file and is_decilm_folder(source.path):
        raise SlicelmError(f"{args.model} is a DeciLM folder (per-layer widths); slice the original model instead")
    if args.plan_only:
        return _plan_only(args, source)
    # Claimed before any work: a refused or busy --out costs nothing, and no other run can take it.
    layout = args.followed_plan.layout if args.followed_plan is not None else args.layout
    kind = PLAIN_KIND if STREAM_LAYOUTS[layout].one_basis else OUTPUT_KIND
    with OutputClaim(args.out, args.overwrite, kind=kind, protect=[source.local_path]) as claim:
        return _run(args, source, claim)


def _run(args: argparse.Namespace, source, claim) -> int:
    # imported when the command runs: building the parser (--help) needs none of this
    import torch

    from slicelm.io.data import load_calibration, load_eval_ids, resolve_data_dir
    from slicelm.io.models import load_config, load_model, load_tokenizer
    from slicelm.io.outputs import to_json
    from slicelm.layouts.checkpoint import format_of, save_sliced
    from slicelm.measure.perplexity import perplexity
    from slicelm.slicing import merge_report, slice_model

    progress = not args.quiet
    data_dir = resolve_data_dir(args.data_dir)
    model_config = load_config(source)
    config = slice_config_from(args)
    check_model_config(model_config, config, args)

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
        "source": calibration_source(args.calib, data_dir),
        "samples": args.calib_samples,
        "seqlen": args.calib_seqlen,
        "seed": args.seed,
        "batch_size": args.calib_batch_size,
        "tokens": int(sum(len(x) for x in samples)),
    }
    metadata = {
        "source_model": source.description,
        "calibration": calibration,
        "slice_config": slice_config_summary(config),
        "dtype": args.dtype,
    }
    extra = {
        "model": source.description,
        "sparsity": args.sparsity,
        "calibration": calibration,
        "load_seconds": 0.0,
        "perplexity_before": None,
        "perplexity_after": None,
        "device": str(args.device),
        "torch": torch.__version__,
    }
    if not args.stream:
        args.stream = _should_stream(args, source, model_config, samples)
    t0 = time.perf_counter()
    ppl_before = ppl_after = None
    if args.stream:
        report = _slice_streaming(args, source, tokenizer, samples, config, metadata, extra, claim)
    else:
        model, tokenizer = load_model(source, dtype=args.dtype)
        load_seconds = time.perf_counter() - t0

        def ppl() -> dict[str, Any] | None:
            if eval_ids is None:
                return None
            model.to(args.device)
            result = perplexity(
                model, eval_ids, seqlen=args.ppl_seqlen, max_windows=args.ppl_windows, progress=progress
            )
            model.to("cpu")
            return {"dataset": "wikitext2", "ppl": result.ppl, "windows": result.windows, "seqlen": result.seqlen}

        ppl_before = ppl()
        report = slice_model(
            model,
            samples,
            config,
            plan=args.followed_plan,
            pad_token_id=tokenizer.pad_token_id,
            progress=progress,
            device=args.device,
        )
        ppl_after = ppl()
        extra |= {"load_seconds": load_seconds, "perplexity_before": ppl_before, "perplexity_after": ppl_after}
    full_report = merge_report(report.to_dict(), extra)
    note = rounding_note(full_report, args.round_to)
    if note:  # recorded in the report (in memory; a streamed report is already written) and printed
        full_report["warnings"] = [*full_report.get("warnings", []), note]
    if not args.stream:  # refused here, before anything is written, if --format cannot hold the plan
        full_report["format"] = format_of(model, args.format).name
    if args.stream:  # already written, report included, by slice_streaming
        out = claim.out
    else:
        out = save_sliced(model, claim, tokenizer, format=args.format, metadata=metadata, report=full_report)
    for warning in full_report.get("warnings", []):
        print(f"slicelm: warning: {warning}", file=sys.stderr)
    untie = forced_untie(model_config, config)
    print(summary(full_report, out, untie[0] if untie else None), file=sys.stderr)
    result = {k: full_report[k] for k in ("model", "sparsity", "params_before", "params_after")}
    result |= {
        "ppl_before": ppl_before and ppl_before["ppl"],
        "ppl_after": ppl_after and ppl_after["ppl"],
        "out": str(out),
    }
    print(to_json(result, indent=None))
    return 0


def rounding_note(report: dict[str, Any], round_to: int) -> str | None:
    """A line when rounding made the stream much narrower than --sparsity asked (more than 2 points)."""
    sparsity = report.get("sparsity")
    if not sparsity or (report.get("planning") or {}).get("target_params") is not None:
        return None
    plan = report["plan"]
    widths = sorted(w["mid"] if w.get("mid") is not None else w["out"] for w in plan["layers"])
    width, hidden = widths[len(widths) // 2], plan["hidden_size"]
    removed = 1.0 - width / hidden
    if removed - sparsity <= 0.02:
        return None
    return (
        f"--sparsity {sparsity:g} removed {removed:.0%} of the stream (width {width} of {hidden}): widths are "
        f"rounded down to multiples of --round-to {round_to} that the {report.get('layout', 'slicegpt')} layout "
        "can hold; a --round-to that divides the model's widths (8, 16, ...) keeps closer to --sparsity"
    )


def _plan_only(args: argparse.Namespace, source) -> int:
    """``--plan-only``: decide every width on the loaded model and write the plan; slice nothing."""
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.allocate.planning import plan
    from slicelm.io.data import load_calibration, resolve_data_dir
    from slicelm.io.models import load_config, load_model, load_tokenizer
    from slicelm.io.outputs import write_new_file

    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".json":
        raise SlicelmError(f"--plan-only writes a JSON file; give --out a .json path, not {args.out}")
    if out.exists() and not (args.overwrite and _is_slicelm_plan(out)):
        raise SlicelmError(
            f"{args.out} exists; choose another --out"
            + (" (--overwrite replaces only a plan slicelm wrote)" if not args.overwrite else "")
        )
    data_dir = resolve_data_dir(args.data_dir)
    model_config = load_config(source)
    config = slice_config_from(args)
    check_model_config(model_config, config, args)
    tokenizer = load_tokenizer(source)
    samples = load_calibration(
        args.calib, tokenizer, n_samples=args.calib_samples, seqlen=args.calib_seqlen, seed=args.seed, data_dir=data_dir
    )
    model, tokenizer = load_model(source, dtype=args.dtype)
    chosen = plan(model, samples, config, pad_token_id=tokenizer.pad_token_id, progress=not args.quiet)
    data = chosen.to_dict() | {"created_by": PLAN_MARK, "source_model": source.description}
    write_new_file(out, json.dumps(data, indent=2) + "\n", replace=args.overwrite)
    planning = chosen.planning
    what = f"target {planning['target_params']:g} ({planning['schedule']})" if planning else "explicit sparsities"
    print(f"planned {source.description} at {what}, {chosen.layout} layout -> {out}", file=sys.stderr)
    print(json.dumps({"plan": str(out), "planned_count": planning.get("planned_count"), "layout": chosen.layout}))
    return 0


PLAN_MARK = "slicelm --plan-only"


def _is_slicelm_plan(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("created_by") == PLAN_MARK
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def slice_config_from(args: argparse.Namespace):
    """The :class:`~slicelm.config.SliceConfig` the flags describe (``slice``'s, or the slicing flags
    ``sweep`` shares; a flag the command lacks keeps the config's default, and a sweep sets the
    sparsity of each point itself)."""
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.config import DEFAULT_SCHEDULE, SliceConfig

    return SliceConfig(
        sparsity=getattr(args, "sparsity", 0.0),
        mlp_sparsity=args.mlp_sparsity,
        target_params=getattr(args, "target_params", None),
        schedule=getattr(args, "schedule", DEFAULT_SCHEDULE),
        layout=args.layout,
        basis=args.basis,
        round_to=args.round_to,
        slice_head=args.slice_head,
        untie_head=args.untie_head,
        batch_size=args.calib_batch_size,
        seed=args.seed,
    )


def slice_config_summary(config) -> dict[str, Any]:
    """The settings that decide the sliced model (recorded in its config and report)."""
    keys = ("sparsity", "mlp_sparsity", "target_params", "schedule", "layout", "basis", "round_to")
    return {k: getattr(config, k) for k in keys} | {"slice_head": config.slice_head, "untie_head": config.untie_head}


def calibration_source(name: str, data_dir: Path | None) -> str:
    """Which text calibration read, in words (for the report)."""
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.io.data import describe_calibration_source

    return describe_calibration_source(name, data_dir)


def _should_stream(args: argparse.Namespace, source, model_config, samples) -> bool:
    """Stream by itself when the model and its calibration activations would not fit in memory."""
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.core.resources import available_memory_bytes
    from slicelm.io.memory import estimate_in_memory_bytes
    from slicelm.io.models import parse_dtype

    available = available_memory_bytes()
    if available is None:
        return False
    need = estimate_in_memory_bytes(model_config, parse_dtype(args.dtype), sum(len(s) for s in samples))
    if need <= 0.9 * available:
        return False
    gib = 2**30
    if source.gguf_file:
        print(
            f"slicelm: warning: slicing in memory needs about {need / gib:.1f} GiB and {available / gib:.1f} GiB "
            "are available; GGUF files cannot be streamed (convert to safetensors, or use fewer --calib-samples)",
            file=sys.stderr,
        )
        return False
    print(
        f"slicelm: the model and its calibration activations need about {need / gib:.1f} GiB, more than the "
        f"{available / gib:.1f} GiB available: streaming layers from disk (as with --stream)",
        file=sys.stderr,
    )
    return True


def _slice_streaming(args: argparse.Namespace, source, tokenizer, samples, config, metadata, extra, claim):
    """Streamed slicing straight from the safetensors files into the claimed output folder."""
    # imported when the command runs: building the parser (--help) needs none of this
    from huggingface_hub import snapshot_download

    from slicelm.io.models import parse_dtype
    from slicelm.streaming import slice_streaming

    if source.gguf_file:
        raise SlicelmError("--stream needs safetensors weights; GGUF files are dequantised whole (drop --stream)")
    folder = source.path
    if not Path(folder).is_dir():  # a hub id: fetch the files once, then stream from the local cache
        try:
            folder = snapshot_download(folder, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
        except Exception as exc:  # offline, unknown repo, gated...: one line for the user
            raise SlicelmError(f"cannot download {source.description}: {first_line(exc)}") from None
    return slice_streaming(
        folder,
        claim,
        samples,
        config,
        tokenizer=tokenizer,
        dtype=parse_dtype(args.dtype),
        max_memory=args.max_memory_bytes,
        offload_dir=args.offload_dir,
        metadata=metadata,
        report_extra=extra,
        progress=not args.quiet,
        device=args.device,
    )


def summary(report: dict[str, Any], out: Path, untie: str | None = None) -> str:
    """A short human-readable before/after table."""
    before, after = report["params_before"], report["params_after"]
    plan = report["plan"]
    widths = sorted(w["out"] for w in plan["layers"])
    mlp = sorted(w["mlp"] for w in plan["layers"] if w.get("mlp") is not None)
    how = f"stream width {widths[len(widths) // 2]} of {plan['hidden_size']}"
    if mlp:
        how += f", MLP widths {mlp[0]}-{mlp[-1]}" if mlp[0] != mlp[-1] else f", MLP width {mlp[0]}"
    planning = report.get("planning") or {}
    if planning.get("target_params") is not None:
        chosen = f", chose {planning['chosen']}" if planning.get("chosen") else ""
        what = f"target {planning['target_params']:g} ({planning['schedule']}{chosen})"
    else:
        what = f"sparsity {report['sparsity']:.2f}" if report.get("sparsity") is not None else "a given plan"
    lines = [
        f"sliced {report['model']} at {what}, {report.get('layout', 'slicegpt')} layout ({how}) -> {out}"
        + (f" ({report['format']} format)" if report.get("format") else ""),
        f"  parameters      {before / 1e6:9.2f}M -> {after / 1e6:9.2f}M  ({after / before:.1%})",
    ]
    if planning.get("note"):
        lines.append(f"  note            {planning['note']}")
    if after >= before:
        larger = "larger than" if after > before else "as large as"
        why = f"{untie}" if untie else "its shortcut matrices outweigh what this sparsity removes; slice more"
        lines.append(f"  note            the sliced model is {larger} the original: {why}")
    if report["perplexity_before"]:
        pb, pa = report["perplexity_before"], report["perplexity_after"]
        lines.append(
            f"  wikitext2 ppl   {pb['ppl']:9.2f}  -> {pa['ppl']:9.2f}   "
            f"({pb['windows']} windows x {pb['seqlen']} tokens)"
        )
    ev = list(report["explained_variance"].values())
    lines.append(f"  explained var.  min {min(ev):.3f}, mean {sum(ev) / len(ev):.3f} (kept share of stream energy)")
    lines.append(
        f"  slicing time    {report['seconds']['total']:.1f}s; peak memory of the process so far "
        f"{report['peak_memory']['peak_rss_gib']:.2f} GiB RSS"
    )
    return "\n".join(lines)
