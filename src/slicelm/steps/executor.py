"""The executor: follow a :class:`~slicelm.core.plan.SlicingPlan` — rotate, prune and slice, layer by layer.

It knows nothing of schedules or budgets: every width, the layout, the basis source and the head's
tie come from the plan (see :mod:`slicelm.allocate.planning` for how plans are made).

SliceGPT: rotate every point of the residual stream into its PCA basis and drop the tail.

The walk goes one decoder layer at a time on the signals produced by the already-sliced layers
before it (so each layer's PCA sees the errors of slicing upstream, as in the paper). For a
sequential block with input ``x~`` (width d_in, basis Q_in (D, d_in)):

1. ``h = x~ Q_in^T + attn(norm(x~))``  is the stream after attention, in original coordinates.
   Its PCA gives Q_mid; ``o_proj`` is rotated to write ``h Q_mid`` and the residual gets the
   shortcut ``S_attn = Q_in^T Q_mid`` (d_in, d_mid), so ``h~ = x~ S_attn + attn(...) Q_mid = h Q_mid``.
2. ``z = h~ Q_mid^T + mlp(norm(h~))``, PCA -> Q_out, ``down_proj`` writes ``z Q_out``, shortcut
   ``S_mlp = Q_mid^T Q_out``, and ``x~_next = z Q_out``.

Parallel blocks have one basis per block: ``z = x~ Q_in^T + attn(norm(x~)) + mlp(norm(x~))``.
Each branch is computed once per calibration batch; covariances accumulate in float64.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slicelm.allocate.context import PlanContext
from slicelm.allocate.counting import ParameterCounter
from slicelm.core.arch import Layout, resolve
from slicelm.core.bases import BASES
from slicelm.core.calibration import Batch, WeightAccess, capture_layer_inputs
from slicelm.core.devices import DeviceAccess, move_buffers_outside
from slicelm.core.fuse import FusedNorms, fuse_final, fuse_layer, prepare_ends
from slicelm.core.offload import ActivationStore
from slicelm.core.pca import CovarianceAccumulator
from slicelm.core.plan import LayerWidths, SlicingPlan
from slicelm.core.resources import PeakMemory, count_parameters
from slicelm.core.rotate import rotate_reader, rotate_writer
from slicelm.core.statistics import ModelStatistics, collect_statistics
from slicelm.errors import SlicelmError
from slicelm.layouts.plain import check_plain, diagonalise_final_norm
from slicelm.modeling.modeling_slicelm import (
    SLICELM_KEY,
    RMSNProject,
    attention_half,
    block_roles,
    branch_removed,
    forget_parts,
    get_module,
    make_sliced_block,
    mlp_half,
    remove_branch,
    set_module,
    sliced_model_class,
    stream_bias,
    stream_weight,
)
from slicelm.steps.blocks import remove_attention, remove_mlp
from slicelm.steps.channels import (
    DAMP,
    check_prunable,
    intermediate_width,
    obs_prune,
    reconstruction_error,
    select_channels,
)
from slicelm.steps.heads import head_geometry, prune_heads
from slicelm.version import __version__

# The MLP refit solves a least-squares problem per output with as many unknowns as kept channels:
# with fewer than a few tokens per channel it fits noise (measured: SmolLM2, 1k tokens for 1,536
# channels, ppl 376 against 30 with 32k tokens).
REFIT_TOKENS_PER_CHANNEL = 4


@dataclass
class SliceReport:
    """What slicing did, for humans and for the JSON report."""

    params_before: int
    params_after: int
    plan: dict[str, Any]
    explained_variance: dict[str, float] = field(default_factory=dict)  # point -> kept/total
    calibration: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, float] = field(default_factory=dict)
    layout: str = "slicegpt"
    planning: dict[str, Any] = field(default_factory=dict)  # how a --target-params plan was chosen
    mlp_error: dict[str, float] = field(default_factory=dict)  # layer -> refit MLP error / MLP output energy
    head_error: dict[str, float] = field(default_factory=dict)  # layer -> refit o_proj error / its output energy
    warnings: list[str] = field(default_factory=list)  # things the user should know (printed by the CLI)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["params_ratio"] = self.params_after / self.params_before
        return out


def merge_report(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base | extra``, merging dict values one level deep (``extra`` wins), e.g. calibration details."""
    merged = dict(base)
    for key, value in extra.items():
        old = merged.get(key)
        merged[key] = old | value if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


