"""Rotate-and-slice primitives: one implementation for every reader and every writer.

Hugging Face linears compute ``y = x W^T + b`` with W of shape (out, in). If the stream ``x`` (width
D) is replaced by ``x Q`` where Q (D, d) has orthonormal columns, then:

* a *reader* needs ``W' = W Q``  (out, d)    so that ``(x Q) W'^T = x Q Q^T W^T``;
* a *writer* needs ``W' = Q^T W`` (d, in) and ``b' = Q^T b``  so that ``y' = y Q``;
* an embedding is a writer whose rows are outputs: ``E' = E Q``  (V, d).

In the stream-axis-last view of a weight (readers (out, D), writers (in, D)) all three are ``W Q``.

With d = D, ``Q Q^T = I`` and the network's function is unchanged; with d < D the low-variance
directions are dropped. All arithmetic is float64; results are stored in the module's dtype.
"""

from __future__ import annotations

import torch

from slicelm.errors import SlicelmError
from slicelm.modeling_slicelm import StreamTarget, set_stream_weight, stream_bias, stream_weight

# Every function below works on the stream-axis-last view of a weight (see ``stream_weight``), so
# one implementation serves Linear, Conv1D, embeddings, MoE routers and stacked expert weights.

CHUNK_BYTES = 64 * 2**20  # bound on each float64 temporary: a 49k-row embedding is not copied whole


def times_q(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``weight @ q`` in float64, row block by row block, returned in ``weight``'s dtype.

    weight: (..., n, D); q: (D, d) -> (..., n, d). Chunking keeps peak memory at one block of
    float64 rows instead of two full float64 copies, which matters when streaming large models.
    """
    q64 = q.to(weight.device, torch.float64)
    flat = weight.reshape(-1, weight.shape[-1])  # (N, D)
    rows = max(1, CHUNK_BYTES // (8 * max(weight.shape[-1], q.shape[1])))
    out = torch.empty(flat.shape[0], q.shape[1], dtype=weight.dtype, device=weight.device)
    for start in range(0, flat.shape[0], rows):
        out[start : start + rows] = (flat[start : start + rows].to(torch.float64) @ q64).to(weight.dtype)
    return out.reshape(*weight.shape[:-1], q.shape[1])


@torch.no_grad()
def rotate_reader(target: StreamTarget, q: torch.Tensor) -> None:
    """Make ``target`` read the stream in basis ``q`` (D, d): ``W' = W q``. The bias is unaffected."""
    weight = stream_weight(target, "reader")  # (..., out, D)
    set_stream_weight(target, "reader", times_q(weight, q))  # (..., out, d)


@torch.no_grad()
def rotate_writer(target: StreamTarget, q: torch.Tensor) -> None:
    """Make ``target`` write the stream in basis ``q`` (D, d): its outputs become ``y q``."""
    weight = stream_weight(target, "writer")  # (..., in, D); embeddings (V, D)
    new = times_q(weight, q)  # (..., in, d)
    bias = stream_bias(target)
    new_bias = times_q(bias, q) if bias is not None else None
    set_stream_weight(target, "writer", new, new_bias)


@torch.no_grad()
def scale_reader_inputs(target: StreamTarget, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """Fold ``x -> x * scale + shift`` (a norm's affine part) into a reader.

    ``(x s + t) W^T + b = x (W diag(s))^T + (W t + b)``.
    """
    weight = stream_weight(target, "reader")  # (..., out, D)
    w64 = weight.to(torch.float64)
    new = (w64 * scale.to(weight.device, torch.float64)).to(weight.dtype)
    bias = None
    if shift is not None:
        if isinstance(target, torch.Tensor):
            raise SlicelmError("cannot fold a norm's bias into a bare weight parameter (it has no bias)")
        old = stream_bias(target)
        extra = w64 @ shift.to(weight.device, torch.float64)  # (..., out)
        bias = (extra + (old.to(torch.float64) if old is not None else 0)).to(weight.dtype)
    set_stream_weight(target, "reader", new, bias)


@torch.no_grad()
def center_writer(target: StreamTarget) -> None:
    """Make a writer's outputs zero-mean across the stream's width (LayerNorm's mean subtraction).

    ``y - mean(y) = y (I - 11^T/D)``: subtract the mean over the stream axis from W and b.
    """
    weight = stream_weight(target, "writer")  # (..., in, D)
    w64 = weight.to(torch.float64)
    new = (w64 - w64.mean(dim=-1, keepdim=True)).to(weight.dtype)
    bias = stream_bias(target)
    new_bias = (bias.to(torch.float64) - bias.to(torch.float64).mean()).to(bias.dtype) if bias is not None else None
    set_stream_weight(target, "writer", new, new_bias)
