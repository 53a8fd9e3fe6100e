"""Checkpoints of a run in its work folder, and ``--resume`` from them.

A checkpoint holds the trainable weights, the optimizer, the schedule, the data position and the report
(safetensors and JSON, nothing pickled), and digests of the student's and teacher's weights and of the token
windows: a resumed run continues only the run it was taken from, to the result an uninterrupted run gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import safetensors.torch  # called through the module, so tests can make the disk fail
import torch
from safetensors import SafetensorError
from torch import nn

from slicelm.errors import SlicelmError, first_line
from slicelm.io.outputs import to_json, write_manifest
from slicelm.recover.parallel import like, whole
from slicelm.recover.report import FinetuneReport

CHECKPOINT = "checkpoint"  # folder in the work dir: state.safetensors + state.json
WORK_KIND = "finetune-work"  # manifest kind of a work folder (see slicelm.io.outputs)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's tensors (names, dtypes, shapes, bytes): what a checkpoint was trained from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        if tensor.numel():
            digest.update(tensor.view(-1).view(torch.uint8).numpy())  # the buffer itself, not a copy
    return digest.hexdigest()


def windows_digest(*groups: Sequence[torch.Tensor]) -> str:
    """SHA-256 of token windows (training, held-out): the data a run reads, whatever flag chose it."""
    digest = hashlib.sha256()
    for group in groups:
        digest.update(f"group:{len(group)};".encode())
        for window in group:
            digest.update(window.to(torch.int64).contiguous().numpy().tobytes() + b";")
    return digest.hexdigest()


State = tuple[dict[str, torch.Tensor], list[dict]]  # a checkpoint's tensors and the optimizer's parameter groups


def checkpoint_state(student: nn.Module, optimizer) -> State:
    """What a checkpoint holds of the training: its tensors (trainable weights ``param.NAME``, optimizer
    moments ``optim.INDEX.KEY``) whole, and the optimizer's parameter groups. Sharded (FSDP) tensors are
    gathered: then every process calls it, and rank 0 writes."""
    tensors = {
        f"param.{n}": whole(p.detach()).clone().contiguous() for n, p in student.named_parameters() if p.requires_grad
    }
    optim = optimizer.state_dict()
    for index, entry in optim["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{index}.{key}"] = whole(torch.as_tensor(value).detach()).clone().contiguous()
    return tensors, optim["param_groups"]


def save_checkpoint(work: Path, state: State, scheduler, report: FinetuneReport, step: int, identity) -> None:
    """Atomically replace the work folder's checkpoint: ``state`` (:func:`checkpoint_state`: trainable weights
    and optimizer moments) as safetensors, step, schedule and report as JSON (nothing pickled)."""
    created = not work.exists()
    if created:
        work.mkdir(parents=True)
        write_manifest(work, WORK_KIND)
    tensors, param_groups = state
    tensors = {k: v.cpu() for k, v in tensors.items()}
    meta = {
        "step": step,
        "processes": report.processes,  # a checkpoint resumes with as many processes as took it
        "identity": identity,
        "param_groups": param_groups,
        "scheduler": scheduler.state_dict(),
        "report": report.to_dict(),
    }
    tmp = work / f".{CHECKPOINT}.tmp{os.getpid()}"
    try:
        tmp.mkdir(exist_ok=True)
        safetensors.torch.save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(to_json(meta) + "\n")
    except BaseException:  # a full disk: the last good checkpoint stays; a work folder without one goes
        shutil.rmtree(work if created else tmp, ignore_errors=True)
        raise
    old = work / f".{CHECKPOINT}.old{os.getpid()}"
    if (work / CHECKPOINT).exists():
        (work / CHECKPOINT).rename(old)
    tmp.rename(work / CHECKPOINT)
    if old.exists():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def check_processes(recorded: Any, processes: int) -> None:
    """A checkpoint resumes with the number of processes that took it (their data shares and the
    order of their float sums are part of the run)."""
    if recorded != processes:
        raise SlicelmError(
            f"--resume: the checkpoint was taken with {recorded} process(es), this run has {processes}; resume "
            f"with --num-processes {recorded} (or accelerate launch --num_processes {recorded}), or --restart"
        )


# Settings of where the run computes, not of what it computes (like --device): a resumed run may change them.
PLACEMENT = ("teacher_device",)


class DamagedCheckpoint(SlicelmError):
    """A work folder's checkpoint that cannot be read or does not fit this run."""


