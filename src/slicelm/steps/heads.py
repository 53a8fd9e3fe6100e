"""Attention-head removal: whole KV groups and/or query heads within a group, with a refit of ``o_proj``.

An attention branch with K key/value heads, Q query heads per KV head (H = K Q query heads) and
head size ``hd`` computes per token ``y = z W`` (+ bias), where ``z`` (H hd,) is the concatenation of
the query heads' outputs (channel ``h hd + e`` is entry e of head h) and ``W`` (H hd, D) is
``o_proj`` in the stream-axis-last writer view. A query head's output depends only on its own
query rows and its KV head, so removing heads leaves every kept head's output unchanged: the kept
channels of ``z`` are the same signals before and after removal. The refit of ``o_proj`` is
therefore an ordinary least-squares problem on calibration data, ``min ||Z W - Z_K W'||^2``, that
depends only on the second moment ``C = Z^T Z / N`` (H hd, H hd), accumulated in float64 from a
forward pre-hook on ``o_proj`` — exactly the structure of MLP-channel pruning
(:mod:`slicelm.steps.channels`), with channels grouped into heads.

Selection is grouped structured OBS: with ``Hinv = (C + damp I)^-1``, removing a channel group G
(a query head: ``hd`` channels; a KV group: its Q heads' ``Q hd`` channels) and refitting the rest
optimally costs ``tr(W_G^T (Hinv_GG)^-1 W_G)``; the cheapest group goes, ``W`` and ``Hinv`` get the
block-OBS update, and so on. For one removal the criterion is the exact least-squares optimum
(tests check it against exhaustive search). KV groups are removed first, then query heads, the same
number in every kept KV group (transformers' ``repeat_kv`` needs Q equal for all groups).

Rotary embeddings and ``head_dim`` are untouched: only rows of q_proj (and k/v of removed KV
groups, biases following their rows) and input columns of ``o_proj`` are deleted. Per-head norms
(qwen3's q_norm/k_norm, phi's q/k LayerNorms) act on ``head_dim`` with weights shared by all heads,
so they stay valid. The attention module's head-count attributes are updated generically.

Applies to families whose attention has separate q/k/v projections and an output projection, listed
in ``layout.attn_inputs`` as (q, k, v): llama, mistral, qwen2, qwen3, gemma, mixtral, phi, opt, and on
the structure-local path gemma2, gemma3_text, qwen2_moe. Not to fused projections (phi3's qkv_proj,
gpt2's c_attn, gpt_neox's query_key_value), nor to attentions with a module acting on all heads at
once (olmo2's q_norm/k_norm normalise the whole projection): :func:`head_refusal` says why. Any
layout: the step acts on the head axis, which no change of the stream's basis touches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slicelm.core.arch import Layout
from slicelm.core.calibration import Batch
from slicelm.core.offload import ActivationStore
from slicelm.core.pca import CovarianceAccumulator
from slicelm.errors import SlicelmError
from slicelm.modeling.modeling_slicelm import (
    attention_half,
    get_module,
    set_stream_weight,
    stream_bias,
    stream_weight,
)
from slicelm.modeling.modeling_slicelm import resize_heads as resize_block_heads
from slicelm.modeling.modeling_slicelm import set_head_counts as set_counts
from slicelm.steps.channels import DAMP, reconstruction_error


@dataclass(frozen=True)
class HeadGeometry:
    """Head counts of one attention branch: ``kv_heads`` K, ``q_per_kv`` Q (H = K Q), ``head_dim``."""

    kv_heads: int
    q_per_kv: int
    head_dim: int

    @property
    def heads(self) -> int:
        return self.kv_heads * self.q_per_kv


def _projections(layer: nn.Module, layout: Layout) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """(q_proj, k_proj, v_proj, o_proj) of one block; refuses fused projections."""
    if len(layout.attn_inputs) != 3 or len(layout.attn_outputs) != 1:
        raise SlicelmError(
            f"head removal does not apply to {layout.model_type}: its attention projections are fused "
            f"({', '.join(layout.attn_inputs)}); it needs separate q, k and v projections"
        )
    q, k, v = (get_module(layer, path) for path in layout.attn_inputs)
    return q, k, v, get_module(layer, layout.attn_outputs[0])


def head_geometry(layer: nn.Module, layout: Layout) -> HeadGeometry:
    """The current head counts of a block, read from its weights and its attention's ``head_dim``."""
    q, k, v, o = _projections(layer, layout)
    attn = get_module(layer, layout.attn)
    q_rows = stream_weight(q, "reader").shape[-2]
    kv_rows = stream_weight(k, "reader").shape[-2]
    head_dim = getattr(attn, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise SlicelmError(f"head removal: {type(attn).__name__} has no integer head_dim")
    o_in = stream_weight(o, "writer").shape[-2]
    ok = q_rows % head_dim == 0 and kv_rows % head_dim == 0 and stream_weight(v, "reader").shape[-2] == kv_rows
    if not ok or o_in != q_rows or (q_rows // head_dim) % (kv_rows // head_dim):
        raise SlicelmError(
            f"head removal: {type(attn).__name__}'s projections ({q_rows}, {kv_rows} rows; o_proj reads {o_in}) "
            f"are not whole heads of {head_dim}"
        )
    kv_heads = kv_rows // head_dim
    return HeadGeometry(kv_heads, q_rows // head_dim // kv_heads, head_dim)


def head_refusal(layer: nn.Module, layout: Layout) -> str | None:
    """Why removing heads from this block would change the kept heads' outputs (None: it would not).

    A kept head's output depends only on its own rows when every module of the attention other than
    the projections acts on one head at a time (qwen3's and gemma3's q_norm/k_norm hold ``head_dim``
    weights). A parameter as wide as all query or all KV heads together (olmo2's q_norm/k_norm
    normalise the whole projection) mixes heads: removing one changes the others.
    """
    try:
        geometry = head_geometry(layer, layout)
    except SlicelmError as error:
        return str(error)
    attn = get_module(layer, layout.attn)
    prefix = layout.attn + "."
    projections = {p.removeprefix(prefix) for p in (*layout.attn_inputs, *layout.attn_outputs)}
    wide = {geometry.heads * geometry.head_dim: "query", geometry.kv_heads * geometry.head_dim: "KV"}
    for name, module in attn.named_modules():
        if name in projections:
            continue
        for pname, param in module.named_parameters(recurse=False):
            for size in param.shape:
                if size in wide and size > geometry.head_dim:
                    return (
                        f"{layout.model_type}'s {prefix}{name}.{pname} ({size} = {size // geometry.head_dim} x "
                        f"{geometry.head_dim}) acts on all {wide[size]} heads together, so removing a head would "
                        "change the kept heads' outputs"
                    )
    return None


@dataclass
class HeadStatistics:
    """What head selection needs about one block: its geometry, o_proj and its input's second moment.

    cov: (H hd, H hd) float64, ``Z^T Z / N`` over the calibration tokens; weight: (H hd, D) float64,
    o_proj in the writer view (row = input channel).
    """

    geometry: HeadGeometry
    weight: torch.Tensor
    cov: torch.Tensor

    @property
    def energy(self) -> float:
        """Mean squared norm of o_proj's output (without bias) per token: the error's denominator."""
        return torch.einsum("id,ij,jd->", self.weight, self.cov, self.weight).item()


@torch.no_grad()
def head_statistics(
    layer: nn.Module,
    layout: Layout,
    batches: list[Batch],
    store: ActivationStore,
    device: torch.device,
    forward: Callable[[int, torch.Tensor], Any] | None = None,
) -> HeadStatistics:
    """Run the attention branch on every batch and accumulate o_proj's input moment (float64).

    ``store["x", i]`` (B, T, d) is the block's input for batch i in the basis its attention reads;
    ``batches[i].kwargs`` are the attention's keyword arguments, ``batches[i].mask`` the padding mask.
    forward(i, x): what runs batch i (anything that calls o_proj once on it); by default the
    attention branch, :func:`attention_half`, which needs ``slicelm_roles`` (as during slicing).
    """
    geometry = head_geometry(layer, layout)
    o = _projections(layer, layout)[3]
    acc = CovarianceAccumulator(geometry.heads * geometry.head_dim, device=device)
    current: dict[str, torch.Tensor] = {}
    handle = o.register_forward_pre_hook(lambda _m, args: acc.add(args[0], current["mask"]))
    try:
        for i, b in enumerate(batches):
            current["mask"] = b.mask.to(device)
            x = store[("x", i)].to(device)
            if forward is None:
                attention_half(layer, x, **b.kwargs)
            else:
                forward(i, x)
    finally:
        handle.remove()
    cov = acc.covariance()
    if not bool(torch.isfinite(cov).all()):
        raise SlicelmError("the attention heads' outputs hold non-finite values on the calibration data")
    return HeadStatistics(geometry, stream_weight(o, "writer").detach().to(device, torch.float64), cov)


@dataclass
class HeadChoice:
    """Which heads to keep and the refit o_proj.

    kv_keep: (k,) sorted kept KV heads; q_keep: (k q,) sorted kept query heads (q of each kept KV
    head); weight: (k q hd, D) float64 refit o_proj rows of the kept channels; error: the refit's
    ``||Z W - Z_K W'||^2 / N``; relative: error / o_proj's output energy.
    """

    geometry: HeadGeometry  # after removal
    kv_keep: torch.Tensor
    q_keep: torch.Tensor
    weight: torch.Tensor
    error: float
    relative: float


def _channels(heads: torch.Tensor | list[int], head_dim: int) -> torch.Tensor:
    """o_proj input channels (n hd,) of query heads ``heads`` (n,), in head order."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _grouped_obs(
    w: torch.Tensor, hinv: torch.Tensor, groups: list[torch.Tensor], bucket: list[int], quota: dict[int, int]
) -> list[int]:
    """Greedily remove ``quota[b]`` groups from each bucket b; updates ``w`` and ``hinv`` in place.

    w: (I, D) writer rows, hinv: (I, I) inverse of the damped moment; groups: channel indices of each
    candidate group; bucket: the bucket of each group. Returns the removed groups in removal order.
    """
    left = dict(quota)
    alive = set(range(len(groups)))
    removed: list[int] = []
    while any(n > 0 for n in left.values()):
        best, best_cost = -1, float("inf")
        for g in sorted(alive):
            if left.get(bucket[g], 0) <= 0:
                continue
            idx = groups[g].to(w.device)
            w_g = w[idx]  # (s, D)
            cost = torch.einsum("sd,st,td->", w_g, torch.linalg.inv(hinv[idx][:, idx]), w_g).item()
            if cost < best_cost:
                best, best_cost = g, cost
        idx = groups[best].to(w.device)
        h_inv = torch.linalg.inv(hinv[idx][:, idx])  # (s, s)
        w.addmm_(hinv[:, idx], h_inv @ w[idx], alpha=-1)  # optimal correction of the remaining rows
        hinv.addmm_(hinv[:, idx] @ h_inv, hinv[idx], alpha=-1)  # inverse of the remaining moment
        w[idx] = 0.0
        alive.discard(best)
        left[bucket[best]] -= 1
        removed.append(best)
    return removed


def _removal_cost(w: torch.Tensor, hinv: torch.Tensor, idx: torch.Tensor) -> float:
    """Exact cost of removing channels ``idx`` at once and refitting the rest: ``tr(W_R^T (Hinv_RR)^-1 W_R)``
    with the full (damped) inverse moment ``hinv`` and the original rows ``w`` (I, D)."""
    w_r = w[idx]
    return torch.einsum("rd,rd->", w_r, torch.linalg.solve(hinv[idx][:, idx], w_r)).item()


def _exchange(
    w: torch.Tensor,
    hinv: torch.Tensor,
    groups: list[torch.Tensor],
    bucket: list[int],
    removed: list[int],
    fixed: torch.Tensor,
) -> list[int]:
    """Improve a removal set by swaps within a bucket (a removed group back for a kept one) while the
    exact joint cost drops: greedy removal can miss pairs that are cheap together.

    w, hinv: original rows and full inverse moment; fixed: channels removed before this stage.
    """
    removed = list(removed)

    def cost(chosen: list[int]) -> float:
        return _removal_cost(w, hinv, torch.cat([fixed, *(groups[g] for g in chosen)]).to(w.device))

    best = cost(removed)
    for _ in range(len(groups)):  # each pass strictly improves; bounded to keep the cost predictable
        trial_best, trial = best, None
        for pos, g in enumerate(removed):
            for h in range(len(groups)):
                if h in removed or bucket[h] != bucket[g]:
                    continue
                candidate = removed[:pos] + [h] + removed[pos + 1 :]
                value = cost(candidate)
                if value < trial_best * (1 - 1e-9):
                    trial_best, trial = value, candidate
        if trial is None:
            break
        best, removed = trial_best, trial
    return removed


def refit_rows(weight: torch.Tensor, cov: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Least-squares refit of writer rows ``keep`` (k,) when the other rows' inputs are removed.

    weight (I, D), cov (I, I) float64. Returns ``W_K + (C_KK + damp I)^-1 C_KR W_R`` (k, D): the
    optimum of ``||Z W - Z_K W'||^2`` up to a small ridge on the correction (none when R is empty).
    """
    weight, cov = weight.to(torch.float64), cov.to(torch.float64)
    gone = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    gone[keep] = False
    if not bool(gone.any()):
        return weight[keep].clone()
    c_kk = cov[keep][:, keep]
    damp = DAMP * torch.diagonal(cov).mean().clamp_min(1e-12)
    rhs = cov[keep][:, gone] @ weight[gone]  # (k, D)
    eye = torch.eye(len(keep), dtype=torch.float64, device=cov.device)
    return weight[keep] + torch.linalg.solve(c_kk + damp * eye, rhs)


def choose_heads(
    stats: HeadStatistics, kv_heads: int, q_per_kv: int, refit: bool = True, exchange: bool = True
) -> HeadChoice:
    """Keep ``kv_heads`` KV groups with ``q_per_kv`` query heads each, chosen by grouped structured OBS.

    KV groups go first (each scored with all its query heads), then query heads, the same number
    from every kept group; ``exchange`` then improves each stage's set by swaps scored by the exact
    joint cost. ``refit=False`` keeps o_proj's rows as they are (the baseline).
    """
    geo = stats.geometry
    if not (1 <= kv_heads <= geo.kv_heads and 1 <= q_per_kv <= geo.q_per_kv):
        raise SlicelmError(
            f"head removal keeps 1..{geo.kv_heads} KV heads and 1..{geo.q_per_kv} query heads per KV head, "
            f"got {kv_heads} and {q_per_kv}"
        )
    w, cov, hd, q = stats.weight.clone(), stats.cov, geo.head_dim, geo.q_per_kv
    damp = DAMP * torch.diagonal(cov).mean().clamp_min(1e-12)
    full_inv = torch.linalg.inv(cov + damp * torch.eye(cov.shape[0], dtype=torch.float64, device=cov.device))
    hinv = full_inv.clone()
    kv_groups = [_channels(range(j * q, (j + 1) * q), hd) for j in range(geo.kv_heads)]
    kv_bucket = [0] * geo.kv_heads
    dropped_kv = _grouped_obs(w, hinv, kv_groups, kv_bucket, {0: geo.kv_heads - kv_heads})
    none = torch.zeros(0, dtype=torch.long)
    if exchange and dropped_kv:
        dropped_kv = _exchange(stats.weight, full_inv, kv_groups, kv_bucket, dropped_kv, none)
        w, hinv = stats.weight.clone(), full_inv.clone()  # replay the final set's OBS updates
        _grouped_obs(w, hinv, [kv_groups[g] for g in dropped_kv], [0] * len(dropped_kv), {0: len(dropped_kv)})
    kv_keep = sorted(set(range(geo.kv_heads)) - set(dropped_kv))
    heads = [j * q + i for j in kv_keep for i in range(q)]
    head_groups = [_channels([h], hd) for h in heads]
    head_bucket = [h // q for h in heads]
    dropped = _grouped_obs(w, hinv, head_groups, head_bucket, {j: q - q_per_kv for j in kv_keep})
    if exchange and dropped:
        fixed = torch.cat([none, *(kv_groups[g] for g in dropped_kv)])
        dropped = _exchange(stats.weight, full_inv, head_groups, head_bucket, dropped, fixed)
    q_keep = torch.tensor(sorted(set(heads) - {heads[g] for g in dropped}), dtype=torch.long)
    keep = _channels(q_keep, hd).to(cov.device)
    new = refit_rows(stats.weight, cov, keep) if refit else stats.weight[keep].clone()
    error = reconstruction_error(stats.weight, cov, keep, new)
    return HeadChoice(
        HeadGeometry(kv_heads, q_per_kv, hd),
        torch.tensor(kv_keep, dtype=torch.long),
        q_keep,
        new,
        error,
        error / max(stats.energy, 1e-30),
    )


def _keep_rows(module: nn.Module, rows: torch.Tensor) -> None:
    """Keep output rows ``rows`` of a stream reader (q/k/v), and the matching bias entries."""
    weight = stream_weight(module, "reader")  # (out, D)
    rows = rows.to(weight.device)
    bias = stream_bias(module)
    new_bias = bias.index_select(0, rows).contiguous() if bias is not None else None
    set_stream_weight(module, "reader", weight.index_select(-2, rows), new_bias)


def set_head_counts(attn: nn.Module, geometry: HeadGeometry) -> None:
    """Make an attention module's head-count attributes match ``geometry`` (see
    :func:`slicelm.modeling.modeling_slicelm.set_head_counts`)."""
    set_counts(attn, geometry.kv_heads, geometry.q_per_kv)


@torch.no_grad()
def apply_heads(layer: nn.Module, layout: Layout, choice: HeadChoice) -> None:
    """Delete the removed heads from one block in place and store the refit o_proj (model dtype)."""
    q_proj, k_proj, v_proj, o_proj = _projections(layer, layout)
    hd = choice.geometry.head_dim
    _keep_rows(q_proj, _channels(choice.q_keep, hd))
    for module in (k_proj, v_proj):
        _keep_rows(module, _channels(choice.kv_keep, hd))
    old = stream_weight(o_proj, "writer")
    new = choice.weight.to(device=old.device, dtype=old.dtype)
    if not bool(torch.isfinite(new).all()):
        raise SlicelmError("the o_proj refit is not finite; give more calibration data")
    set_stream_weight(o_proj, "writer", new, stream_bias(o_proj))
    set_head_counts(get_module(layer, layout.attn), choice.geometry)


def resize_heads(layer: nn.Module, layout: Layout, geometry: HeadGeometry) -> None:
    """Give a freshly built block the shapes of ``geometry`` (weights uninitialised), as a loader does
    before reading a checkpoint whose layers keep different numbers of heads."""
    _projections(layer, layout)  # refuses fused projections in one line
    resize_block_heads(layer, layout.to_dict(), geometry.kv_heads, geometry.q_per_kv)


def prune_heads(
    layer: nn.Module,
    layout: Layout,
    batches: list[Batch],
    store: ActivationStore,
    kv_heads: int,
    q_per_kv: int,
    device: torch.device,
) -> float:
    """Keep ``kv_heads`` KV groups of ``q_per_kv`` query heads in one block, o_proj refit.

    Same contract as the MLP step: the block reads ``store["x", i]`` in its readers' basis. Returns
    the refit's output error relative to o_proj's output energy (0.0 when nothing is removed).
    """
    geo = head_geometry(layer, layout)
    if (kv_heads, q_per_kv) == (geo.kv_heads, geo.q_per_kv):
        return 0.0
    stats = head_statistics(layer, layout, batches, store, device)
    choice = choose_heads(stats, kv_heads, q_per_kv)
    apply_heads(layer, layout, choice)
    return choice.relative


def removal_curve(stats: HeadStatistics) -> dict[tuple[int, int], float]:
    """Relative refit error of every ``(kv_heads, q_per_kv)`` level, from one block's statistics.

    Greedy selection without the exchange pass (whose cost grows with the square of the removed
    channels): an upper bound of what :func:`prune_heads` reaches, measured within ~1% of it.
    """
    geo = stats.geometry
    return {
        (k, q): choose_heads(stats, k, q, exchange=False).relative if (k, q) != (geo.kv_heads, geo.q_per_kv) else 0.0
        for k in range(1, geo.kv_heads + 1)
        for q in range(1, geo.q_per_kv + 1)
    }


def head_removal_curve(
    layer: nn.Module, layout: Layout, batches: list[Batch], store: ActivationStore, device: torch.device
) -> dict[tuple[int, int], float]:
    """One statistics pass, then the relative refit error of every ``(kv_heads, q_per_kv)`` level
    (``(K, Q)`` -> 0.0). The layer is not modified."""
    return removal_curve(head_statistics(layer, layout, batches, store, device))


def attention_parameters(geometry: HeadGeometry, d_in: int, d_out: int, biases: tuple[bool, bool]) -> int:
    """Parameters of q/k/v/o at ``geometry``: reads ``d_in``, writes ``d_out``; biases: (q/k/v, o)."""
    q_rows, kv_rows = geometry.heads * geometry.head_dim, geometry.kv_heads * geometry.head_dim
    count = (q_rows + 2 * kv_rows) * d_in + q_rows * d_out
    return count + (q_rows + 2 * kv_rows) * biases[0] + d_out * biases[1]
