"""SliceGPT: rotate every point of the residual stream into its PCA basis and drop the tail.

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

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from slicelm import __version__
from slicelm.arch import Layout, resolve
from slicelm.errors import SlicelmError
from slicelm.fuse import FusedNorms, fuse_final, fuse_layer, prepare_ends
from slicelm.modeling_slicelm import (
    SLICELM_KEY,
    RMSNProject,
    attention_half,
    block_roles,
    forget_parts,
    get_module,
    make_sliced_block,
    mlp_half,
    set_module,
    sliced_model_class,
    split_layer_call,
)
from slicelm.offload import ActivationStore
from slicelm.pca import CovarianceAccumulator, pca, random_orthogonal
from slicelm.plan import LayerWidths, SlicingPlan
from slicelm.resources import PeakMemory, count_parameters
from slicelm.rotate import rotate_reader, rotate_writer

Basis = Literal["pca", "random", "identity"]


@dataclass(frozen=True)
class SliceConfig:
    """How to slice. Validated on construction.

    sparsity: fraction of the hidden width removed at every point of the stream, in [0, 1).
    round_to: widths are rounded down to a multiple of this (GEMM-friendly shapes).
    slice_head: also slice the input of the LM head (the last block's output). For a kept tie the
        head is the embedding, so without slice_head the shared matrix keeps its full width.
    untie_head: for models whose head is tied to the embedding, give the head its own weight (the
        paper's method). By default the tie is kept: the head reads the embedding's basis and the
        final norm becomes a small (d_L, d_0) projection, so the vocabulary matrix is stored once.
        LayerNorm families are always untied (mean-centring the embedding would change the head).
    basis: ``pca`` (SliceGPT); ``random`` (a Haar-random rotation: an exactness check and a
        baseline) or ``identity`` (plain truncation of the original coordinates, a baseline).
    batch_size: calibration sequences per forward pass.
    seed: for the random basis.
    """

    sparsity: float = 0.25
    round_to: int = 8
    slice_head: bool = False
    untie_head: bool = False
    basis: Basis = "pca"
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise SlicelmError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if int(self.round_to) < 1:
            raise SlicelmError(f"round_to must be a positive integer, got {self.round_to}")
        if self.basis not in ("pca", "random", "identity"):
            raise SlicelmError(f"basis must be pca, random or identity, got {self.basis!r}")
        if int(self.batch_size) < 1:
            raise SlicelmError(f"batch size must be a positive integer, got {self.batch_size}")


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
# Calibration signals
# --------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One calibration batch, captured at the input of decoder layer 0.

    mask: (B, T) bool, True on real tokens (padding never enters the statistics); kwargs: what the
    model passes to each decoder layer (attention mask, position embeddings, ...), on the model's
    device. The batch's stream itself, (B, T, d), lives in an :class:`ActivationStore` under
    ``("x", index)`` so it can be spilled to disk.
    """

    mask: torch.Tensor
    kwargs: dict[str, Any]


class WeightAccess:
    """How slicing reaches the weights of a module (a path relative to the model).

    The default does nothing: the whole model is in memory. The streaming path
    (:mod:`slicelm.streaming`) loads a module from disk in :meth:`load` and writes it out and frees
    it in :meth:`done`, so one algorithm serves both.
    """

    def load(self, model: nn.Module, path: str) -> None:
        """Called before ``path`` is read or modified."""

    def done(self, model: nn.Module, path: str) -> None:
        """Called once ``path`` holds its final sliced weights."""


class _Stop(Exception):
    """Raised from a hook to end a forward pass once layer 0's inputs are caught."""


def pad_batches(
    samples: Sequence[torch.Tensor], batch_size: int, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-pad 1-D token sequences into (B, T) ``input_ids`` and bool ``attention_mask``."""
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        length = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.bool)
        for row, sample in enumerate(chunk):
            ids[row, : len(sample)] = sample
            mask[row, : len(sample)] = True
        yield ids, mask


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    layout: Layout,
    samples: Sequence[torch.Tensor],
    batch_size: int,
    pad_id: int,
    store: ActivationStore,
    progress: bool = True,
) -> list[Batch]:
    """Run the embeddings on every batch and catch what decoder layer 0 receives (into ``store``)."""
    first = get_module(model, layout.layers)[0]
    device = get_module(model, layout.embeddings[0]).weight.device
    caught: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        caught["hidden"], caught["kwargs"] = split_layer_call(module, args, kwargs)  # names positional args
        raise _Stop

    batches = []
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        total = math.ceil(len(samples) / batch_size)
        for ids, mask in tqdm(
            pad_batches(samples, batch_size, pad_id), total=total, desc="embed", disable=not progress
        ):
            try:
                model(input_ids=ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
            except _Stop:
                pass
            store[("x", len(batches))] = caught["hidden"]
            batches.append(Batch(mask, caught["kwargs"]))
    finally:
        handle.remove()
    return batches


# --------------------------------------------------------------------------------------------------
# The algorithm
# --------------------------------------------------------------------------------------------------
class _Bases:
    """Chooses the basis at each point of the stream and records explained variance."""

    def __init__(self, config: SliceConfig, dim: int, device: torch.device) -> None:
        self.config, self.dim, self.device = config, dim, device
        self.generator = torch.Generator().manual_seed(config.seed)
        self.explained: dict[str, float] = {}

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
        _, q = pca(cov)
        if self.config.basis == "random":
            q = random_orthogonal(self.dim, self.generator).to(q.device)
        elif self.config.basis == "identity":
            q = torch.eye(self.dim, dtype=torch.float64, device=q.device)
        # Share of the stream's energy kept by the chosen basis (for PCA: top eigenvalues / trace).
        kept = torch.einsum("ij,ik,kj->", q[:, :width], cov, q[:, :width]).item()
        self.explained[name] = kept / max(torch.trace(cov).item(), 1e-30)
        return q[:, :width]


def _project(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(B, T, n) @ (n, m) in float64, returned in x's dtype."""
    return (x.to(torch.float64) @ q.to(x.device)).to(x.dtype)


def _set_shortcut(linear: nn.Linear, q_from: torch.Tensor, q_to: torch.Tensor) -> None:
    """Shortcut S = q_from^T q_to (d_from, d_to), stored as Linear weight S^T (d_to, d_from)."""
    s = q_from.T @ q_to
    linear.weight = nn.Parameter(s.T.contiguous().to(linear.weight.dtype), requires_grad=False)
    linear.in_features, linear.out_features = s.shape


@torch.no_grad()
def slice_model(
    model: nn.Module,
    calibration: Sequence[torch.Tensor],
    config: SliceConfig | None = None,
    *,
    pad_token_id: int | None = None,
    progress: bool = True,
    access: WeightAccess | None = None,
    store: ActivationStore | None = None,
    device: torch.device | str | None = None,
) -> SliceReport:
    """Slice ``model`` in place with SliceGPT and return a report.

    calibration: 1-D token-id tensors (any lengths; batches are right-padded and padding is masked
    out of every statistic). After this call ``model`` is an instance of ``Sliced<Class>`` that can
    be saved with :func:`slicelm.save_sliced` and loaded by plain transformers with remote code.
    access / store: where weights and calibration activations live (see :mod:`slicelm.streaming`);
    by default everything stays in memory.
    device: where to compute (e.g. ``"cuda"``); the model stays where it is and each module visits
    the device only while it is processed (see :mod:`slicelm.devices`). Default: where it is.
    """
    config = config or SliceConfig()
    access = access or WeightAccess()
    home = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    store = store if store is not None else ActivationStore()
    if getattr(model, "_slicelm_model", False):
        raise SlicelmError("this model is already sliced; load the original model to slice it again")
    if len(calibration) == 0:
        raise SlicelmError("no calibration samples; give at least one sequence")
    layout = resolve(model)
    model.eval()
    if device is not None and torch.device(device) != home:
        from slicelm.devices import DeviceAccess, move_buffers_outside

        access = DeviceAccess(access, torch.device(device), home)
        move_buffers_outside(model, layout.layers, torch.device(device))
    hidden = model.config.hidden_size
    layers = get_module(model, layout.layers)
    pad_id = pad_token_id if pad_token_id is not None else (model.config.pad_token_id or 0)
    if isinstance(pad_id, (list, tuple)):
        pad_id = pad_id[0]

    timings: dict[str, float] = {}
    memory = PeakMemory()
    params_before = count_parameters(model)
    start = time.perf_counter()

    for path in layout.embeddings:
        access.load(model, path)
    device = get_module(model, layout.embeddings[0]).weight.device
    fused = prepare_ends(model, layout, keep_tie=not config.untie_head)
    plan = _plan(layout, hidden, len(layers), config, fused.keep_tie)
    batches = capture_layer_inputs(model, layout, calibration, config.batch_size, int(pad_id), store, progress)
    timings["embed"] = time.perf_counter() - start

    bases = _Bases(config, hidden, device)
    acc = bases.new()
    for i, b in enumerate(batches):
        acc.add(store[("x", i)].to(device), b.mask.to(device))
    q_in = bases.choose("embedding", acc, plan.embedding)  # (D, d_emb)
    for path in layout.embeddings:
        rotate_writer(get_module(model, path), q_in)
        access.done(model, path)
    q_embedding = q_in
    for i in range(len(batches)):
        store[("x", i)] = _project(store[("x", i)].to(device), q_in)

    roles = block_roles(layout.to_dict())
    t_layers = time.perf_counter()
    for index, layer in enumerate(tqdm(layers, desc="slice layers", disable=not progress)):
        layer_path = f"{layout.layers}.{index}"
        access.load(model, layer_path)
        fuse_layer(layer, layout, hidden, fused.eps)
        q_in = _slice_layer(layer, index, layout, plan, roles, batches, store, bases, q_in)
        access.done(model, layer_path)
        memory.sample()
    timings["layers"] = time.perf_counter() - t_layers

    access.load(model, layout.final_norm)
    if not fused.keep_tie:
        access.load(model, layout.head)
    fuse_final(model, layout, fused)
    info = {"version": __version__, "layout": layout.to_dict(), "plan": plan.to_dict(), "norm_eps": fused.eps}
    if fused.keep_tie:
        info["tied_head"] = _keep_tie(model, layout, fused, q_in, q_embedding)
    else:
        rotate_reader(get_module(model, layout.head), q_in)
    access.done(model, layout.final_norm)
    if not fused.keep_tie:
        access.done(model, layout.head)
    for i in range(len(batches)):
        del store[("x", i)]

    if device is not None and torch.device(device) != home:
        move_buffers_outside(model, layout.layers, home)
    model.__class__ = sliced_model_class(type(model))
    setattr(model.config, SLICELM_KEY, info)
    timings["total"] = time.perf_counter() - start
    memory.sample()
    return SliceReport(
        params_before=params_before,
        params_after=count_parameters(model),
        plan=plan.to_dict(),
        explained_variance=bases.explained,
        calibration={
            "samples": len(calibration),
            "tokens": int(sum(len(s) for s in calibration)),
            "max_seqlen": int(max(len(s) for s in calibration)),
            "batch_size": config.batch_size,
            "activations_spilled_to_disk": store.spilled,
        },
        seconds=timings,
        peak_memory=memory.as_dict(),
    )


def _plan(layout: Layout, hidden: int, num_layers: int, config: SliceConfig, tied: bool) -> SlicingPlan:
    plan = SlicingPlan.uniform(hidden, num_layers, config.sparsity, config.round_to, config.slice_head, layout.parallel)
    if tied and not config.slice_head:  # the head *is* the embedding: an unsliced head keeps it full width
        plan = replace(plan, embedding=hidden)
    if layout.mlp_same_width:  # MoE experts write as wide as they read: the MLP keeps its width
        plan = replace(plan, layers=tuple(LayerWidths(w.out, w.out) for w in plan.layers))
    if layout.ends_same_width:  # GPT-2 views its final stream with the embeddings' width
        plan = replace(plan, embedding=plan.head)
    return plan


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
) -> torch.Tensor:
    """Rotate and slice one (norm-fused) decoder layer whose input is in basis ``q_in``.

    Returns the basis of its output (D, d_out); the store then holds the layer's output signals.
    """
    d_in, d_mid, d_out = plan.layer(index)
    layer.slicelm_roles = roles  # lets attention_half/mlp_half find the branches
    forget_parts(layer)
    for path in layout.attn_inputs:
        rotate_reader(get_module(layer, path), q_in)
    if layout.parallel:
        for path in layout.mlp_inputs:
            rotate_reader(get_module(layer, path), q_in)
        q_out = _slice_branch(layer, layout, batches, store, bases, f"layer{index}", q_in, d_out, both=True)
        make_sliced_block(layer, roles, d_in, None, d_out)
        _set_shortcut(layer.attn_shortcut, q_in, q_out)
        return q_out
    q_mid = _slice_branch(layer, layout, batches, store, bases, f"layer{index}.attn", q_in, d_mid)
    # Fused MoE experts write as wide as they read: while the MLP still writes original
    # coordinates it must read them too, so its readers are rotated after its branch.
    late = layout.mlp_same_width
    mlp_readers = [get_module(layer, path) for path in layout.mlp_inputs]
    if not late:
        for reader in mlp_readers:
            rotate_reader(reader, q_mid)
    name = f"layer{index}.mlp"
    q_out = _slice_branch(layer, layout, batches, store, bases, name, q_mid, d_out, mlp=True, unrotated=late)
    if late:
        for reader in mlp_readers:
            rotate_reader(reader, q_mid)
    make_sliced_block(layer, roles, d_in, d_mid, d_out)
    _set_shortcut(layer.attn_shortcut, q_in, q_mid)
    _set_shortcut(layer.ffn_shortcut, q_mid, q_out)
    return q_out


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
        z = (x.to(torch.float64) @ q_in.T + branch.to(torch.float64)).to(x.dtype)  # (B, T, D)
        acc.add(z, b.mask.to(device))
        store[("z", i)] = z
    q_out = bases.choose(name, acc, width)
    if both:
        writers = layout.attn_outputs + layout.mlp_outputs
    else:
        writers = layout.mlp_outputs if mlp else layout.attn_outputs
    for path in writers:
        rotate_writer(get_module(layer, path), q_out)
    for i in range(len(batches)):
        store[("x", i)] = _project(store[("z", i)].to(device), q_out)  # the store keeps it on the CPU
        del store[("z", i)]
    return q_out
