"""Calibration statistics of the unsliced model, gathered in one read-only pass before slicing.

Two decisions have to see every layer before the first one is changed:

* the **plain layout**'s single basis: the PCA of the residual stream's second moments taken over
  every point of the stream (:func:`global_basis`);
* **non-uniform budgets**: how much output error each layer's MLP incurs per channel removed (the
  OBS removal curves of :mod:`slicelm.steps.channels`), and how much stream energy each width drops.

:func:`collect_statistics` walks the decoder layers of the *original* model on the captured
calibration inputs (through the same :class:`~slicelm.core.calibration.WeightAccess` hook as slicing,
so a streamed model is read one layer at a time and nothing is written). For RMSNorm families the
stream is the same before and after norm fusion, so these statistics describe the fused model too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch
from torch import nn
from tqdm.auto import tqdm

from slicelm.core.arch import Layout
from slicelm.core.calibration import Batch, WeightAccess
from slicelm.core.offload import ActivationStore
from slicelm.core.pca import CovarianceAccumulator, pca
from slicelm.errors import SlicelmError
from slicelm.modeling.modeling_slicelm import get_module, stream_weight
from slicelm.steps.channels import obs_prune

Weighting = Literal["sum", "normalized"]


@dataclass
class ModelStatistics:
    """Per-point stream moments and per-layer MLP removal curves of the unsliced model.

    moments: point name -> (D, D) float64 second moment per token, kept in an ActivationStore
    (memory-mapped beyond its budget); names as slicing reports them (``embedding``,
    ``layer3.attn``, ``layer3.mlp``, or ``layer3`` for parallel blocks).
    mlp_cost: layer -> (I - 1,) cumulative MLP output error per token after removing 1, 2, ...
    channels (structured OBS with refit); mlp_point: layer -> the point the MLP writes into.
    """

    store: ActivationStore
    points: list[str] = field(default_factory=list)
    traces: dict[str, float] = field(default_factory=dict)
    mlp_cost: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp_point: dict[int, str] = field(default_factory=dict)

    def moment(self, point: str) -> torch.Tensor:
        return self.store[("moment", point)]

    @property
    def has_moments(self) -> bool:
        """The stream moments are held (not cleared): a one-basis plan's basis can be chosen from them."""
        return bool(self.points) and all(("moment", p) in self.store for p in self.points)

    def center(self) -> None:
        """Moments of the mean-centred stream, ``P M P`` with ``P = I - 11^T/D``.

        A LayerNorm family's executor centres every writer (so the stream it slices is ``x P``);
        statistics gathered on the unmodified model describe that stream after this projection.
        """
        for point in self.points:
            m = self.moment(point).to(torch.float64)
            centred = m - m.mean(dim=0, keepdim=True)
            centred = centred - centred.mean(dim=1, keepdim=True)
            self.store[("moment", point)] = centred
            self.traces[point] = torch.trace(centred).item()

    def clear(self) -> None:
        """Free the stored moments (the curves and traces stay)."""
        for point in self.points:
            if ("moment", point) in self.store:
                del self.store[("moment", point)]

    def save(self, folder: str | Path) -> None:
        """Write the statistics (safetensors + JSON), so runs on the same model and calibration reuse them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"moment.{p}": self.moment(p).contiguous() for p in self.points if ("moment", p) in self.store}
        tensors |= {f"mlp_cost.{i}": c.contiguous() for i, c in self.mlp_cost.items()}
        safetensors.torch.save_file(tensors, folder / "statistics.safetensors")
        meta = {
            "points": self.points,
            "traces": self.traces,
            "mlp_point": {str(k): v for k, v in self.mlp_point.items()},
        }
        (folder / "statistics.json").write_text(json.dumps(meta) + "\n")

    @classmethod
    def load(cls, folder: str | Path, store: ActivationStore) -> ModelStatistics:
        folder = Path(folder)
        meta = json.loads((folder / "statistics.json").read_text())
        stats = cls(store, list(meta["points"]), dict(meta["traces"]))
        for name, tensor in safetensors.torch.load_file(folder / "statistics.safetensors").items():
            kind, key = name.split(".", 1)
            if kind == "moment":
                store[("moment", key)] = tensor
            else:
                stats.mlp_cost[int(key)] = tensor
        stats.mlp_point = {int(k): v for k, v in meta["mlp_point"].items()}
        return stats

    def combined(self, weighting: Weighting = "normalized") -> torch.Tensor:
        """Sum of every point's moment, each divided by its trace (``normalized``) or as is (``sum``)."""
        total = None
        for point in self.points:
            m = self.moment(point).to(torch.float64)
            m = m / max(self.traces[point], 1e-30) if weighting == "normalized" else m
            total = m.clone() if total is None else total.add_(m)
        return total