# --------------------------------------------------------------------------------------------------
# The algorithm
# --------------------------------------------------------------------------------------------------
class _Bases:
    """Chooses the basis at each point of the stream and records explained variance."""

    def __init__(self, kind: str, seed: int, dim: int, device: torch.device, fixed: torch.Tensor | None = None) -> None:
        self.kind, self.dim, self.device = kind, dim, device
        self.generator = torch.Generator().manual_seed(seed)
        self.explained: dict[str, float] = {}
        self.fixed = fixed.to(device) if fixed is not None else None  # (D, D): one basis for every point

    def new(self) -> CovarianceAccumulator:
        return CovarianceAccumulator(self.dim, device=self.device)

    def choose(self, name: str, acc: CovarianceAccumulator, width: int) -> torch.Tensor:
        """(D, width) float64 with orthonormal columns."""
        cov = acc.covariance()
        if not bool(torch.isfinite(cov).all()):
            raise SlicelmError(
                f"the residual stream at {name} holds non-finite values (NaN/inf) on the calibration data; "
                "the model overflows in its dtype: slice in float32 (--dtype float32)"
            )
        q = self.fixed if self.fixed is not None else BASES[self.kind].at_point(cov, self.generator)
        # Share of the stream's energy kept by the chosen basis (for PCA: top eigenvalues / trace).
        kept = torch.einsum("ij,ik,kj->", q[:, :width], cov, q[:, :width]).item()
        self.explained[name] = kept / max(torch.trace(cov).item(), 1e-30)
        return q[:, :width]


def _project(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Calibration signals in another basis: (B, T, n) @ (n, m), returned in x's dtype.

    Signals are stored in the model's dtype, so they are multiplied in float32 (float64 inputs in
    float64, half precision upcast): weights are rotated in float64, activations need not be.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(work) @ q.to(device=x.device, dtype=work)).to(x.dtype)


def _set_shortcut(layer: nn.Module, name: str, q_from: torch.Tensor, q_to: torch.Tensor) -> None:
    """Shortcut S = q_from^T q_to (d_from, d_to), stored as Linear weight S^T (d_to, d_from).

    A block without shortcuts (one basis for the whole stream) must have S = I: checked here.
    """
    s = q_from.T @ q_to
    linear = getattr(layer, name, None)
    if linear is None:
        eye = torch.eye(s.shape[0], s.shape[1], dtype=s.dtype, device=s.device)
        if s.shape[0] != s.shape[1] or not torch.allclose(s, eye, atol=1e-8):
            raise RuntimeError(f"{name}: the bases differ, but the block has no shortcut")
        return
    linear.weight = nn.Parameter(s.T.contiguous().to(linear.weight.dtype), requires_grad=False)
    linear.in_features, linear.out_features = s.shape


