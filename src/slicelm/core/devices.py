"""Where computation runs: ``--device`` (default: cuda when available, else the CPU).

Slicing on an accelerator keeps the model on the CPU and moves only the decoder layer being
processed (and its calibration signals) to the device, so a model larger than the device's memory
can still be sliced there: :class:`DeviceAccess` wraps the :class:`~slicelm.slicing.WeightAccess`
hook that slicing already calls around every module.

The CPU is the tested path; the accelerator path is exercised only where one is available.
"""

from __future__ import annotations

import torch
from torch import nn

from slicelm.errors import SlicelmError
from slicelm.modeling.modeling_slicelm import get_module


def resolve_device(name: str | torch.device | None, flag: str = "--device") -> torch.device:
    """A usable torch device: ``name``, or cuda when available, else cpu. Unavailable -> one line
    naming ``flag`` (the option that gave it)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SlicelmError(f"{flag} {name}: unknown device; use e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise SlicelmError(
                f"{flag} {name}: no CUDA device is available (torch {torch.__version__}, {build}); use {flag} cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SlicelmError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise SlicelmError(f"{flag} {name}: MPS is not available here; use {flag} cpu")
    elif device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise SlicelmError(f"{flag} {name}: unsupported device type {device.type!r}; use cpu or cuda")
    return device


def is_materialized(module: nn.Module) -> bool:
    return all(t.device.type != "meta" for t in [*module.parameters(), *module.buffers()])


class DeviceAccess:
    """A weight-access hook that runs each module on ``device`` and parks it on ``home`` when done.

    Wraps another hook (in-memory or streaming) so both paths gain device support unchanged.
    """

    def __init__(self, inner, device: torch.device, home: torch.device | str = "cpu") -> None:
        self.inner, self.device, self.home = inner, torch.device(device), torch.device(home)

    def load(self, model: nn.Module, path: str) -> None:
        self.inner.load(model, path)
        get_module(model, path).to(self.device)

    def done(self, model: nn.Module, path: str) -> None:
        self.inner.done(model, path)
        self._park(model, path)

    def release(self, model: nn.Module, path: str) -> None:
        self.inner.release(model, path)
        self._park(model, path)

    def _park(self, model: nn.Module, path: str) -> None:
        module = get_module(model, path)
        if is_materialized(module):  # streaming frees written modules (back to meta): nothing to move
            module.to(self.home)


def move_buffers_outside(model: nn.Module, skip: str, device: torch.device) -> None:
    """Move the buffers of every module outside ``skip`` (the decoder layers) to ``device``.

    The model's own forward computes rotary tables and masks from them, next to the embeddings.
    """
    skipped = get_module(model, skip)
    inside = {id(b) for b in skipped.buffers()}
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if id(buffer) not in inside and buffer.device.type != "meta":
                module.register_buffer(
                    name, buffer.to(device), persistent=name not in module._non_persistent_buffers_set
                )
