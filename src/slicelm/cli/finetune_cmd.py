"""``slicelm finetune MODEL --out DIR --data c4``: recover a sliced model by fine-tuning or distillation.

Order of work: flags; the teacher's device, and whether its weights fit there (from its config, before
any weight is loaded); the output folder and the work folder (claimed); the training data (the
WikiText-2 test text is refused); the teacher (its vocabulary must be the student's); then
training, with checkpoints in the work folder; the merged model is written like ``slice`` writes.

Data-parallel: under ``accelerate launch`` every process runs this command; rank 0 claims the
folders (and tells the others what it refused), all train on their share of each batch, rank 0
writes. ``--num-processes N`` checks the flags and folders here, then runs accelerate's own
launcher on the same command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from slicelm.cli.common import add_device_argument, disk_refusal, quiet_libraries
from slicelm.errors import SlicelmError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="recover a sliced (or any) model: LoRA or full fine-tuning, next-token loss or distillation",
        description="Fine-tune a sliced, plain or dense model folder on text and write the result (adapters merged) "
        "as the same kind of folder. --loss kd distils the dense model the folder was sliced from.",
    )
    p.add_argument("model", help="a folder written by slicelm slice (or any Hugging Face model folder / hub id)")
    p.add_argument("--out", required=True, help="output folder (a new one, or one slicelm wrote, with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is an earlier slicelm output")
    p.add_argument("--data", default="c4", help="training text: c4, alpaca, ptb or a .txt/.jsonl file (default c4)")
    p.add_argument("--data-dir", help="offline data folder (else $SLICELM_DATA_DIR, else ../shared/data, else the hub)")
    p.add_argument("--loss", choices=("lm", "kd"), default="kd", help="lm: next-token loss (the paper); kd: distil")
    p.add_argument("--teacher", help="teacher for --loss kd (default: the source model recorded in the sliced folder)")
    p.add_argument("--temperature", type=float, default=None, help="KD temperature (default 1)")
    p.add_argument(
        "--kd-top-k",
        type=int,
        default=None,
        metavar="K",
        help="--loss kd against the teacher's K most likely next tokens plus one bucket for the rest, computed once "
        "before training and kept with the checkpoints (an approximation; exact at K = the vocabulary). "
        "Default: the exact KL over the whole vocabulary",
    )
    p.add_argument(
        "--teacher-device",
        default=None,
        metavar="DEVICE",
        help="where the --loss kd teacher is held and run: cpu, cuda:1 ... (its outputs come to the student's "
        "device for the loss). Default: beside the student (--device). With several processes only cpu",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--lora-rank", type=int, default=32, help="LoRA rank on every block linear (default 32)")
    group.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 64)")
    p.add_argument(
        "--lora-extra",
        default="",
        help="also adapt, comma-separated: shortcuts (a sliced model's shortcut matrices), final (a kept tie's "
        "final projection); default none",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=int, default=200_000, help="training tokens (default 200000)")
    budget.add_argument("--steps", type=int, default=None, help="optimizer steps instead of --tokens")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per training window (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4 LoRA, 2e-5 --full)")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows of the training text (default 8)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: ~10 per run)")
    p.add_argument(
        "--monitor-ppl",
        type=int,
        default=0,
        help="also measure WikiText-2 test perplexity on this many 2048-token windows at every evaluation "
        "(a curve to look at; nothing is selected by it). Default 0: off",
    )
    p.add_argument("--seed", type=int, default=0, help="data order and LoRA initialisation (default 0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="training dtype (bf16: GPU)")
    p.add_argument(
        "--gradient-checkpointing",
        choices=("auto", "on", "off"),
        default="auto",
        help="recompute activations in the backward pass (auto: only when they would not fit in memory)",
    )
    p.add_argument("--work-dir", help="checkpoints for --resume (default OUT.slicelm-work beside --out)")
    restart = p.add_mutually_exclusive_group()
    restart.add_argument("--resume", action="store_true", help="continue an interrupted run from its work folder")
    restart.add_argument(
        "--restart",
        action="store_true",
        help="discard the work folder's checkpoint (an interrupted or diverged run) and start again",
    )
    add_device_argument(p, "train")
    p.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="data-parallel processes through accelerate's launcher (DDP; --batch-size stays the global batch). "
        "Or start the command with accelerate launch -m slicelm finetune ... (multi-node, FSDP, mixed precision)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the student across the processes (FSDP: each holds a part of every weight, for models that "
        "do not fit one device); with --num-processes, or under accelerate launch (--use_fsdp says the same)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def config_from(args: argparse.Namespace):
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.recover.config import FinetuneConfig

    extra = tuple(t.strip() for t in args.lora_extra.split(",") if t.strip())
    return FinetuneConfig(
        loss=args.loss,
        temperature=1.0 if args.temperature is None else args.temperature,
        kd_top_k=args.kd_top_k,
        teacher_device=args.teacher_device,
        lora_rank=None if args.full else args.lora_rank,
        lora_alpha=64.0 if args.lora_alpha is None else args.lora_alpha,
        tokens=args.tokens,
        steps=args.steps,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        eval_windows=args.eval_windows,
        eval_every=args.eval_every,
        seed=args.seed,
        extra_targets=extra,
        gradient_checkpointing={"auto": None, "on": True, "off": False}[args.gradient_checkpointing],
    )


def run(args: argparse.Namespace) -> int:
    quiet_libraries(progress=not args.quiet)
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.core.devices import resolve_device
    from slicelm.io.models import resolve_source
    from slicelm.io.outputs import OutputClaim
    from slicelm.layouts.checkpoint import FINETUNED_KIND
    from slicelm.layouts.decilm import is_decilm_folder
    from slicelm.recover.parallel import Processes, launched

    check_flags_have_effect(args)
    config = config_from(args)
    if args.num_processes is not None and args.num_processes < 1:
        raise SlicelmError("--num-processes must be a positive integer")
    if args.fsdp and not launched() and (args.num_processes or 1) < 2:
        raise SlicelmError("--fsdp shards the model across processes: add --num-processes 2 or more")
    device = resolve_device(args.device)
    if args.dtype == "bfloat16" and device.type == "cpu":
        raise SlicelmError("--dtype bfloat16 is for GPUs; train in float32 on the CPU")
    source = resolve_source(args.model)

    if not source.gguf_file and is_decilm_folder(source.path):
        raise SlicelmError(
            f"{args.model} is a DeciLM folder, which fine-tuning does not write back yet; fine-tune the model "
            "sliced with --format slicelm instead"
        )
    work = Path(args.work_dir or f"{Path(args.out).expanduser()}.slicelm-work").expanduser()

    def claim_folders(processes: int, student_device=None) -> OutputClaim:
        """Refusals that need no weights, then the folders. student_device: this process's (None: not yet
        launched, where the teacher's fit is left to the launched processes' rank 0)."""
        if config.batch_size % processes:
            raise SlicelmError(
                f"--batch-size {config.batch_size} is the global batch; it must split evenly across {processes} "
                "processes"
            )
        if config.loss == "kd":
            check_teacher_device(args, config, source, device, processes, student_device)
        claim = OutputClaim(args.out, args.overwrite, kind=FINETUNED_KIND, protect=[source.local_path])
        try:
            _check_work_dir(work, args.resume, args.restart, processes)
        except SlicelmError:
            claim.release()
            raise
        return claim

    if not launched() and (args.num_processes or 1) > 1:
        with claim_folders(args.num_processes):  # refused here, in one line, before any process starts
            pass
        return launch(args, args.num_processes)
    processes = Processes.from_environment(device, shard=args.fsdp or None)
    if args.num_processes is not None and args.num_processes != processes.world:
        raise SlicelmError(f"--num-processes {args.num_processes}, but the launcher started {processes.world}")
    claim = problem = None
    if processes.main:
        try:
            claim = claim_folders(processes.world, processes.device or device)
        except SlicelmError as exc:
            problem = str(exc)
    problem = processes.broadcast(problem)  # the other ranks stop with rank 0, which says why
    if problem is not None:
        if processes.main:
            raise SlicelmError(problem)
        return 2
    try:
        with claim or contextlib.nullcontext():
            return _run(args, config, source, claim, work, device, processes)
    except SlicelmError:
        if processes.main:
            raise
        return 2  # every rank meets the same error; rank 0 prints it


def check_flags_have_effect(args: argparse.Namespace) -> None:
    """Refuse flags that the other flags make meaningless, instead of ignoring them silently."""
    if args.loss != "kd":
        for flag, value in (
            ("--teacher", args.teacher),
            ("--temperature", args.temperature),
            ("--kd-top-k", args.kd_top_k),
            ("--teacher-device", args.teacher_device),
        ):
            if value is not None:
                raise SlicelmError(
                    f"{flag} is only used by --loss kd, not --loss {args.loss}; drop it or use --loss kd"
                )
    if args.full:
        for flag, value in (("--lora-alpha", args.lora_alpha), ("--lora-extra", args.lora_extra or None)):
            if value is not None:
                raise SlicelmError(f"{flag} configures LoRA adapters, and --full trains every weight; drop one of them")


def check_teacher_device(args, config, source, device, processes: int, student_device=None) -> None:
    """Refuse, before any weight is loaded, a ``--teacher-device`` this machine cannot use or that is
    ambiguous with several processes, and (with ``student_device``) a teacher whose weights alone exceed
    the memory free on its device. The teacher's size comes from its config, built on the meta device;
    a teacher whose config cannot be read is left to :func:`load_teacher`, which says why."""
    # imported when the command runs: building the parser (--help) needs none of this
    import os

    import torch

    from slicelm.core.resources import device_memory_bytes
    from slicelm.io.memory import weight_bytes
    from slicelm.io.models import DTYPES, load_config, resolve_source
    from slicelm.recover.teacher import recorded_source, teacher_device

    where = teacher_device(config.teacher_device, student_device or device, processes)  # a bad one: refused
    if student_device is None:
        return
    name = args.teacher or recorded_source(source.path)
    if name is None:
        return
    try:
        teacher_config = load_config(resolve_source(name))
        need = weight_bytes(teacher_config, DTYPES[args.dtype])
    except (SlicelmError, OSError, ValueError, KeyError, TypeError, AttributeError, ImportError):
        return  # no estimate: nothing is refused on a guess (loading the teacher says what is wrong)
    # every process of this machine holds a teacher; on the CPU they share its memory
    copies = int(os.environ.get("LOCAL_WORLD_SIZE", processes)) if where.type == "cpu" else 1
    free = device_memory_bytes(where)
    if free is None or need * copies <= free:
        return
    each = f" in each of {copies} processes" if copies > 1 else ""
    ways = ["--teacher-device cpu"] if where.type != "cpu" else []
    if where.type == "cpu" and torch.cuda.is_available():
        ways.append("--teacher-device cuda:N")
    if args.dtype == "float32" and where.type == "cuda":
        ways.append("--dtype bfloat16")
    ways.append("--loss lm (no teacher)")
    raise SlicelmError(
        f"the teacher {name} does not fit on {where}: its {args.dtype} weights alone take {_size(need)}{each}, and "
        f"{_size(free)} is free there; free memory, or use {' or '.join(ways)}"
    )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def launch(args: argparse.Namespace, processes: int) -> int:
    """This command on ``processes`` data-parallel processes, through accelerate's own launcher (torchrun
    underneath: gloo on CPUs, NCCL on GPUs)."""
    argv, skip = [], False
    for arg in getattr(args, "argv", None) or sys.argv[1:]:
        if skip or arg == "--num-processes" or arg.startswith("--num-processes="):
            skip = arg == "--num-processes" and not skip
            continue
        argv.append(arg)
    with socket.socket() as probe:  # a free port for the processes' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # FSDP: the processes shard the student themselves (slicelm.recover.parallel); each loads the same weights
    kind = ["--multi_gpu"]
    if args.fsdp:
        kind = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_sync_module_states", "false"]
        kind += ["--fsdp_cpu_ram_efficient_loading", "false"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *kind, "--num_processes", str(processes)]
    cmd += ["--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "--quiet", "-m", "slicelm", *argv]
    return subprocess.run(cmd).returncode


def _check_work_dir(work: Path, resume: bool, restart: bool = False, processes: int = 1) -> None:
    """A work folder is slicelm's own (created with the first checkpoint); resuming needs one, and
    without --resume or --restart an existing one is never silently reused or discarded. A
    checkpoint resumes with the number of processes that took it."""
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.io.outputs import read_manifest
    from slicelm.recover.checkpoints import CHECKPOINT, WORK_KIND, check_processes

    if work.exists():
        manifest = read_manifest(work) if work.is_dir() else None
        if manifest is None or manifest.get("kind") != WORK_KIND:
            raise SlicelmError(f"--work-dir {work} exists and is not a slicelm work folder; choose another")
        if not resume and not restart:
            raise SlicelmError(
                f"{work} holds an interrupted run's checkpoint; pass --resume to continue it, or --restart to "
                "discard it and start again"
            )
        if resume:
            with contextlib.suppress(OSError, ValueError, AttributeError):  # a damaged one is told later
                meta = json.loads((work / CHECKPOINT / "state.json").read_text())
                check_processes(meta.get("processes", 1), processes)
    elif resume:
        raise SlicelmError(f"--resume: {work} does not exist; run without --resume to start")


def _run(args, config, source, claim, work: Path, device, processes) -> int:
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.io.data import resolve_data_dir
    from slicelm.io.models import DTYPES, load_model, load_tokenizer
    from slicelm.io.outputs import to_json
    from slicelm.layouts.checkpoint import save_finetuned
    from slicelm.recover import recovery
    from slicelm.recover.loop import Diverged
    from slicelm.recover.windows import training_windows

    data_dir = resolve_data_dir(args.data_dir)
    tokenizer = load_tokenizer(source)
    windows = training_windows(args.data, tokenizer, config, data_dir)
    teacher = teacher_name = None
    if config.loss == "kd":
        teacher, teacher_name = load_teacher(args, tokenizer, source)
    model, _ = load_model(source, dtype=DTYPES[args.dtype])
    monitor = None
    if args.monitor_ppl:
        monitor = ppl_monitor(tokenizer, data_dir, args.monitor_ppl, device)
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise SlicelmError(
            f"teacher {teacher_name} has another vocabulary than the student ({teacher.config.vocab_size} vs "
            f"{model.config.vocab_size} tokens); distil from the model it was sliced from"
        )
    if args.restart and work.exists() and processes.main:  # checked to be slicelm's own work folder when claimed
        shutil.rmtree(work)
    processes.barrier()
    try:
        model, report = _disk_checked(work, recovery.finetune)(  # a full disk: one line, the checkpoint kept
            model,
            tokenizer,
            args.data,
            config,
            teacher=teacher,
            work_dir=work,
            resume=args.resume,
            progress=not args.quiet and processes.main,
            device=device,
            windows=windows,
            monitor=monitor,
            processes=processes,
        )
    except KeyboardInterrupt:
        print(f"slicelm: interrupted; the last checkpoint is in {work}: continue with --resume", file=sys.stderr)
        return 130
    except Diverged as exc:
        raise SlicelmError(
            f"the training loss became non-finite at step {exc.step}: the run diverged; rerun with a lower --lr "
            f"and --restart (it discards the checkpoint in {work})"
        ) from None
    report.teacher = teacher_name
    if not processes.main:
        return 0  # rank 0 writes

    out = _disk_checked(work, save_finetuned)(model, claim, tokenizer, source.path, report.to_dict())
    shutil.rmtree(work, ignore_errors=True)  # slicelm's own work folder (checked when claimed)
    print(summary(report, out), file=sys.stderr)

    last = report.curve[-1] if report.curve else {}
    print(to_json({"out": str(out), "steps": report.steps, "tokens": report.tokens, **last}, indent=None))
    return 0


def _disk_checked(work: Path, function):
    """``function`` whose failed writes on a full (or read-only) disk are one line naming the way on:
    continue from the work folder's last checkpoint, or run again when there is none."""
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.recover.checkpoints import CHECKPOINT

    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            why = disk_refusal(exc)
            if why is None:
                raise
            if (work / CHECKPOINT / "state.json").is_file():
                way = f"the last checkpoint is in {work}: free space, then continue with --resume"
            else:
                way = "no checkpoint was kept: free space, then run the same command again"
            raise SlicelmError(f"the disk refused a write ({why}); no model was published; {way}") from None

    return call