@torch.no_grad()
def execute(
    model: nn.Module,
    calibration: Sequence[torch.Tensor],
    plan: SlicingPlan,
    *,
    batch_size: int = 8,
    pad_token_id: int | None = None,
    progress: bool = True,
    access: WeightAccess | None = None,
    store: ActivationStore | None = None,
    device: torch.device | str | None = None,
    statistics: ModelStatistics | None = None,
) -> SliceReport:
    """Follow ``plan`` on ``model`` in place and return a report.

    calibration: 1-D token-id tensors (any lengths; batches are right-padded and padding is masked
    out of every statistic). After this call ``model`` is an instance of ``Sliced<Class>`` that can
    be saved with :func:`slicelm.save_sliced` and loaded by plain transformers with remote code.
    access / store: where weights and calibration activations live (see :mod:`slicelm.streaming`);
    by default everything stays in memory.
    device: where to compute (e.g. ``"cuda"``); the model stays where it is and each module visits
    the device only while it is processed (see :mod:`slicelm.core.devices`). Default: where it is.
    statistics: the unsliced model's stream moments, when the caller has them (a one-basis plan's
    PCA or channel basis is chosen from them; otherwise a read-only statistics pass computes them).
    """
    access = access or WeightAccess()
    home = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    store = store if store is not None else ActivationStore()
    if getattr(model, "_slicelm_model", False):
        raise SlicelmError("this model is already sliced; load the original model to slice it again")
    if len(calibration) == 0:
        raise SlicelmError("no calibration samples; give at least one sequence")
    layout = resolve(model)
    model.eval()
    check_model_for_plan(model, layout, plan)
    if device is not None and torch.device(device) != home:
        access = DeviceAccess(access, torch.device(device), home)
        move_buffers_outside(model, layout.layers, torch.device(device))
    hidden = model.config.hidden_size
    layers = get_module(model, layout.layers)
    pad_id = resolve_pad_id(model, pad_token_id)

    timings: dict[str, float] = {}
    memory = PeakMemory()
    params_before = count_parameters(model)
    start = time.perf_counter()
    stream = plan.stream  # one basis for the whole stream, or a basis per point with shortcuts

    for path in layout.embeddings:
        access.load(model, path)
    device = get_module(model, layout.embeddings[0]).weight.device
    fused = prepare_ends(model, layout, keep_tie=plan.tied is not False)
    if plan.tied and not fused.keep_tie:
        raise SlicelmError("the plan keeps the head tied to the embedding, but this model's head is not tied")
    batches = capture_layer_inputs(model, layout, calibration, batch_size, pad_id, store, progress)
    timings["embed"] = time.perf_counter() - start

    ctx = PlanContext(layout, model.config, plan.layout, fused.keep_tie, _intermediate(model, layout))
    fixed = None
    if stream.one_basis:
        basis = BASES[plan.basis]
        if basis.full_width_identity and plan.keeps_stream:  # a whole stream: any such basis is the same function
            basis = BASES["identity"]
        stats = None
        if basis.data:
            t_stats = time.perf_counter()
            stats = statistics
            if stats is None or not stats.has_moments:
                stats = collect_statistics(model, layout, batches, store, access, device=device, progress=progress)
                batches = capture_layer_inputs(model, layout, calibration, batch_size, pad_id, store, progress)
            timings["statistics"] = time.perf_counter() - t_stats
        fixed = basis.whole(stats, hidden, torch.Generator().manual_seed(plan.seed))
        if fused.keep_tie:  # the final norm must stay diagonal in the kept subspace (see plain.py)
            access.load(model, layout.final_norm)
            fixed = diagonalise_final_norm(fixed, plan.embedding, _final_scale(model, layout))
        if stats is not None and stats is not statistics:
            stats.clear()
    warnings = _refit_warnings(plan, batches, ctx.intermediate)

    bases = _Bases(plan.basis, plan.seed, hidden, device, fixed)
    acc = bases.new()
    for i, b in enumerate(batches):
        acc.add(store[("x", i)].to(device), b.mask.to(device))
    q_in = bases.choose("embedding", acc, plan.embedding)  # (D, d_emb)
    for path in layout.embeddings:
        rotate_writer(get_module(model, path), q_in)
    if fused.keep_tie:  # the head shares the new matrix at once: the old one is freed, not kept to the end
        get_module(model, layout.head).weight = get_module(model, layout.embeddings[0]).weight
    for path in layout.embeddings:
        access.done(model, path)
    q_embedding = q_in
    for i in range(len(batches)):
        if plan.refit == "dense":  # the dense model's stream, advanced beside the sliced one (original basis)
            store[("d", i)] = store[("x", i)]
        store[("x", i)] = _project(store[("x", i)].to(device), q_in)

    roles = block_roles(layout.to_dict()) | {"shortcuts": stream.shortcuts}
    errors: dict[str, dict[str, float]] = {"mlp": {}, "heads": {}}
    t_layers = time.perf_counter()
    for index, layer in enumerate(tqdm(layers, desc="slice layers", disable=not progress)):
        layer_path = f"{layout.layers}.{index}"
        access.load(model, layer_path)
        fuse_layer(layer, layout, hidden, fused.eps)
        q_in = _slice_layer(layer, index, layout, plan, roles, batches, store, bases, q_in, errors)
        access.done(model, layer_path)
        memory.sample()
    timings["layers"] = time.perf_counter() - t_layers

    access.load(model, layout.final_norm)
    if not fused.keep_tie:
        access.load(model, layout.head)
    fuse_final(model, layout, fused)
    info = {"version": __version__, "layout": layout.to_dict(), "plan": plan.to_dict(), "norm_eps": fused.eps}
    info |= plan.stream.config_info()  # one basis: no shortcut matrices
    if fused.keep_tie:
        info["tied_head"] = _keep_tie(model, layout, fused, q_in, q_embedding)
    else:
        rotate_reader(get_module(model, layout.head), q_in)
    access.done(model, layout.final_norm)
    if not fused.keep_tie:
        access.done(model, layout.head)
    for i in range(len(batches)):
        del store[("x", i)]
        if plan.refit == "dense":
            del store[("d", i)]

    if device is not None and torch.device(device) != home:
        move_buffers_outside(model, layout.layers, home)
    model.__class__ = sliced_model_class(type(model))
    setattr(model.config, SLICELM_KEY, info)
    timings["total"] = time.perf_counter() - start
    memory.sample()
    # The plain layout is saved in the stock architecture (norm weights back, no shortcuts): count that.
    params_after = ParameterCounter(ctx).count(plan) if stream.one_basis else count_parameters(model)
    return SliceReport(
        params_before=params_before,
        params_after=params_after,
        plan=plan.to_dict(),
        explained_variance=bases.explained,
        calibration={
            "samples": len(calibration),
            "tokens": int(sum(len(s) for s in calibration)),
            "max_seqlen": int(max(len(s) for s in calibration)),
            "batch_size": batch_size,
            "activations_spilled_to_disk": store.spilled,
        },
        seconds=timings,
        peak_memory=memory.as_dict(),
        layout=plan.layout,
        planning=dict(plan.planning),
        mlp_error=errors["mlp"],
        head_error=errors["heads"],
        warnings=warnings,
    )


