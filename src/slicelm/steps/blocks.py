"""Sub-block removal: drop a block's attention branch, its MLP branch, or both (a whole layer).

A decoder block computes ``h = x + attn(norm1(x))`` and ``y = h + mlp(norm2(h))`` (sliced blocks:
``x S`` in place of ``x``; parallel blocks: ``y = x + attn(norm(x)) + mlp(norm(x))``). Removing a
branch replaces its module with :class:`ZeroBranch`, whose output is zeros of the branch's width,
so the residual (or the shortcut) passes through exactly: ``h = x`` (``x S``). The original layer's
forward and slicelm's sliced block both keep working, since each only calls the branch modules.

In memory a removed branch holds no parameters: its q/k/v/o (or gate/up/down) are gone, and a norm
that fed only that branch becomes ``nn.Identity`` (a norm shared by both branches of a parallel
block stays). A removed attention still records the new tokens' positions in the KV cache (one
1-wide "head" per token), because transformers reads the cached length from the cache's layers —
by default from layer 0 — to place new tokens; an empty cache layer would restart positions at 0.

To rebuild a saved model the loader calls :func:`remove_attention` / :func:`remove_mlp` on the
freshly built layer (they need shapes only, no weights) before loading its tensors. ZeroBranch
lives in the modeling file shipped with checkpoints (:mod:`slicelm.modeling.modeling_slicelm`), which
rebuilds removed branches from the plan when a folder loads.

Whole layers of a one-basis model (no shortcuts) can also be deleted outright with
:func:`drop_layers`, which is what a stock config with fewer ``num_hidden_layers`` describes.
"""

from __future__ import annotations

import torch
from torch import nn

from slicelm.core.arch import Layout
from slicelm.core.calibration import Batch
from slicelm.core.offload import ActivationStore
from slicelm.errors import SlicelmError
from slicelm.layouts.plain import drop_config_layers
from slicelm.modeling.modeling_slicelm import (
    ZeroBranch,
    attention_half,
    forget_parts,
    get_module,
    mlp_half,
    remove_branch,
    set_module,
    stream_weight,
)


def is_removed(module: nn.Module) -> bool:
    return isinstance(module, ZeroBranch)


def _writer_width(layer: nn.Module, paths: tuple[str, ...]) -> int:
    return stream_weight(get_module(layer, paths[0]), "writer").shape[-1]


def attention_removed(layer: nn.Module, layout: Layout) -> bool:
    return is_removed(get_module(layer, layout.attn))


def mlp_removed(layer: nn.Module, layout: Layout) -> bool:
    chain = (layout.mlp,) if isinstance(layout.mlp, str) else layout.mlp
    return is_removed(get_module(layer, chain[-1]))


def remove_attention(layer: nn.Module, layout: Layout) -> None:
    """Replace the attention branch by zeros of its output width (in place, idempotent)."""
    if not attention_removed(layer, layout):
        remove_branch(layer, layout.to_dict(), "attn", _writer_width(layer, layout.attn_outputs))


def remove_mlp(layer: nn.Module, layout: Layout) -> None:
    """Replace the MLP branch by zeros of its output width (in place, idempotent).

    A chain MLP (OPT's fc1, activation, fc2 on the layer) keeps its chain: the first modules become
    ``nn.Identity`` and the last a :class:`ZeroBranch`.
    """
    if not mlp_removed(layer, layout):
        remove_branch(layer, layout.to_dict(), "mlp", _writer_width(layer, layout.mlp_outputs))


def remove_layer(layer: nn.Module, layout: Layout) -> None:
    """Remove both branches: the block computes its residual (or shortcuts) alone."""
    remove_attention(layer, layout)
    remove_mlp(layer, layout)
    for path in layout.norms:  # a norm shared by both branches (parallel blocks) now feeds nothing
        set_module(layer, path, nn.Identity())
    forget_parts(layer)


@torch.no_grad()
def branch_energy(
    layer: nn.Module,
    layout: Layout,
    batches: list[Batch],
    store: ActivationStore,
    device: torch.device,
    branch: str,
) -> tuple[float, float]:
    """``(E||branch||^2, E||x||^2)`` per token over the calibration tokens (float64).

    branch: ``"attn"`` (input ``store["x", i]``) or ``"mlp"`` (input: the stream after attention,
    ``x + attn(norm(x))``, for a block without shortcuts; parallel blocks: ``x``). The ratio is the
    relative change of the stream that removing the branch causes at this point.
    """
    out = torch.zeros((), dtype=torch.float64)
    stream = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for i, b in enumerate(batches):
        x = store[("x", i)].to(device)
        mask = b.mask.to(device)
        if branch == "attn":
            y = attention_half(layer, x, **b.kwargs)
        else:
            if not layout.parallel:
                if getattr(layer, "attn_shortcut", None) is not None:
                    raise SlicelmError("branch_energy('mlp') needs a block without shortcuts")
                x = x + attention_half(layer, x, **b.kwargs)
            y = mlp_half(layer, x)
        out += y[mask].double().pow(2).sum().cpu()
        stream += x[mask].double().pow(2).sum().cpu()
        tokens += int(mask.sum())
    return out.item() / max(tokens, 1), stream.item() / max(tokens, 1)


def prune_attention_block(
    layer: nn.Module, layout: Layout, batches: list[Batch], store: ActivationStore, device: torch.device
) -> float:
    """Remove the attention branch; returns ``E||attn||^2 / E||x||^2`` on the calibration data (its
    relative change of the stream), measured before removal. Same contract as the MLP step."""
    energy, stream = branch_energy(layer, layout, batches, store, device, "attn")
    remove_attention(layer, layout)
    return energy / max(stream, 1e-30)


def prune_mlp_block(
    layer: nn.Module, layout: Layout, batches: list[Batch], store: ActivationStore, device: torch.device
) -> float:
    """Remove the MLP branch; returns ``E||mlp||^2 / E||h||^2`` with ``h`` the MLP's input stream
    (measured before removal; the attention branch as it is now)."""
    energy, stream = branch_energy(layer, layout, batches, store, device, "mlp")
    remove_mlp(layer, layout)
    return energy / max(stream, 1e-30)


def drop_layers(model: nn.Module, layout: Layout, indices: list[int] | set[int]) -> None:
    """Delete whole decoder layers of a one-basis model (no shortcuts) in place.

    Renumbers the kept attention modules' ``layer_idx`` (the KV cache is indexed by it) and updates
    ``config.num_hidden_layers`` and, when present, ``config.layer_types``: the stock architecture
    with fewer layers. Exact: a deleted layer's residual is the identity.
    """
    layers = get_module(model, layout.layers)
    drop = set(int(i) for i in indices)
    if not drop <= set(range(len(layers))) or len(drop) >= len(layers):
        raise SlicelmError(f"cannot drop layers {sorted(drop)} of a {len(layers)}-layer model (keep at least one)")
    if any(getattr(layers[i], "attn_shortcut", None) is not None for i in range(len(layers))):
        raise SlicelmError("drop_layers needs a one-basis model (plain layout): this one has shortcut matrices")
    kept = [layer for i, layer in enumerate(layers) if i not in drop]
    for new_index, layer in enumerate(kept):
        attn = get_module(layer, layout.attn)
        if hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_index
    set_module(model, layout.layers, nn.ModuleList(kept))
    drop_config_layers(model.config, drop)