IDENTITY_CHANGES = {
    "student": "another student (the model's weights differ from the ones it was trained from)",
    "teacher": "another teacher (the teacher's weights differ: a changed folder or another --teacher)",
    "data": "other training data (--data, --data-dir, --seqlen or the source's text differ)",
}


def load_checkpoint(
    work: Path | None, student, optimizer, scheduler, report: FinetuneReport, config, identity: dict
) -> int:
    """Restore a checkpoint into this run's student, optimizer, schedule and report; the step reached.

    Refused (:class:`SlicelmError`) when it was taken with other settings, another student, teacher or
    data; :class:`DamagedCheckpoint` when it cannot be read or does not fit the run.
    """
    folder = work / CHECKPOINT if work is not None else None
    if folder is None or not work.is_dir():
        raise SlicelmError(f"--resume: no checkpoint in {work}; run without --resume to start")

    def damaged(why: str) -> DamagedCheckpoint:
        return DamagedCheckpoint(f"--resume: the checkpoint in {folder} is damaged ({why}); start again with --restart")

    if not (folder / "state.json").is_file():  # the work folder exists, so a checkpoint was written
        raise damaged("state.json is missing")

    try:
        meta = json.loads((folder / "state.json").read_text())
        saved = meta["report"]["config"]
        step = meta["step"]
        recorded = meta.get("identity")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise damaged(f"state.json: {type(exc).__name__}") from None
    total = config.total_steps()
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= total:
        raise damaged(f"step {step!r} outside this run's 0..{total}")
    scheduled = meta.get("scheduler", {}).get("last_epoch") if isinstance(meta.get("scheduler"), dict) else None
    if scheduled != step:  # the schedule advances once per step: a step edited by hand disagrees with it
        raise damaged(f"step {step} but its learning-rate schedule is at step {scheduled!r}")
    check_processes(meta.get("processes", 1), report.processes)
    wanted = json.loads(json.dumps(asdict(config) | {"peak_lr": config.peak_lr}))
    for key in PLACEMENT:
        wanted.pop(key, None)
    if isinstance(saved, dict):
        saved = {"kd_top_k": None} | saved  # a checkpoint from before the option: the exact loss
        saved = {k: v for k, v in saved.items() if k not in PLACEMENT}
    if saved != wanted:
        changed = sorted(k for k in wanted if not isinstance(saved, dict) or saved.get(k) != wanted[k])
        raise SlicelmError(
            f"--resume with other settings than the checkpoint ({', '.join(changed)}); use the same flags, "
            "or --restart to discard the checkpoint and start over"
        )
    if not isinstance(recorded, dict):
        raise damaged("it records no digest of the student, teacher and data")
    for key, what in IDENTITY_CHANGES.items():
        if recorded.get(key) != identity[key]:
            raise SlicelmError(f"--resume: the checkpoint was taken with {what}; resume the same run, or --restart")
    try:
        tensors = safetensors.torch.load_file(folder / "state.safetensors")
    except (OSError, SafetensorError) as exc:
        raise damaged(f"state.safetensors: {first_line(exc)}") from None
    names = {n: p for n, p in student.named_parameters() if p.requires_grad}
    params = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("param.")}
    if set(params) != set(names):
        raise damaged(f"{len(set(names) ^ set(params))} trainable weights missing or unexpected")
    wrong = next((n for n, v in params.items() if v.shape != names[n].shape), None)
    if wrong is not None:
        raise damaged(f"{wrong} is {tuple(params[wrong].shape)}, the model's is {tuple(names[wrong].shape)}")
    state: dict[int, dict[str, torch.Tensor]] = {}
    ordered = [p for group in optimizer.param_groups for p in group["params"]]  # the state's indices
    try:
        with torch.no_grad():
            for name, value in params.items():
                names[name].copy_(like(value, names[name]))  # a sharded weight keeps its own shard
            for key, value in tensors.items():
                kind, rest = key.split(".", 1)
                if kind == "optim":
                    index, name = rest.split(".", 1)
                    param = ordered[int(index)]
                    if value.shape == param.shape:  # a moment of a sharded weight is sharded as it is
                        value = like(value, param)
                    state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        scheduler.load_state_dict(meta["scheduler"])
        for key in ("curve", "tokens", "teacher_seconds", "seconds", "data"):
            setattr(report, key, meta["report"][key])
        report.tokens_per_process = meta["report"].get("tokens_per_process") or [report.tokens]
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as exc:
        raise damaged(f"{type(exc).__name__}: {first_line(exc)}") from None
    report.resumed_from = step
    return step