def resolve_pad_id(model: nn.Module, pad_token_id: int | None) -> int:
    """The id batches are padded with: the caller's, else the config's, else 0."""
    pad_id = pad_token_id if pad_token_id is not None else (model.config.pad_token_id or 0)
    if isinstance(pad_id, (list, tuple)):
        pad_id = pad_id[0]
    return int(pad_id)


def check_model_for_plan(model: nn.Module, layout: Layout, plan: SlicingPlan) -> None:
    """Refuse a plan this model cannot follow (one line): another model, a layout or MLP step the
    family does not admit."""
    if plan.one_basis:
        check_plain(layout.norm, layout.model_type)
    if plan.prunes_mlp or plan.refit == "dense":
        check_prunable(layout.mlp_chunks, layout.model_type)
    if plan.prunes_heads:
        geometry = head_geometry(get_module(model, layout.layers)[0], layout)  # refuses fused projections
        for i, lw in enumerate(plan.layers):
            if lw.heads is not None and not lw.attention_removed:
                if lw.kv_heads > geometry.kv_heads or lw.q_per_kv > geometry.q_per_kv:
                    raise SlicelmError(
                        f"the plan keeps {lw.kv_heads} KV heads of {lw.q_per_kv} query heads in layer {i}; "
                        f"this model has {geometry.kv_heads} of {geometry.q_per_kv}"
                    )
    intermediate = _intermediate(model, layout)
    plan.check_model(
        {
            "model_type": layout.model_type,
            "num_hidden_layers": len(get_module(model, layout.layers)),
            "hidden_size": model.config.hidden_size,
            "intermediate_size": intermediate,
        }
    )


def _refit_warnings(plan: SlicingPlan, batches: list[Batch], intermediate: int) -> list[str]:
    tokens = sum(int(b.mask.sum()) for b in batches)
    if plan.prunes_mlp and tokens < REFIT_TOKENS_PER_CHANNEL * intermediate:
        return [
            f"calibration has {tokens:,} tokens for {intermediate:,}-channel MLPs: the refit of pruned MLPs "
            f"is poorly determined below ~{REFIT_TOKENS_PER_CHANNEL * intermediate:,}; give more "
            "--calib-samples or a longer --calib-seqlen"
        ]
    return []


def _intermediate(model: nn.Module, layout: Layout) -> int:
    """The MLP's intermediate width, from the first layer's writer (shapes are known before loading)."""
    return intermediate_width(get_module(model, layout.layers)[0], layout)


