"""The processes of one training run: this process alone, or data-parallel processes under accelerate.

``accelerate launch -m slicelm finetune ...`` (or ``slicelm finetune --num-processes N``, which calls
accelerate's own launcher) starts N processes; each builds :func:`Processes.from_environment`, which
wraps an ``accelerate.Accelerator``. Without a launcher it is :class:`Processes` itself: one process,
every collective the identity, so the single-process path runs exactly the code it always ran.

Sharded (FSDP) runs: when accelerate's configuration asks for FSDP (``accelerate launch --use_fsdp``, or
``slicelm finetune --fsdp``), the processes shard the student with torch's own FSDP2 (``fully_shard``: each
decoder layer, then the rest) on accelerate's processes and devices. Sharding is done here rather than
by ``accelerator.prepare_model`` because accelerate runs FSDP on GPUs only, and the same code must run,
and be tested, on CPU processes (gloo). Read from accelerate's configuration: ``FSDP_RESHARD_AFTER_FORWARD``
(keep the layers' weights whole between the forward and the backward when false); parameter offload is
refused in one line; the wrap policy is always per decoder layer.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from slicelm.errors import SlicelmError


def sharding_requested() -> bool:
    """Whether accelerate's launcher was told to shard (``--use_fsdp``, or a config file answering FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) one, gathered from every process (a collective: every
    process calls it, in the same order); any other tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def like(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``value`` (whole, the same on every process) sharded as ``reference`` is; itself when the reference
    is not sharded. No communication: each process keeps its own shard of its own copy."""
    if not hasattr(reference, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor

    mesh = reference.device_mesh
    value = value.to(device=mesh.device_type, dtype=reference.dtype)
    return distribute_tensor(value, mesh, reference.placements, src_data_rank=None)


def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (no memory; ties kept), buffers copied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def gather_into(sharded: nn.Module, twin: nn.Module) -> nn.Module:
    """``twin`` (a :func:`meta_twin` of ``sharded`` before it was sharded) holding ``sharded``'s whole
    weights on the CPU, gathered from every process; tied weights stay tied. Every process calls it."""
    gathered: dict[int, nn.Parameter] = {}
    pairs = zip(sharded.named_modules(), twin.named_modules(), strict=True)
    for (name, module), (twin_name, target) in pairs:
        if name != twin_name:
            raise RuntimeError(f"the sharded model's module {name} is {twin_name} in its twin")
        for key, param in module.named_parameters(recurse=False):
            if id(param) not in gathered:
                gathered[id(param)] = nn.Parameter(whole(param.detach()).cpu(), requires_grad=False)
            setattr(target, key, gathered[id(param)])
    return twin


def launched() -> bool:
    """Whether this process was started by accelerate's (or torchrun's) launcher."""
    world = os.environ.get("WORLD_SIZE", "1")
    return "ACCELERATE_MIXED_PRECISION" in os.environ or (world.isdigit() and int(world) > 1)


class Processes:
    """One process: rank 0 of 1. The base of :class:`Accelerated`; every collective is the identity."""

    rank = 0
    world = 1
    kind = "single"
    sharded = False  # FSDP: each process holds a shard of every weight

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_environment(device: torch.device | str = "cpu", shard: bool | None = None) -> Processes:
        """The launcher's processes when launched (see :func:`launched`), else this one alone.
        shard: FSDP (None: as accelerate's configuration says)."""
        return Accelerated(device, shard) if launched() else Processes()

    @property
    def device(self) -> torch.device | None:
        return None  # the caller's

    def prepare(self, model: nn.Module, units: Sequence[nn.Module] = ()) -> nn.Module:
        """The module to train through (DDP-wrapped, or sharded by FSDP in ``units`` and the rest, under
        accelerate)."""
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

    def __init__(self, device: torch.device | str = "cpu", shard: bool | None = None):
        from accelerate import Accelerator  # heavy dependency: only multi-process runs need it

        self.sharded = sharding_requested() if shard is None else shard
        if self.sharded and os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
            raise SlicelmError(
                "finetune does not offload sharded parameters to the CPU yet; launch without --fsdp_offload_params"
            )
        if self.sharded and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
            # transformers then loads the weights on rank 0 only, for accelerate's prepare to broadcast; slicelm
            # shards with torch itself, so every process loads them (measured: other ranks trained other weights)
            raise SlicelmError(
                "finetune's sharded processes each load the weights: launch with --fsdp_cpu_ram_efficient_loading "
                "false (slicelm finetune --num-processes N --fsdp does)"
            )
        self.reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
        try:
            self.accelerator = Accelerator(cpu=torch.device(device).type == "cpu")
        except (RuntimeError, ValueError) as exc:  # e.g. FSDP's sync_module_states on CPU processes
            raise SlicelmError(f"accelerate could not start this process: {str(exc).strip().splitlines()[0]}") from None
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.kind = "fsdp" if self.sharded else str(self.accelerator.distributed_type).rsplit(".", 1)[-1].lower()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def prepare(self, model: nn.Module, units: Sequence[nn.Module] = ()) -> nn.Module:
        if not self.sharded:
            return self.accelerator.prepare_model(model)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        for unit in units:  # each decoder layer is gathered whole only while it computes
            fully_shard(unit, mesh=mesh, reshard_after_forward=self.reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard)
        return model

    def sync(self, model: nn.Module, last: bool):
        if last:
            return contextlib.nullcontext()
        return _no_gradient_sync(model) if self.sharded else self.accelerator.no_sync(model)

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
        if self.sharded:  # the norm of sharded gradients is summed over the processes by torch itself
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            self.accelerator.clip_grad_norm_(params, max_norm)


@contextlib.contextmanager
def _no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """A sharded model's backward keeps its gradients whole here (accumulated) instead of reducing them."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
