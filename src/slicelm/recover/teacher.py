"""The KD teacher: the dense model a slicelm output records as its source, and the teacher's outputs on the
held-out windows, computed once per run."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from slicelm.recover.config import FinetuneConfig
from slicelm.recover.losses import LOGITS, Head, forward_hidden
from slicelm.recover.parallel import Processes
from slicelm.recover.windows import own_batches


@dataclass
class TeacherTargets:
    """The teacher's outputs on the held-out windows: per batch, its final hidden states on the
    real next-token positions, (N, H) on the CPU, and its head (projected block by block when scored)."""

    hidden: list[torch.Tensor]
    head: Head


@torch.no_grad()
def teacher_targets(
    teacher, windows, config: FinetuneConfig, pad_id: int, device, processes: Processes | None = None
) -> TeacherTargets:
    """The teacher's held-out outputs, computed once per run (the teacher never changes), on this
    process's share of the held-out batches.

    Its final hidden states are kept rather than its logits: H numbers per token instead of V (576
    against 49,152 on SmolLM2), exact, and the KD loss projects them block by block.
    """
    out, head = [], LOGITS
    for ids, mask in own_batches(windows, pad_id, config, processes or Processes()):
        ids, mask = ids.to(device), mask.to(device)
        hidden, head = forward_hidden(teacher, ids, mask)
        out.append(hidden[:, :-1][mask[:, 1:].bool()].cpu())
    return TeacherTargets(out, head)


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