def _final_scale(model: nn.Module, layout: Layout) -> torch.Tensor:
    """The final norm's effective scale (D,), float64 (ones for a weightless norm)."""
    norm = get_module(model, layout.final_norm)
    weight = getattr(norm, "weight", None)
    if weight is None:
        return torch.ones(model.config.hidden_size, dtype=torch.float64)
    return weight.detach().to(torch.float64).cpu() + layout.norm_offset


def _slice_layer(
    layer: nn.Module,
    index: int,
    layout: Layout,
    plan: SlicingPlan,
    roles: dict[str, Any],
    batches: list[Batch],
    store: ActivationStore,
    bases: _Bases,
    q_in: torch.Tensor,
    errors: dict[str, dict[str, float]],
) -> torch.Tensor:
    """Rotate and slice one (norm-fused) decoder layer whose input is in basis ``q_in``.

    Returns the basis of its output (D, d_out); the store then holds the layer's output signals.
    The structure-local steps act on the inputs the layer really receives here, before its
    branches' statistics are taken: heads are removed (o_proj refit) or the attention sub-block
    is; MLP channels are pruned (output refit) or the MLP sub-block is removed.
    errors: each step's relative refit error by layer (``errors["mlp"]``, ``errors["heads"]``).
    """
    d_in, d_mid, d_out = plan.layer(index)
    widths = plan.layers[index]
    mlp = widths.mlp
    layer.slicelm_roles = roles  # lets attention_half/mlp_half find the branches
    forget_parts(layer)
    dense = plan.refit == "dense" and not widths.mlp_removed
    if plan.refit == "dense":
        _advance_dense(layer, layout, batches, store, q_in.device)
    for path in layout.attn_inputs:
        rotate_reader(get_module(layer, path), q_in)
    _attention_step(layer, index, layout, widths, batches, store, q_in.device, errors)
    if layout.parallel:
        if widths.mlp_removed:
            remove_mlp(layer, layout)
        else:
            for path in layout.mlp_inputs:
                rotate_reader(get_module(layer, path), q_in)
        if mlp or dense:

            def rest(x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:  # the stream after attention
                return _project(x, q_in.T) + attention_half(layer, x, **kwargs)

            error = _prune_mlp(layer, layout, batches, store, mlp, q_in.device, rest if dense else None)
            errors["mlp"][f"layer{index}"] = error
        q_out = _slice_branch(layer, layout, batches, store, bases, f"layer{index}", q_in, d_out, both=True)
        make_sliced_block(layer, roles, d_in, None, d_out)
        _set_shortcut(layer, "attn_shortcut", q_in, q_out)
        return q_out
    q_mid = _slice_branch(layer, layout, batches, store, bases, f"layer{index}.attn", q_in, d_mid)
    # Fused MoE experts write as wide as they read: while the MLP still writes original
    # coordinates it must read them too, so its readers are rotated after its branch.
    late = layout.mlp_same_width
    if widths.mlp_removed:
        remove_mlp(layer, layout)
    mlp_readers = [] if widths.mlp_removed else [get_module(layer, path) for path in layout.mlp_inputs]
    if not late:
        for reader in mlp_readers:
            rotate_reader(reader, q_mid)
    if mlp or dense:

        def after_attention(x: torch.Tensor, _kwargs: dict[str, Any]) -> torch.Tensor:
            return _project(x, q_mid.T)

        error = _prune_mlp(layer, layout, batches, store, mlp, q_in.device, after_attention if dense else None)
        errors["mlp"][f"layer{index}"] = error
    name = f"layer{index}.mlp"
    q_out = _slice_branch(layer, layout, batches, store, bases, name, q_mid, d_out, mlp=True, unrotated=late)
    if late:
        for reader in mlp_readers:
            rotate_reader(reader, q_mid)
    make_sliced_block(layer, roles, d_in, d_mid, d_out)
    _set_shortcut(layer, "attn_shortcut", q_in, q_mid)
    _set_shortcut(layer, "ffn_shortcut", q_mid, q_out)
    return q_out


def _attention_step(
    layer: nn.Module,
    index: int,
    layout: Layout,
    widths: LayerWidths,
    batches: list[Batch],
    store: ActivationStore,
    device: torch.device,
    errors: dict[str, dict[str, float]],
) -> None:
    """Remove the attention sub-block, or keep ``(kv_heads, q_per_kv)`` heads (o_proj refit on the
    inputs the block receives: ``store["x", i]`` in its readers' basis)."""
    if widths.attention_removed:
        remove_attention(layer, layout)
    elif widths.heads is not None:
        kv_heads, q_per_kv = widths.heads
        errors["heads"][f"layer{index}"] = prune_heads(layer, layout, batches, store, kv_heads, q_per_kv, device)


def _advance_dense(layer: nn.Module, layout: Layout, batches: list[Batch], store: ActivationStore, device) -> None:
    """Replace the dense stream ``store["d", i]`` (original coordinates) by the dense model's stream
    after this block. The layer is fused (the function is the model's) and not yet rotated or pruned."""
    for i, b in enumerate(batches):
        x = store[("d", i)].to(device)
        h = x + attention_half(layer, x, **b.kwargs)
        store[("d", i)] = h + mlp_half(layer, x if layout.parallel else h)


def _prune_mlp(
    layer: nn.Module,
    layout: Layout,
    batches: list[Batch],
    store: ActivationStore,
    width: int | None,
    device: torch.device,
    rest: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor] | None = None,
) -> float:
    """Keep ``width`` intermediate channels of the layer's MLP (structured OBS + refit); None: all.

    The MLP reads ``store["x", i]`` (the stream it receives in this layer, already in its readers'
    basis). The branch refit (``rest`` None) matches the MLP's own output on those inputs, and
    returns its error relative to the MLP's output energy. The dense refit matches what the dense
    model's block writes, ``store["d", i]`` (the dense stream after it) minus ``rest(x, kwargs)``
    (what the sliced block adds besides the MLP, original coordinates): with ``C = A^T A / N`` and
    ``X = A^T T / N`` on the writer's input ``A``, the unpruned minimiser is ``W0 = C^-1 X``
    (computed with a small ridge towards the writer as it is) and, as
    ``|T - A W|^2 = |T - A W0|^2 + |A (W0 - W)|^2``, the same OBS pruning of ``W0`` minimises it
    with fewer channels. Returns the residual relative to the target's energy.
    """
    writer = get_module(layer, layout.mlp_outputs[0])
    weight = stream_weight(writer, "writer")  # (I, D_out)
    channels = weight.shape[-2]
    width = channels if width is None else width
    if width >= channels and rest is None:
        return 0.0
    acc = CovarianceAccumulator(channels, device=device)
    current: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, args: tuple) -> None:
        acc.add(args[0], current["mask"])
        current["a"] = args[0]

    handle = writer.register_forward_pre_hook(hook)
    cross = torch.zeros(channels, weight.shape[-1], dtype=torch.float64, device=device)  # A^T T
    energy = torch.zeros((), dtype=torch.float64, device=device)  # |T|^2
    bias = stream_bias(writer)
    try:
        for i, b in enumerate(batches):
            current["mask"] = b.mask.to(device)
            x = store[("x", i)].to(device)
            mlp_half(layer, x)
            if rest is not None:
                target = store[("d", i)].to(device) - rest(x, b.kwargs)
                if bias is not None:
                    target = target - bias
                keep = current["mask"].reshape(-1).bool()
                a = current["a"].reshape(-1, channels)[keep].to(torch.float64)
                t = target.reshape(-1, target.shape[-1])[keep].to(torch.float64)
                cross += a.T @ t
                energy += (t * t).sum()
    finally:
        handle.remove()
    cov = acc.covariance()
    if not bool(torch.isfinite(cov).all() and torch.isfinite(cross).all()):
        raise SlicelmError("the MLP's intermediate activations hold non-finite values on the calibration data")
    if rest is None:
        result = obs_prune(weight, cov, width)
        error = reconstruction_error(weight, cov, result.keep, result.weight)
        select_channels(layer, layout, result.keep, result.weight)
        return error / max(torch.einsum("id,ij,jd->", weight.double(), cov, weight.double()).item(), 1e-30)
    cross /= acc.count
    damp = DAMP * torch.diagonal(cov).mean().clamp_min(1e-12)
    eye = torch.eye(channels, dtype=torch.float64, device=device)
    # The ridge pulls towards the writer as it is, not towards zero: W0 = W + (C + damp I)^-1 (X - C W).
    # Where the target is what the writer already writes (nothing changed upstream), X = C W and W0 = W.
    written = weight.to(torch.float64)
    best = written + torch.linalg.solve(cov + damp * eye, cross - cov @ written)  # (I, D)
    result = obs_prune(best, cov, width)
    c_kk = cov[result.keep][:, result.keep]
    residual = energy / acc.count - 2 * (result.weight * cross[result.keep]).sum()
    residual = residual + torch.einsum("id,ij,jd->", result.weight, c_kk, result.weight)
    select_channels(layer, layout, result.keep, result.weight)
    return residual.item() / max(energy.item() / acc.count, 1e-30)