def load_teacher(args: argparse.Namespace, tokenizer, source):
    """The KD teacher, ``--teacher`` or the source recorded in the folder, and its name."""
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.io.models import DTYPES, load_model
    from slicelm.recover.teacher import recorded_source

    name = args.teacher or recorded_source(source.path)
    if name is None:
        raise SlicelmError(f"--loss kd needs --teacher: {args.model} does not record the model it was sliced from")
    try:
        teacher, teacher_tokenizer = load_model(name, dtype=DTYPES[args.dtype])
    except SlicelmError as exc:
        if args.teacher:
            raise
        raise SlicelmError(
            f"--loss kd distils the teacher recorded in {args.model}, {name}, which cannot be loaded ({exc}); "
            "give --teacher, or use --loss lm"
        ) from None
    check_same_vocabulary(tokenizer, teacher_tokenizer, name)
    return teacher, name


def ppl_monitor(tokenizer, data_dir, windows: int, device):
    """WikiText-2 test perplexity on the first ``windows`` windows of 2048 (for training curves)."""
    # imported when the command runs: building the parser (--help) needs none of this
    from slicelm.io.data import load_eval_ids
    from slicelm.measure.perplexity import perplexity

    ids = load_eval_ids("wikitext2", tokenizer, data_dir=data_dir)

    def measure(model) -> dict[str, float]:
        return {
            "wikitext2_ppl": perplexity(model, ids.to(device), seqlen=2048, max_windows=windows, progress=False).ppl
        }

    return measure


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, teacher_name: str) -> None:
    """Distillation compares distributions token by token: the two must share one vocabulary."""
    probe = "The quick brown fox jumps over the lazy dog. 1234 ünïcode"
    same = (
        len(student_tokenizer) == len(teacher_tokenizer)
        and student_tokenizer(probe)["input_ids"] == (teacher_tokenizer(probe)["input_ids"])
    )
    if not same:
        raise SlicelmError(
            f"teacher {teacher_name} has another vocabulary than the student ({len(teacher_tokenizer)} vs "
            f"{len(student_tokenizer)} tokens); distil from the model it was sliced from"
        )


def summary(report, out: Path) -> str:
    first, last = (report.curve[0], report.curve[-1]) if report.curve else ({}, {})
    lines = [
        f"fine-tuned ({report.config['loss']}, {'full' if report.config['lora_rank'] is None else 'LoRA'}) -> {out}"
    ]
    lines.append(f"  steps {report.steps}, tokens {report.tokens:,}, trainable parameters {report.trainable_params:,}")
    if "heldout_lm" in first:
        lines.append(
            f"  held-out next-token loss {first['heldout_lm']:.4f} -> {last.get('heldout_lm', float('nan')):.4f}"
        )
    lines.append(f"  time {report.seconds:.0f}s (teacher {report.teacher_seconds:.0f}s)")
    return "\n".join(lines)
