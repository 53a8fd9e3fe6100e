"""The processes of one training run: this process alone, or data-parallel processes under accelerate.

``accelerate launch -m slicelm finetune ...`` (or ``slicelm finetune --num-processes N``, which calls
accelerate's own launcher) starts N processes; each builds :func:`Processes.from_environment`, which
wraps an ``accelerate.Accelerator``. Without a launcher it is :class:`Processes` itself: one process,
every collective the identity, so the single-process path runs exactly the code it always ran.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn


def launched() -> bool:
    """Whether this process was started by accelerate's (or torchrun's) launcher."""
    world = os.environ.get("WORLD_SIZE", "1")
    return "ACCELERATE_MIXED_PRECISION" in os.environ or (world.isdigit() and int(world) > 1)


class Processes:
    """One process: rank 0 of 1. The base of :class:`Accelerated`; every collective is the identity."""

    rank = 0
    world = 1
    kind = "single"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_environment(device: torch.device | str = "cpu") -> Processes:
        """The launcher's processes when launched (see :func:`launched`), else this one alone."""
        return Accelerated(device) if launched() else Processes()

    @property
    def device(self) -> torch.device | None:
        return None  # the caller's

    def prepare(self, model: nn.Module) -> nn.Module:
        """The module to train through (DDP / FSDP-wrapped under accelerate)."""
        return model

    def sync(self, model: nn.Module, last: bool):
        """Context for one micro-batch's backward: gradients are exchanged on the ``last`` only."""
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the processes (float64)."""
        return list(values)

    def gather(self, value: int) -> list[int]:
        return [value]

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process."""
        return value

    def barrier(self) -> None:
        pass

    def clip(self, params: list[nn.Parameter], max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


class Accelerated(Processes):
    """Data-parallel processes through ``accelerate.Accelerator`` (DDP, or FSDP as configured)."""

    def __init__(self, device: torch.device | str = "cpu"):
        from accelerate import Accelerator  # heavy dependency: only multi-process runs need it

        self.accelerator = Accelerator(cpu=torch.device(device).type == "cpu")
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.kind = str(self.accelerator.distributed_type).rsplit(".", 1)[-1].lower()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def prepare(self, model: nn.Module) -> nn.Module:
        return self.accelerator.prepare_model(model)

    def sync(self, model: nn.Module, last: bool):
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def autocast(self):
        return self.accelerator.autocast()

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.accelerator.reduce(tensor, reduction="sum").tolist()

    def gather(self, value: int) -> list[int]:
        if self.world == 1:
            return [value]
        return self.accelerator.gather(torch.tensor([value], device=self.device)).tolist()

    def broadcast(self, value: Any) -> Any:
        from accelerate.utils import broadcast_object_list  # heavy dependency: only multi-process runs need it

        return broadcast_object_list([value])[0] if self.world > 1 else value

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def clip(self, params: list[nn.Parameter], max_norm: float) -> None:
        self.accelerator.clip_grad_norm_(params, max_norm)
