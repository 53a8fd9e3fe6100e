"""Calibration activations in bounded memory.

Layer-wise slicing keeps, for every calibration batch, the residual stream at the current point.
For a large model and many samples that exceeds RAM, so :class:`ActivationStore` keeps tensors in
memory up to a byte budget and spills the rest to memory-mapped files in an offload folder (read
back page by page, one batch at a time, never all at once).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import torch

from slicelm.errors import SlicelmError
from slicelm.io.outputs import remove_stale, temp_name

OFFLOAD_PREFIX = "slicelm-offload"  # + host, pid and a random part: see slicelm.io.outputs.remove_stale
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


class ActivationStore:
    """A list of tensors, in RAM while ``max_bytes`` allows, else memory-mapped under ``offload_dir``."""

    def __init__(self, max_bytes: int | None = None, offload_dir: str | Path | None = None) -> None:
        self.max_bytes = max_bytes
        self._root = Path(offload_dir) if offload_dir else None
        self._dir: Path | None = None
        self._items: dict[Hashable, torch.Tensor] = {}
        self._ram_bytes: dict[Hashable, int] = {}
        self._generation = 0  # file names change on every overwrite so live memmaps are never clobbered
        self._spills = 0

    @property
    def ram_bytes(self) -> int:
        return sum(self._ram_bytes.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, index: Hashable) -> bool:
        return index in self._items

    def __getitem__(self, index: Hashable) -> torch.Tensor:
        return self._items[index]

    def __delitem__(self, index: Hashable) -> None:
        del self._items[index]
        self._ram_bytes.pop(index, None)

    @property
    def spilled(self) -> int:
        """How many tensors were ever written to memory-mapped files (a cumulative count)."""
        return self._spills

    def __setitem__(self, index: Hashable, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu")
        self._ram_bytes.pop(index, None)
        self._items.pop(index, None)
        size = tensor.numel() * tensor.element_size()
        if self.max_bytes is None or self.ram_bytes + size <= self.max_bytes or tensor.dtype not in _NUMPY:
            self._items[index] = tensor.contiguous()
            self._ram_bytes[index] = size
            return
        self._items[index] = self._spill(index, tensor)

    def _spill(self, index: Hashable, tensor: torch.Tensor) -> torch.Tensor:
        if self._dir is None:
            root = self._root if self._root is not None else Path(tempfile.gettempdir())
            root.mkdir(parents=True, exist_ok=True)
            remove_stale(root, OFFLOAD_PREFIX)  # left by runs that were killed
            self._dir = Path(tempfile.mkdtemp(prefix=temp_name(OFFLOAD_PREFIX), dir=root))
        self._generation += 1
        self._spills += 1
        path = self._dir / f"act-{self._generation}.bin"
        reserve(path, tensor.numel() * tensor.element_size(), self._dir.parent)
        array = np.memmap(path, dtype=_NUMPY[tensor.dtype], mode="w+", shape=tuple(tensor.shape))
        array[:] = tensor.numpy()
        array.flush()
        del array
        mapped = np.memmap(path, dtype=_NUMPY[tensor.dtype], mode="r+", shape=tuple(tensor.shape))
        path.unlink()  # the mapping keeps the data alive; nothing is left behind on exit
        return torch.from_numpy(mapped)

    def close(self) -> None:
        self._items.clear()
        self._ram_bytes.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def reserve(path: Path, size: int, root: Path) -> None:
    """Allocate ``size`` bytes for ``path`` before it is memory-mapped: a full disk then fails here
    with one line instead of killing the process with SIGBUS when a mapped page cannot be stored."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        if size and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise SlicelmError(
            f"the offload folder {root} cannot hold {size / 2**20:.1f} MiB more of calibration activations "
            f"({exc.strerror}); free space there, choose another --offload-dir, or raise --max-memory"
        ) from None
    finally:
        os.close(fd)


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1.5G', '1000000' -> bytes."""
    units = {
        "": 1,
        "b": 1,
        "k": 10**3,
        "kb": 10**3,
        "kib": 2**10,
        "m": 10**6,
        "mb": 10**6,
        "mib": 2**20,
        "g": 10**9,
        "gb": 10**9,
        "gib": 2**30,
        "t": 10**12,
        "tb": 10**12,
        "tib": 2**40,
    }
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 2GiB or 512MB") from None
    if not math.isfinite(value) or value <= 0 or value >= 2**63:
        raise ValueError(f"{text!r} is not a usable size; give a positive size such as 2GiB")
    return int(value)
