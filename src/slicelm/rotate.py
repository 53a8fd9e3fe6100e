"""Rotate-and-slice primitives: one implementation for every reader and every writer.

Hugging Face linears compute ``y = x W^T + b`` with W of shape (out, in). If the stream ``x`` (width
D) is replaced by ``x Q`` where Q (D, d) has orthonormal columns, then:

* a *reader* needs ``W' = W Q``  (out, d)    so that ``(x Q) W'^T = x Q Q^T W^T``;
* a *writer* needs ``W' = Q^T W`` (d, in) and ``b' = Q^T b``  so that ``y' = y Q``;
* an embedding is a writer whose rows are outputs: ``E' = E Q``  (V, d).

With d = D, ``Q Q^T = I`` and the network's function is unchanged; with d < D the low-variance
directions are dropped. All arithmetic is float64; results are stored in the module's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from slicelm.modeling_slicelm import in_out_weight, set_in_out_weight


@torch.no_grad()
def rotate_reader(module: nn.Module, q: torch.Tensor) -> None:
    """Make ``module`` read the stream in basis ``q`` (D, d). The bias is unaffected."""
    weight = in_out_weight(module)  # (out, D)
    new = weight.to(torch.float64) @ q.to(weight.device, torch.float64)  # (out, d)
    set_in_out_weight(module, new.to(weight.dtype))


@torch.no_grad()
def rotate_writer(module: nn.Module, q: torch.Tensor) -> None:
    """Make ``module`` write the stream in basis ``q`` (D, d): its outputs become ``y q``."""
    q64 = q.to(module.weight.device, torch.float64)
    if isinstance(module, nn.Embedding):
        new = module.weight.to(torch.float64) @ q64  # (V, d)
        module.weight = nn.Parameter(new.to(module.weight.dtype), requires_grad=False)
        module.embedding_dim = new.shape[1]
        return
    weight = in_out_weight(module)  # (D, in)
    new = (q64.T @ weight.to(torch.float64)).to(weight.dtype)  # (d, in)
    bias = getattr(module, "bias", None)
    new_bias = (bias.to(torch.float64) @ q64).to(bias.dtype) if bias is not None else None
    set_in_out_weight(module, new, new_bias)


@torch.no_grad()
def scale_reader_inputs(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """Fold ``x -> x * scale + shift`` (a norm's affine part) into a reader.

    ``(x s + t) W^T + b = x (W diag(s))^T + (W t + b)``.
    """
    weight = in_out_weight(module)  # (out, D)
    w64 = weight.to(torch.float64)
    new = (w64 * scale.to(weight.device, torch.float64)).to(weight.dtype)
    bias = None
    if shift is not None:
        old = getattr(module, "bias", None)
        extra = w64 @ shift.to(weight.device, torch.float64)  # (out,)
        bias = (extra + (old.to(torch.float64) if old is not None else 0)).to(weight.dtype)
    set_in_out_weight(module, new, bias)


@torch.no_grad()
def center_writer(module: nn.Module) -> None:
    """Make a writer's outputs zero-mean across the stream's width (LayerNorm's mean subtraction).

    ``y - mean(y) = y (I - 11^T/D)``: subtract the per-column mean over the output axis from W and b.
    """
    if isinstance(module, nn.Embedding):
        w = module.weight.to(torch.float64)
        module.weight.copy_((w - w.mean(dim=1, keepdim=True)).to(module.weight.dtype))
        return
    weight = in_out_weight(module).to(torch.float64)  # (D, in)
    new = (weight - weight.mean(dim=0, keepdim=True)).to(module.weight.dtype)
    bias = getattr(module, "bias", None)
    new_bias = (bias.to(torch.float64) - bias.to(torch.float64).mean()).to(bias.dtype) if bias is not None else None
    set_in_out_weight(module, new, new_bias)