def _keep_tie(model: nn.Module, layout: Layout, fused: FusedNorms, q_last: torch.Tensor, q_emb: torch.Tensor) -> dict:
    """Final norm -> RMSN + (d_L, d_0) projection; the head stays tied to the rotated embedding."""
    embedding = get_module(model, layout.embeddings[0])
    final = RMSNProject(
        model.config.hidden_size,
        fused.eps,
        q_last.shape[1],
        q_emb.shape[1],
        bias=fused.final_shift is not None,
    )
    m = q_last.T @ (fused.final_scale.to(q_last.device)[:, None] * q_emb)  # (d_L, d_0)
    final.proj.weight = nn.Parameter(m.T.contiguous().to(embedding.weight.dtype), requires_grad=False)
    if fused.final_shift is not None:
        shift = fused.final_shift.to(q_emb.device) @ q_emb  # (d_0,)
        final.proj.bias = nn.Parameter(shift.to(embedding.weight.dtype), requires_grad=False)
    final.to(q_last.device)  # not the embedding's: when streaming it may already be written and freed
    set_module(model, layout.final_norm, final)
    head = get_module(model, layout.head)
    head.weight = embedding.weight
    head.in_features = embedding.weight.shape[1]
    return {"bias": fused.final_shift is not None}


def _slice_branch(
    layer: nn.Module,
    layout: Layout,
    batches: list[Batch],
    store: ActivationStore,
    bases: _Bases,
    name: str,
    q_in: torch.Tensor,
    width: int,
    both: bool = False,
    mlp: bool = False,
    unrotated: bool = False,
) -> torch.Tensor:
    """Compute one branch on every batch, choose the next basis, rotate the branch's writers.

    Each batch's stream ``store["x", i]`` (B, T, d_in, basis q_in) is replaced by the stream after
    the branch in the new basis (B, T, width). Returns the new basis (D, width). ``unrotated``: the
    branch's readers still read original coordinates, so it is fed ``x q_in^T`` (B, T, D); the RMS
    norm before it commutes with that change of basis.
    """
    device = q_in.device
    acc = bases.new()
    for i, b in enumerate(batches):
        x = store[("x", i)].to(device)
        x_read = _project(x, q_in.T) if unrotated else x
        branch = mlp_half(layer, x_read) if mlp else attention_half(layer, x_read, **b.kwargs)
        if both:
            branch = branch + mlp_half(layer, x)
        # The stream after the branch in original coordinates: residual (un-rotated) + branch.
        z = (_project(x, q_in.T) + branch).to(x.dtype)  # (B, T, D)
        acc.add(z, b.mask.to(device))
        store[("z", i)] = z
    q_out = bases.choose(name, acc, width)
    branches = ("attn", "mlp") if both else ("mlp",) if mlp else ("attn",)
    outputs = {"attn": layout.attn_outputs, "mlp": layout.mlp_outputs}
    roles = layout.to_dict()
    for branch in branches:
        if branch_removed(layer, roles, branch):  # zeros of the new width: nothing to rotate
            remove_branch(layer, roles, branch, width)
            continue
        for path in outputs[branch]:
            rotate_writer(get_module(layer, path), q_out)
    for i in range(len(batches)):
        store[("x", i)] = _project(store[("z", i)].to(device), q_out)  # the store keeps it on the CPU
        del store[("z", i)]
    return q_out
