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


@torch.no_grad()
def rotate_reader(target: StreamTarget, q: torch.Tensor) -> None:
    """Make ``target`` read the stream in basis ``q`` (D, d): ``W' = W q``. The bias is unaffected."""
    weight = stream_weight(target, "reader")  # (..., out, D)
    new = weight.to(torch.float64) @ q.to(weight.device, torch.float64)  # (..., out, d)
    set_stream_weight(target, "reader", new.to(weight.dtype))


@torch.no_grad()
def rotate_writer(target: StreamTarget, q: torch.Tensor) -> None:
    """Make ``target`` write the stream in basis ``q`` (D, d): its outputs become ``y q``."""
    weight = stream_weight(target, "writer")  # (..., in, D); embeddings (V, D)
    q64 = q.to(weight.device, torch.float64)
    new = (weight.to(torch.float64) @ q64).to(weight.dtype)  # (..., in, d)
    bias = stream_bias(target)
    new_bias = (bias.to(torch.float64) @ q64).to(bias.dtype) if bias is not None else None
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
