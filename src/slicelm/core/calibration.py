"""Calibration signals: the inputs of decoder layer 0 for every calibration batch, and the hook
through which the layer walks reach the weights.

Both walks over the layers — :func:`slicelm.slicing.slice_model` and the statistics pre-pass of
:mod:`slicelm.core.statistics` — start from :func:`capture_layer_inputs` and touch modules only through a
:class:`WeightAccess`, so the same code serves in-memory, streamed and device runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slicelm.core.arch import Layout
from slicelm.core.offload import ActivationStore
from slicelm.modeling.modeling_slicelm import get_module, split_layer_call


@dataclass
class Batch:
    """One calibration batch, captured at the input of decoder layer 0.

    mask: (B, T) bool, True on real tokens (padding never enters the statistics); kwargs: what the
    model passes to each decoder layer (attention mask, position embeddings, ...), on the model's
    device. The batch's stream itself, (B, T, d), lives in an :class:`ActivationStore` under
    ``("x", index)`` so it can be spilled to disk.
    """

    mask: torch.Tensor
    kwargs: dict[str, Any]


class WeightAccess:
    """How slicing reaches the weights of a module (a path relative to the model).

    The default does nothing: the whole model is in memory. The streaming path
    (:mod:`slicelm.streaming`) loads a module from disk in :meth:`load` and writes it out and frees
    it in :meth:`done`, so one algorithm serves both.
    """

    def load(self, model: nn.Module, path: str) -> None:
        """Called before ``path`` is read or modified."""

    def done(self, model: nn.Module, path: str) -> None:
        """Called once ``path`` holds its final sliced weights."""

    def release(self, model: nn.Module, path: str) -> None:
        """Called when ``path`` was only read (a statistics pass): it may be freed, not written."""


class _Stop(Exception):
    """Raised from a hook to end a forward pass once layer 0's inputs are caught."""


def pad_batches(
    samples: Sequence[torch.Tensor], batch_size: int, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-pad 1-D token sequences into (B, T) ``input_ids`` and bool ``attention_mask``."""
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        length = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.bool)
        for row, sample in enumerate(chunk):
            ids[row, : len(sample)] = sample
            mask[row, : len(sample)] = True
        yield ids, mask


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    layout: Layout,
    samples: Sequence[torch.Tensor],
    batch_size: int,
    pad_id: int,
    store: ActivationStore,
    progress: bool = True,
) -> list[Batch]:
    """Run the embeddings on every batch and catch what decoder layer 0 receives (into ``store``)."""
    first = get_module(model, layout.layers)[0]
    device = get_module(model, layout.embeddings[0]).weight.device
    caught: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        caught["hidden"], caught["kwargs"] = split_layer_call(module, args, kwargs)  # names positional args
        raise _Stop

    batches = []
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        total = math.ceil(len(samples) / batch_size)
        for ids, mask in tqdm(
            pad_batches(samples, batch_size, pad_id), total=total, desc="embed", disable=not progress
        ):
            try:
                model(input_ids=ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
            except _Stop:
                pass
            store[("x", len(batches))] = caught["hidden"]
            batches.append(Batch(mask, caught["kwargs"]))
    finally:
        handle.remove()
    return batches
