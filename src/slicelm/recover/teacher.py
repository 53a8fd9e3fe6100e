"""The KD teacher: the dense model a slicelm output records as its source, the device it runs on, the
teacher's outputs on the held-out windows, computed once per run, and its top-k targets on the training
batches (``kd_top_k``), computed once and kept with the checkpoints."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from slicelm.core.devices import resolve_device
from slicelm.errors import SlicelmError
from slicelm.recover.config import FinetuneConfig
from slicelm.recover.losses import LOGITS, Head, TopK, forward_hidden, top_k
from slicelm.recover.parallel import Processes
from slicelm.recover.windows import own_batches


def teacher_device(name: str | None, student: torch.device | str, processes: int = 1) -> torch.device:
    """Where the teacher is held and run: ``name`` (``--teacher-device``), else beside the student.

    Its outputs are moved to the student's device for the loss. With several processes each process
    holds its own teacher, and a device named here would be the same device for all of them: only
    ``cpu`` is taken (the default already puts each process's teacher on its own student's device).
    An unusable device is one line (:func:`slicelm.core.devices.resolve_device`).
    """
    if name is None:
        return torch.device(student)
    if processes > 1 and name != "cpu":
        raise SlicelmError(
            f"--teacher-device {name} with {processes} processes would put every process's teacher on one device; "
            "drop it (each teacher then runs beside its process's student) or use --teacher-device cpu"
        )
    return resolve_device(name, flag="--teacher-device")


@dataclass
class TeacherTargets:
    """The teacher's outputs on the held-out windows: per batch, its final hidden states on the
    real next-token positions, (N, H) on the CPU, and its head (projected block by block when scored)."""

    hidden: list[torch.Tensor]
    head: Head

    def to(self, device) -> TeacherTargets:
        """The same targets with the head on ``device``, where the loss is computed (the hidden states
        stay on the CPU: each batch's are moved when scored)."""
        return TeacherTargets(self.hidden, self.head.to(device))


@torch.no_grad()
def teacher_targets(
    teacher, windows, config: FinetuneConfig, pad_id: int, device, processes: Processes | None = None
) -> TeacherTargets:
    """The teacher's held-out outputs, computed once per run (the teacher never changes), on this
    process's share of the held-out batches, run on ``device`` (the teacher's).

    Its final hidden states are kept rather than its logits: H numbers per token instead of V (576
    against 49,152 on SmolLM2), exact, and the KD loss projects them block by block.
    """
    out, head = [], LOGITS
    for ids, mask in own_batches(windows, pad_id, config, processes or Processes()):
        ids, mask = ids.to(device), mask.to(device)
        hidden, head = forward_hidden(teacher, ids, mask)
        out.append(hidden[:, :-1][mask[:, 1:].bool()].cpu())
    return TeacherTargets(out, head)


class TeacherTopK:
    """The teacher's :class:`~slicelm.recover.losses.TopK` on this process's training micro-batches, by the
    micro-batch's index in the run (``step * grad_accum + micro``): one row per real next-token position.

    Filled once (:meth:`add`, before the first step), then every step takes its targets instead of running
    the teacher. Held in memory (``8 k + 4`` bytes a token in float32) until its step takes it: a run never
    trains on a window twice, so a taken entry is not needed again. In a single-process run the entries
    still held are also written beside the first checkpoint of the work folder, so a resumed run reads
    them and runs no teacher forward on training batches. It is a cache: a file that is unreadable or
    was made with another teacher, data, k or temperature is ignored (the entries are computed again).
    """

    FILE = "teacher_topk.safetensors"

    def __init__(self, k: int, temperature: float):
        self.k, self.temperature = k, temperature
        self.entries: dict[int, TopK] = {}
        self.loaded = 0  # entries read from a work folder
        self.saved = False  # every entry is in the work folder's file

    def __contains__(self, index: int) -> bool:
        return index in self.entries

    def take(self, index: int) -> TopK:
        return self.entries.pop(index)

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries.values())

    @torch.no_grad()
    def add(self, index: int, teacher, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """The teacher's top k on one micro-batch, ids/mask (B, T), at its real next-token positions."""
        hidden, head = forward_hidden(teacher, ids, mask)  # (B, T, H)
        kept = hidden[:, :-1][mask[:, 1:].bool()]  # (N, H): the rows the loss scores
        self.entries[index] = top_k(kept, head, self.k, self.temperature).to("cpu")
        self.saved = False

    def _meta(self, identity: dict) -> dict[str, str]:
        return {"k": str(self.k), "temperature": repr(self.temperature)} | {
            key: str(identity.get(key)) for key in ("teacher", "data")
        }

    def save(self, work: Path, identity: dict) -> None:
        """Write every entry to ``work`` (atomically: a temporary file renamed)."""
        tensors = {}
        for index, entry in self.entries.items():
            tensors |= {f"{index}.ids": entry.ids, f"{index}.log_p": entry.log_p, f"{index}.log_tail": entry.log_tail}
        tmp = work / f".{self.FILE}.tmp"
        try:
            safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, self._meta(identity))
        except BaseException:  # a full disk: the checkpoint stands, a resumed run computes the entries again
            tmp.unlink(missing_ok=True)
            raise
        tmp.rename(work / self.FILE)
        self.saved = True

    def load(self, work: Path, identity: dict, first: int = 0) -> None:
        """Read the entries from index ``first`` on that a run with the same teacher, data, k and
        temperature wrote into ``work``."""
        path = work / self.FILE
        try:
            with safetensors.safe_open(path, framework="pt") as f:
                if f.metadata() != self._meta(identity):
                    return
                tensors = {key: f.get_tensor(key) for key in f.keys()}
            indexes = {int(key.split(".", 1)[0]) for key in tensors} - set(range(first))
            entries = {i: TopK(tensors[f"{i}.ids"], tensors[f"{i}.log_p"], tensors[f"{i}.log_tail"]) for i in indexes}
        except (OSError, SafetensorError, ValueError, KeyError):
            return
        self.entries |= entries
        self.loaded, self.saved = len(entries), True


def recorded_source(folder: str | Path) -> str | None:
    """The dense model a slicelm output was made from (its config section or report), if recorded."""
    folder = Path(folder)
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((folder / "config.json").read_text())
        section = config.get("slicelm")
        if isinstance(section, dict) and section.get("source_model"):
            return section["source_model"]
    with contextlib.suppress(OSError, ValueError):
        report = json.loads((folder / "slicelm_report.json").read_text())
        for key in ("source_model", "model"):
            value = (report.get("provenance") or {}).get(key) or report.get(key)
            if value:
                return value
    return None
