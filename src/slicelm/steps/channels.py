"""MLP-intermediate channel pruning with a closed-form refit (structured Optimal Brain Surgeon).

SliceGPT narrows the residual stream but never the MLP's intermediate width, which holds about
two thirds of a block's weights. Here intermediate channels are removed where calibration says they
matter least, and the MLP's output projection is refit so the block's output is preserved.

With ``H`` the intermediate activations (N, I) that feed the MLP's writer (``down_proj``), its
output is ``Y = H W`` where ``W`` is the writer in the stream-axis-last view (I, D). Removing a set
of channels S and refitting the rest by least squares minimises ``||H W - H_S W'||^2``; it depends
on the data only through ``C = H^T H`` (I, I). Channels are removed greedily, a block at a time,
by the structured OBS rule: with ``Hinv = (C + damp I)^-1``, removing channel j alone costs
``||W[j]||^2 / Hinv[j, j]``, and the optimal correction of the remaining rows is
``W -= Hinv[:, j] W[j] / Hinv[j, j]``; ``Hinv`` is then updated by the same rank-one step. The
cumulative cost of each removal is recorded: it is the curve non-uniform budgets allocate with.

The gate/up rows (readers' outputs) and the writer's rows of removed channels are deleted; reader
biases follow their rows. Everything is float64; weights are stored back in their dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slicelm.core.arch import Layout
from slicelm.errors import SlicelmError
from slicelm.modeling.modeling_slicelm import get_module, set_stream_weight, stream_bias, stream_weight

DAMP = 1e-4  # ridge, relative to the mean diagonal of C: keeps Hinv defined, barely biases the refit


def check_prunable(mlp_chunks: int | None, model_type: str) -> None:
    """Refuse MLP channel pruning beside a rotation where channels are not shared (mixtures of experts)."""
    if mlp_chunks is None:
        raise SlicelmError(
            f"{model_type}'s MLP is a mixture of experts, whose channels are pruned per expert without the "
            "rotation: give --sparsity 0 with --mlp-sparsity (or a --schedule mlp budget), or drop --mlp-sparsity"
        )


def intermediate_width(layer: nn.Module, layout: Layout) -> int:
    """The MLP's current intermediate width (rows of the writer's stream-axis-last view)."""
    return stream_weight(get_module(layer, layout.mlp_outputs[0]), "writer").shape[-2]


@dataclass
class ObsResult:
    keep: torch.Tensor  # (k,) sorted indices of the kept channels
    weight: torch.Tensor  # (k, D) float64 refit writer rows
    removal_cost: torch.Tensor  # (I - k,) cumulative output error after each removal, float64


def obs_prune(weight: torch.Tensor, cov: torch.Tensor, keep: int, block: int | None = None) -> ObsResult:
    """Greedily remove ``I - keep`` channels of ``weight`` (I, D) given ``cov`` = H^T H (I, I).

    block: channels removed per step (default: about 1/128 of those to remove, at least 1).
    """
    width = weight.shape[0]
    if not 0 < keep <= width:
        raise ValueError(f"keep must be in 1..{width}, got {keep}")
    w = weight.to(torch.float64).clone()  # (I, D)
    c = cov.to(torch.float64)
    damp = DAMP * torch.diagonal(c).mean().clamp_min(1e-12)
    hinv = torch.linalg.inv(c + damp * torch.eye(width, dtype=torch.float64, device=c.device))
    alive = torch.ones(width, dtype=torch.bool, device=c.device)
    remove = width - keep
    block = block or max(1, remove // 128)
    costs: list[torch.Tensor] = []
    total = torch.zeros((), dtype=torch.float64, device=c.device)
    while remove > 0:
        step = min(block, remove)
        scores = (w * w).sum(dim=1) / torch.diagonal(hinv).clamp_min(1e-30)  # (I,)
        scores[~alive] = float("inf")
        chosen = torch.topk(scores, step, largest=False).indices  # (s,)
        # Block OBS: remove all chosen channels at once and refit the rest optimally.
        h_ss = hinv[chosen][:, chosen]  # (s, s)
        h_ss_inv = torch.linalg.inv(h_ss)
        w_s = w[chosen]  # (s, D)
        total = total + torch.einsum("sd,st,td->", w_s, h_ss_inv, w_s)
        # In place (index gathers are copies): a fresh (I, I) hinv per step cost ~10x the arithmetic.
        w.addmm_(hinv[:, chosen], h_ss_inv @ w_s, alpha=-1)
        hinv.addmm_(hinv[:, chosen] @ h_ss_inv, hinv[chosen], alpha=-1)
        w[chosen] = 0.0
        alive[chosen] = False
        costs.extend([total] * step)
        remove -= step
    kept = torch.nonzero(alive).squeeze(1)
    cost = torch.stack(costs) if costs else torch.zeros(0, dtype=torch.float64)
    return ObsResult(kept, w[kept], cost)


def reconstruction_error(weight: torch.Tensor, cov: torch.Tensor, keep: torch.Tensor, new: torch.Tensor) -> float:
    """``||H W - H_S W'||^2 / N`` from ``C`` alone: weight (I, D), keep (k,), new (k, D)."""
    delta = weight.to(torch.float64).clone()
    delta[keep] -= new.to(torch.float64)
    return torch.einsum("id,ij,jd->", delta, cov.to(torch.float64), delta).item()


def select_channels(layer: nn.Module, layout: Layout, keep: torch.Tensor, writer_rows: torch.Tensor | None) -> None:
    """Keep only channels ``keep`` (k,) of one block's MLP; ``writer_rows`` (k, D): the refit writer.

    Readers keep their output rows ``keep`` in each of their ``mlp_chunks`` blocks (and the matching
    bias entries); the writer keeps (or is given) the rows of those channels.
    """
    readers = [get_module(layer, path) for path in layout.mlp_inputs]
    keep_mlp_channels(readers, get_module(layer, layout.mlp_outputs[0]), layout.mlp_chunks or 1, keep, writer_rows)


def keep_mlp_channels(
    readers: list[nn.Module],
    writer: nn.Module,
    chunks: int,
    keep: torch.Tensor,
    writer_rows: torch.Tensor | None,
) -> None:
    """Keep channels ``keep`` (k,) of one MLP given by its modules (see :func:`select_channels`)."""
    for reader in readers:
        weight = stream_weight(reader, "reader")  # (..., chunks * I, D)
        width = weight.shape[-2] // chunks
        rows = torch.cat([keep + c * width for c in range(chunks)]).to(weight.device)
        bias = stream_bias(reader)
        new_bias = bias.index_select(0, rows).contiguous() if bias is not None else None
        set_stream_weight(reader, "reader", weight.index_select(-2, rows), new_bias)
    weight = stream_weight(writer, "writer")  # (I, D)
    if writer_rows is None:
        new = weight.index_select(-2, keep.to(weight.device))
    else:
        new = writer_rows.to(device=weight.device, dtype=weight.dtype)
    set_stream_weight(writer, "writer", new, stream_bias(writer))
