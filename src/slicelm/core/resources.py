"""Parameter counts and peak memory, for reports and benchmarks."""

from __future__ import annotations

import os
import resource
import sys

import torch
from torch import nn

from slicelm.core.offload import parse_bytes
from slicelm.errors import SlicelmError


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied embedding/head pair counts once)."""
    return sum(p.numel() for p in model.parameters())


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakMemory:
    """Tracks peak host RSS and, when CUDA is used, peak device memory."""

    def __init__(self) -> None:
        self.rss = peak_rss_bytes()
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def sample(self) -> None:
        self.rss = max(self.rss, peak_rss_bytes())

    def as_dict(self) -> dict[str, float]:
        self.sample()
        out = {"peak_rss_gib": self.rss / 2**30}
        if self.cuda:
            out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out


AVAILABLE_MEMORY_ENV = "SLICELM_AVAILABLE_MEMORY"  # e.g. "8GiB": pretend only this much memory is free


def available_memory_bytes() -> int | None:
    """Memory this process can still use without swapping: ``$SLICELM_AVAILABLE_MEMORY`` if set,
    else the kernel's MemAvailable (Linux), else None (unknown)."""
    override = os.environ.get(AVAILABLE_MEMORY_ENV)
    if override:
        try:
            return parse_bytes(override)
        except ValueError as exc:
            raise SlicelmError(f"${AVAILABLE_MEMORY_ENV}={override!r}: {exc}; give a size such as 8GiB") from None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_memory_bytes(device: torch.device) -> int | None:
    """Memory still free on ``device``: a CUDA device's free memory (``torch.cuda.mem_get_info``), the
    host's for the CPU (:func:`available_memory_bytes`), None where unknown (mps, xpu)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return available_memory_bytes()
    return None