def point_names(layout: Layout, num_layers: int) -> list[str]:
    names = ["embedding"]
    for i in range(num_layers):
        names += [f"layer{i}"] if layout.parallel else [f"layer{i}.attn", f"layer{i}.mlp"]
    return names


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    layout: Layout,
    batches: list[Batch],
    store: ActivationStore,
    access: WeightAccess,
    *,
    device: torch.device | str = "cpu",
    moments: bool = True,
    mlp_curves: bool = False,
    progress: bool = True,
) -> ModelStatistics:
    """One read-only walk over the original layers; ``store["x", i]`` holds layer 0's inputs.

    The inputs are consumed (the store then holds the last layer's outputs); the caller captures
    them again before slicing.
    """
    stats = ModelStatistics(store)
    layers = get_module(model, layout.layers)
    pending: dict[str, CovarianceAccumulator] = {}

    def accumulator(point: str, dim: int) -> CovarianceAccumulator:
        if point not in pending:
            pending[point] = CovarianceAccumulator(dim, device=device)
        return pending[point]

    def finish(point: str) -> None:
        acc = pending.pop(point)
        cov = acc.covariance()
        if not bool(torch.isfinite(cov).all()):
            raise SlicelmError(f"the residual stream at {point} holds non-finite values on the calibration data")
        if moments:
            store[("moment", point)] = cov
        stats.points.append(point)
        stats.traces[point] = torch.trace(cov).item()

    hidden = model.config.hidden_size
    caught: dict[str, torch.Tensor] = {}  # what the hooks see during one layer's call

    def catch(key: str):
        return lambda _module, args: caught.__setitem__(key, args[0])

    for i, b in enumerate(batches):
        accumulator("embedding", hidden).add(store[("x", i)].to(device), b.mask.to(device))
    finish("embedding")

    for index, layer in enumerate(tqdm(layers, desc="statistics", disable=not progress)):
        path = f"{layout.layers}.{index}"
        access.load(model, path)
        mid = None if layout.parallel else f"layer{index}.attn"
        out = f"layer{index}" if layout.parallel else f"layer{index}.mlp"
        hooks = []
        if mid is not None:  # the MLP norm reads the stream after attention
            hooks.append(get_module(layer, layout.mlp_norm).register_forward_pre_hook(catch("mid")))
        writer = get_module(layer, layout.mlp_outputs[0]) if mlp_curves else None
        if writer is not None:
            hooks.append(writer.register_forward_pre_hook(catch("h")))
        try:
            for i, b in enumerate(batches):
                mask = b.mask.to(device)
                x = store[("x", i)].to(device)
                y = layer(x, **b.kwargs)
                y = y[0] if isinstance(y, tuple) else y
                if mid is not None:
                    accumulator(mid, hidden).add(caught.pop("mid"), mask)
                if writer is not None:
                    h = caught.pop("h")
                    accumulator(f"mlp{index}", h.shape[-1]).add(h, mask)
                accumulator(out, hidden).add(y, mask)
                store[("x", i)] = y
        finally:
            for hook in hooks:
                hook.remove()
        if mid is not None:
            finish(mid)
        finish(out)
        if writer is not None:
            cov = pending.pop(f"mlp{index}").covariance()
            w = stream_weight(writer, "writer")  # (I, D)
            stats.mlp_cost[index] = obs_prune(w, cov, keep=1).removal_cost.cpu()
            stats.mlp_point[index] = out
        access.release(model, path)
    return stats


def global_basis(stats: ModelStatistics, weighting: Weighting = "normalized") -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues, Q (D, D)) of the combined stream moments: one basis for every point."""
    return pca(stats.combined(weighting))


def channel_basis(stats: ModelStatistics, weighting: Weighting = "normalized") -> torch.Tensor:
    """A permutation (D, D) sorting the stream's coordinates by their combined energy (no rotation).

    Keeping its first k columns keeps the k most active channels: Minitron-style channel selection.
    """
    energy = torch.diagonal(stats.combined(weighting))
    order = torch.argsort(energy, descending=True)
    return torch.eye(energy.shape[0], dtype=torch.float64, device=energy.device)[:, order]
