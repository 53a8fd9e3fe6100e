"""Computational invariance, step one: fold every norm's affine part into its readers.

After :func:`fuse_norms`, every norm that reads the residual stream is a weightless
:class:`~slicelm.modeling.modeling_slicelm.RMSN` and the model computes the same function. RMS norms commute
with orthogonal changes of basis (they only use ``||x||``), which is what lets the stream be rotated.

LayerNorm also subtracts the mean. That is a projection, ``x -> x (I - 11^T/D)``; applying it to
every module that *writes* the stream instead (embeddings and branch outputs) keeps the stream
zero-mean, so the norm reduces to an RMS norm and the projection disappears from the readers' path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slicelm.core.arch import Layout, norm_eps, require_rotation
from slicelm.core.rotate import center_writer, scale_reader_inputs
from slicelm.modeling.modeling_slicelm import RMSN, get_module, set_module, stream_bias, stream_weight


def untie_head(model: nn.Module, layout: Layout) -> None:
    """Give the head its own weight: the two ends of the stream are rotated by different bases."""
    head = get_module(model, layout.head)
    if any(head.weight is get_module(model, p).weight for p in layout.embeddings):
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", lambda: model.config)()
    text_config.tie_word_embeddings = False


def _fold(norm: nn.Module, readers: list[nn.Module], offset: float) -> None:
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    if weight is None and bias is None:
        return
    width = stream_weight(readers[0], "reader").shape[-1]
    scale = weight.to(torch.float64) + offset if weight is not None else torch.ones(width, dtype=torch.float64)
    shift = bias.to(torch.float64) if bias is not None else None
    for reader in readers:
        scale_reader_inputs(reader, scale, shift)


def is_tied(model: nn.Module, layout: Layout) -> bool:
    """True if the head shares its weight with the (first) token embedding."""
    head = get_module(model, layout.head)
    return head.weight is get_module(model, layout.embeddings[0]).weight


@dataclass
class FusedNorms:
    """What fusion decided. ``final_scale``/``final_shift`` are set when the final norm's affine
    part was *not* folded into a tied head: the caller applies it after rotation."""

    eps: float
    keep_tie: bool = False
    final_scale: torch.Tensor | None = None  # (D,) float64
    final_shift: torch.Tensor | None = None  # (D,) float64


@torch.no_grad()
def prepare_ends(model: nn.Module, layout: Layout, keep_tie: bool = False) -> FusedNorms:
    """Decide the head's tie and centre the embeddings (LayerNorm). Needs only the embeddings loaded.

    keep_tie: for a tied head of an RMS-norm family, leave the head tied to the embedding; the final
    norm's affine part is then returned by :func:`fuse_final` instead of folded into the head.
    """
    require_rotation(layout)  # every rotation starts here: refused before any weight changes
    fused = FusedNorms(norm_eps(get_module(model, layout.final_norm)))
    # LayerNorm families always untie: centring the embedding would also change a tied head's logits.
    fused.keep_tie = keep_tie and layout.norm == "rms" and is_tied(model, layout)
    if not fused.keep_tie:
        untie_head(model, layout)
    if layout.norm == "layer":
        for path in layout.embeddings:
            center_writer(get_module(model, path))
    if layout.residual_scale is not None:  # folded into every layer's writers by fuse_layer
        setattr(model.config, layout.residual_scale, 1.0)
    return fused


def _fold_residual_scale(layer: nn.Module, layout: Layout) -> None:
    """Scale the branch writers by the layer's residual multiplier and set it to 1 (same function):
    a sliced block adds its branches to the residual unscaled, and a stock one then multiplies by 1."""
    scale = float(getattr(layer, layout.residual_scale))
    if scale == 1.0:
        return
    for path in layout.attn_outputs + layout.mlp_outputs:
        writer = get_module(layer, path)
        weight = stream_weight(writer, "writer")
        weight.copy_((weight.to(torch.float64) * scale).to(weight.dtype))
        bias = stream_bias(writer)
        if bias is not None:
            bias.copy_((bias.to(torch.float64) * scale).to(bias.dtype))
    setattr(layer, layout.residual_scale, 1.0)


@torch.no_grad()
def fuse_layer(layer: nn.Module, layout: Layout, hidden: int, eps: float) -> None:
    """Fold one decoder layer's norms into its readers (and LayerNorm means into its writers)."""
    if layout.residual_scale is not None:
        _fold_residual_scale(layer, layout)
    if layout.norm == "layer":
        for path in layout.attn_outputs + layout.mlp_outputs:
            center_writer(get_module(layer, path))
    attn_readers = [get_module(layer, p) for p in layout.attn_inputs]
    mlp_readers = [get_module(layer, p) for p in layout.mlp_inputs]
    if layout.mlp_norm is None:  # one norm feeds both branches
        _fold(get_module(layer, layout.attn_norm), attn_readers + mlp_readers, layout.norm_offset)
    else:
        _fold(get_module(layer, layout.attn_norm), attn_readers, layout.norm_offset)
        _fold(get_module(layer, layout.mlp_norm), mlp_readers, layout.norm_offset)
    for path in layout.norms:
        set_module(layer, path, RMSN(hidden, eps))


@torch.no_grad()
def fuse_final(model: nn.Module, layout: Layout, fused: FusedNorms) -> None:
    """Fold the final norm into an untied head, or (tie kept) record its affine part in ``fused``."""
    hidden = model.config.hidden_size
    final_norm = get_module(model, layout.final_norm)
    if fused.keep_tie:
        weight, bias = getattr(final_norm, "weight", None), getattr(final_norm, "bias", None)
        ones = torch.ones(hidden, dtype=torch.float64)
        fused.final_scale = weight.to(torch.float64) + layout.norm_offset if weight is not None else ones
        fused.final_shift = bias.to(torch.float64) if bias is not None else None
    else:
        _fold(final_norm, [get_module(model, layout.head)], layout.norm_offset)
    set_module(model, layout.final_norm, RMSN(hidden, fused.eps))


def fuse_norms(model: nn.Module, layout: Layout, keep_tie: bool = False) -> FusedNorms:
    """Fold every norm of a loaded model at once (slicing does the same, layer by layer)."""
    fused = prepare_ends(model, layout, keep_tie)
    for layer in get_module(model, layout.layers):
        fuse_layer(layer, layout, model.config.hidden_size, fused.eps)
    fuse_final(model, layout, fused)
    return fused
