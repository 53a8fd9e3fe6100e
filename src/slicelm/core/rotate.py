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
from slicelm.modeling.modeling_slicelm import StreamTarget, set_stream_weight, stream_bias, stream_weight

# Every function below works on the stream-axis-last view of a weight (see ``stream_weight``), so
# one implementation serves Linear, Conv1D, embeddings, MoE routers and stacked expert weights.

CHUNK_BYTES = 64 * 2**20  # bound on each float64 temporary: a 49k-row embedding is not copied whole


def map_rows(weight: torch.Tensor, fn, width: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Apply ``fn`` to float64 blocks of rows of ``weight`` (..., n, D); result in ``weight``'s dtype.

    ``fn`` maps a (rows, D) float64 block to (rows, width). Working block by block keeps peak memory
    at the input, the output and one float64 block, instead of two full float64 copies — for the
    embedding or head of a large vocabulary that is the difference between fitting and not.
    ``dtype``: of the result (default: ``weight``'s).
    """
    dtype = weight.dtype if dtype is None else dtype
    width = weight.shape[-1] if width is None else width
    flat = weight.reshape(-1, weight.shape[-1])  # (N, D)
    rows = max(1, CHUNK_BYTES // (8 * max(weight.shape[-1], width)))
    out = torch.empty(flat.shape[0], width, dtype=dtype, device=weight.device)
    for start in range(0, flat.shape[0], rows):
        out[start : start + rows] = fn(flat[start : start + rows].to(torch.float64)).to(dtype)
    return out.reshape(*weight.shape[:-1], width)


def times_q(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``weight @ q`` in float64, block by block: weight (..., n, D), q (D, d) -> (..., n, d)."""
    q64 = q.to(weight.device, torch.float64)
    return map_rows(weight, lambda block: block @ q64, q.shape[1])


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
    bias = None
    if shift is not None:
        if isinstance(target, torch.Tensor):
            raise SlicelmError("cannot fold a norm's bias into a bare weight parameter (it has no bias)")
        old = stream_bias(target)
        shift64 = shift.to(weight.device, torch.float64)[:, None]  # (D, 1)
        extra = map_rows(weight, lambda block: block @ shift64, 1, torch.float64).squeeze(-1)  # (..., out)
        bias = (extra + (old.to(torch.float64) if old is not None else 0)).to(weight.dtype)
    scale64 = scale.to(weight.device, torch.float64)
    set_stream_weight(target, "reader", map_rows(weight, lambda block: block * scale64), bias)


@torch.no_grad()
def center_writer(target: StreamTarget) -> None:
    """Make a writer's outputs zero-mean across the stream's width (LayerNorm's mean subtraction).

    ``y - mean(y) = y (I - 11^T/D)``: subtract the mean over the stream axis from W and b.
    """
    weight = stream_weight(target, "writer")  # (..., in, D)
    new = map_rows(weight, lambda block: block - block.mean(dim=-1, keepdim=True))
    bias = stream_bias(target)
    new_bias = (bias.to(torch.float64) - bias.to(torch.float64).mean()).to(bias.dtype) if bias is not None else None
    set_stream_weight(target, "writer", new, new_bias)
