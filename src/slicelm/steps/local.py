"""Structure-local steps: MLP channels pruned inside each decoder layer, the residual stream untouched.

Removing intermediate channels of an MLP (and refitting its writer by structured OBS,
:mod:`slicelm.steps.channels`) only needs what that MLP receives and what it writes; the stream keeps its
basis and width. So it needs no computational invariance and no norm fusion: each decoder layer
runs exactly as its family wrote it (sandwich norms, soft-capping, sliding windows, multipliers),
and the result is the stock architecture with a smaller ``intermediate_size`` (or
``moe_intermediate_size`` / ``shared_expert_intermediate_size``) — loadable without remote code.

The walk goes one decoder layer at a time, on the inputs produced by the already-pruned layers
before it (as the rotation path does). Per layer, the *units* whose channels are pruned are:

* a dense MLP: the covariance of its writer's input (B, T, I) over the real tokens;
* the routed experts of a mixture (fused ``gate_up_proj`` (E, 2I, D), ``down_proj`` (E, D, I)): the
  experts module's call gives the tokens (N, D), the router's top-k choice (N, k) and weights
  (N, k); expert e's covariance is taken over the tokens routed to it only, each weighted by its
  routing weight (the layer's output is ``sum_e w_e expert_e(x)``, so that is the error that counts).
  The router is never changed;
* a shared expert (Qwen2-MoE): a dense MLP whose output is scaled per token by
  ``sigmoid(shared_expert_gate(x))``; its tokens are weighted by that gate.

An expert that receives fewer than ``REFIT_TOKENS_PER_CHANNEL`` routed tokens per channel would be
refit on noise: its channels are then chosen by their weight norms and kept unchanged (no refit),
and a note says which experts and how many tokens they had. A stock config holds one width per
kind of MLP, so every expert (and every layer) keeps the same number of channels.

``--schedule heads`` adds the head-removal step of :mod:`slicelm.steps.heads` (:data:`LOCAL_STEPS`):
every layer keeps the same mildest uniform removal as the executor's heads schedule (one query head
fewer per KV group, else one KV group fewer; the next mildest where the stock config class refuses
that count), chosen by grouped OBS from the moment of o_proj's input
on the inputs the layer really receives, o_proj refit by least squares; then the layer's MLP
statistics are taken with its heads already removed. RoPE and ``head_dim`` are untouched, so the stock
config gets the new ``num_attention_heads`` / ``num_key_value_heads`` and an explicit ``head_dim``.
A family whose attention mixes heads (olmo2's q_norm/k_norm over the whole projection) is refused
in one line (:func:`slicelm.steps.heads.head_refusal`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slicelm.allocate.checks import check_against_config
from slicelm.allocate.context import mlp_width
from slicelm.config import SliceConfig
from slicelm.core.arch import Layout, resolve, rotation_refusal
from slicelm.core.calibration import Batch, WeightAccess, pad_batches
from slicelm.core.meta import meta_model
from slicelm.core.offload import ActivationStore
from slicelm.core.pca import CovarianceAccumulator
from slicelm.core.plan import LayerWidths, SlicingPlan
from slicelm.core.resources import PeakMemory, count_parameters
from slicelm.errors import SlicelmError
from slicelm.layouts.plain import drop_config_layers
from slicelm.modeling.modeling_slicelm import SLICELM_KEY, get_module, split_layer_call, stream_weight
from slicelm.steps.blocks import drop_layers
from slicelm.steps.channels import keep_mlp_channels, obs_prune, reconstruction_error
from slicelm.steps.executor import REFIT_TOKENS_PER_CHANNEL, SliceReport
from slicelm.steps.heads import HeadGeometry, apply_heads, choose_heads, head_geometry, head_refusal, head_statistics
from slicelm.version import __version__

KIND = "local"  # the ``kind`` of the in-memory ``slicelm`` config section (removed when saved)
MLP_ROLES = (("gate_proj", "up_proj"), "down_proj")  # a Llama-style MLP (shared experts, Qwen-MoE dense layers)
# What a --target-params budget is spent on here, by --schedule, in the order the steps run in each layer;
# a schedule not named here spends it on MLP channels only (the same width in every layer).
LOCAL_STEPS: dict[str, tuple[str, ...]] = {"heads": ("heads", "mlp"), "layers": ("layers", "mlp")}
# Whole layers a ``layers`` candidate removes: 1/16, 1/8, 1/4 of them (at least one, always fewer than all).
# Which layers is measured (slicelm.allocate.local); ``--schedule layers`` takes the first share.
LAYER_REMOVAL_SHARES = (16, 8, 4)


# --------------------------------------------------------------------------------------------------
# Which runs are served here
# --------------------------------------------------------------------------------------------------
def keeps_stream(config: SliceConfig) -> bool:
    """The run removes nothing from the residual stream (explicitly, or by an MLP-only schedule)."""
    if config.target_params is None:
        return config.sparsity == 0.0
    return config.schedule in ("mlp", "mlp-global", "layers")


def serves_locally(layout: Layout, config: SliceConfig) -> bool:
    """True when the run is the structure-local steps only; refuses an explicit stream sparsity on a
    model without the rotation (one line, saying why).

    Served here: every run on a model whose rotation is refused (a budget there spends MLP channels
    only), and MLP-only runs on mixtures of experts (experts are pruned per expert) and on
    LayerNorm families (a stock LayerNorm cannot hold a fused stream; a stream that stays whole
    needs no shortcuts, so the stock architecture is written whatever ``--layout`` says).
    """
    if layout.rotation is not None:
        if config.target_params is None and config.sparsity > 0:
            raise SlicelmError(rotation_refusal(layout))
        return True
    if layout.experts is not None and config.target_params is not None and config.schedule == "auto":
        # Experts lose channels only here (not beside the rotation): auto measures the local candidates and
        # the rotation's uniform plan side by side (slicelm.allocate.local), then runs the one it chose.
        return True
    if not keeps_stream(config):
        return False
    if "layers" in local_steps(config):  # whole layers go from the stock architecture on every family
        return True
    removes_mlp = config.target_params is not None or config.mlp_sparsity > 0
    # Experts only when channels go (at zero removal the rotation path is exact too); a plain LayerNorm
    # model always (the rotation path cannot write one).
    return (layout.experts is not None and removes_mlp) or (
        layout.norm == "layer" and (removes_mlp or config.stream.one_basis)
    )


# --------------------------------------------------------------------------------------------------
# Widths: one per kind of MLP (the stock config's fields)
# --------------------------------------------------------------------------------------------------
def _has(root: nn.Module, path: str | None) -> bool:
    if path is None:
        return False
    try:
        get_module(root, path)
    except AttributeError:
        return False
    return True


def width_fields(model: nn.Module, layout: Layout) -> dict[str, int]:
    """Config field -> current width, for every kind of MLP the model has (dense, experts, shared)."""
    fields: dict[str, int] = {}
    for layer in get_module(model, layout.layers):
        for unit in _units(layer, layout):
            fields.setdefault(unit.field, unit.width)
    return fields


def local_steps(config: SliceConfig) -> tuple[str, ...]:
    """The structure-local steps a run takes (``mlp`` for explicit widths and most schedules)."""
    if config.target_params is None:
        return ("mlp",)
    return LOCAL_STEPS.get(config.schedule, ("mlp",))


def head_fields(geometry: HeadGeometry) -> dict[str, int]:
    """The stock config's head fields for ``geometry`` (``head_dim`` explicit: configs derive it from
    ``hidden_size / num_attention_heads`` otherwise)."""
    return {
        "num_attention_heads": geometry.heads,
        "num_key_value_heads": geometry.kv_heads,
        "head_dim": geometry.head_dim,
    }


def plan_heads(model: nn.Module, layout: Layout) -> tuple[HeadGeometry, HeadGeometry, str | None]:
    """(the heads now, the heads kept, why a milder removal was not taken) of ``--schedule heads``.

    The executor's mildest uniform removal: one query head fewer per KV group, else one KV group
    fewer, in every layer (a stock config holds one head count). Where the stock config class refuses
    that count (Gemma 2/3 want ``hidden_size`` a multiple of ``num_attention_heads`` even with an
    explicit ``head_dim``), the next mildest it accepts, fewer query heads per group first. Refuses in
    one line a family whose head removal would not leave the kept heads as they are.
    """
    layers = get_module(model, layout.layers)
    for layer in layers:
        reason = head_refusal(layer, layout)
        if reason is not None:
            raise SlicelmError(f"--schedule heads: {reason}; use --schedule mlp")
    geometries = {head_geometry(layer, layout) for layer in layers}
    if len(geometries) != 1:
        raise SlicelmError(f"--schedule heads: the layers of this {layout.model_type} model differ in their heads")
    (now,) = geometries
    levels = [(k, q) for k in range(now.kv_heads, 0, -1) for q in range(now.q_per_kv, 0, -1)][1:]
    levels.sort(key=lambda level: (-level[0] * level[1], level[0] != now.kv_heads))  # fewest heads removed first
    refused: str | None = None
    for kv_heads, q_per_kv in levels:
        kept = HeadGeometry(kv_heads, q_per_kv, now.head_dim)
        reason = config_refusal(model.config, head_fields(kept))
        if reason is None:
            return now, kept, refused
        refused = refused or f"{kept.heads} query heads, {kept.kv_heads} KV: {reason}"
    if not levels:
        raise SlicelmError(f"--schedule heads: this {layout.model_type} model has one attention head per layer")
    raise SlicelmError(f"--schedule heads: the stock config accepts no fewer heads ({refused})")


def _scaled(widths: dict[str, int], sparsity: float, round_to: int) -> dict[str, int]:
    return {f: (mlp_width(w, sparsity, round_to) or w) for f, w in widths.items()}


def layer_counts(num_layers: int) -> list[int]:
    """How many whole layers the ``layers`` candidates remove (:data:`LAYER_REMOVAL_SHARES`), mildest first."""
    counts = {max(1, round(num_layers / share)) for share in LAYER_REMOVAL_SHARES}
    return sorted(k for k in counts if k < num_layers)


def stock_count(model_config: Any, widths: dict[str, int], drop: Sequence[int] = ()) -> int:
    """Parameters of the stock model with these config fields (MLP widths, head counts), without the
    decoder layers ``drop``, built on the meta device with every expert."""

    new = copy.deepcopy(model_config)
    for name, value in widths.items():
        setattr(new, name, value)
    if drop:
        drop_config_layers(new, drop)
    if hasattr(new, SLICELM_KEY):
        delattr(new, SLICELM_KEY)
    return sum(p.numel() for p in meta_model(new).parameters())


@dataclass
class LocalPlan:
    widths: dict[str, int]  # config field -> new width
    original: dict[str, int]  # config field -> width before
    planning: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    heads: HeadGeometry | None = None  # the heads every layer keeps (None: heads untouched)
    drop: tuple[int, ...] = ()  # decoder layers removed whole (their indices before removal)

    @property
    def fields(self) -> dict[str, int]:
        """Every config field the run sets: MLP widths, and head counts when heads go."""
        return self.widths | (head_fields(self.heads) if self.heads is not None else {})

    @property
    def prunes(self) -> bool:
        """Something inside the kept layers changes (their MLP widths or heads): a calibration walk."""
        return self.widths != self.original or self.heads is not None


def plan_local(
    model: nn.Module, layout: Layout, config: SliceConfig, params_before: int, drop: Sequence[int] = ()
) -> LocalPlan:
    """The MLP widths of a structure-local run: ``mlp_sparsity`` of every kind of MLP, or for a budget
    the smallest uniform sparsity (in ``round_to`` steps of the largest MLP kind) that meets it, after
    the heads that ``--schedule heads`` removes (:func:`plan_heads`) or the whole layers ``drop``
    (``--schedule layers``; chosen by measurement in :mod:`slicelm.allocate.local`), all counted exactly."""
    original = width_fields(model, layout)
    warnings: list[str] = []
    if layout.note is not None:
        warnings.append(layout.note)
    if config.basis != "pca":
        warnings.append(f"--basis {config.basis} applies to the rotation; this run leaves the stream untouched")
    if config.target_params is None:
        return LocalPlan(_scaled(original, config.mlp_sparsity, config.round_to), original, {}, warnings)
    steps = local_steps(config)
    drop = tuple(sorted(int(i) for i in drop))
    if "layers" in steps:
        check_layers_droppable(model, layout, drop)
    elif drop:
        raise SlicelmError(f"--schedule {config.schedule} removes no whole layers; use --schedule layers")
    heads, fixed, now = None, {}, None
    if "heads" in steps:
        now, heads, refused = plan_heads(model, layout)
        fixed = head_fields(heads)
        if refused is not None:
            warnings.append(
                f"--schedule heads: stock {type(model.config).__name__} refuses a milder removal ({refused}): "
                f"every layer keeps {heads.heads} query heads of {now.heads} ({heads.kv_heads} KV of {now.kv_heads})"
            )
    structure = (
        _heads_words(now, heads) if heads is not None else _layers_words(drop, len(get_module(model, layout.layers)))
    )
    if layout.rotation is not None:
        spent = "MLP channels only" if structure is None else f"{structure} and MLP channels"
        warnings.append(
            f"{layout.model_type} has no rotation ({layout.rotation.split(',')[0]}): the budget is spent on {spent}"
        )
    elif config.schedule == "mlp-global":
        warnings.append("schedule mlp-global: a stock config holds one MLP width, so every layer keeps the same one")
    target = int(config.target_params * params_before)
    main = max(original, key=original.get)
    # Main widths one round_to step apart, down to where the narrowest kind of MLP keeps one step.
    floor = max(config.round_to / w for w in original.values())
    steps_down = [
        w for w in range(original[main] - config.round_to, 0, -config.round_to) if w / original[main] >= floor
    ]
    options = [_scaled(original, 1.0 - w / original[main], config.round_to) for w in steps_down]
    if structure is not None:  # the heads or layers alone may meet the budget
        options.insert(0, dict(original))
    counts: dict[int, int] = {}

    def count(index: int) -> int:
        if index not in counts:
            counts[index] = stock_count(model.config, options[index] | fixed, drop)
        return counts[index]

    if not options or count(len(options) - 1) > target:
        what = "pruning MLP channels" if structure is None else f"{structure} and pruning MLP channels"
        raise SlicelmError(
            f"--target-params {config.target_params} ({target:,} parameters) cannot be met by {what} "
            f"of this {layout.model_type} model (its embeddings, attention and norms stay); raise it"
        )
    low, high = 0, len(options) - 1  # the first option whose count meets the target (counts fall with it)
    while low < high:
        mid = (low + high) // 2
        if count(mid) <= target:
            high = mid
        else:
            low = mid + 1
    widths = options[low]
    planned = count(low)
    planning = {
        "target_params": config.target_params,
        "target_count": target,
        "planned_count": planned,
        "planned_ratio": planned / params_before,
        "schedule": config.schedule,
        "stream_width": model.config.hidden_size,
        "predicted_cost": None,
        "widths": widths,
    }
    if heads is not None:
        planning["heads"] = {"kv_heads": heads.kv_heads, "q_per_kv": heads.q_per_kv, "head_dim": heads.head_dim}
    if drop:
        planning["dropped_layers"] = list(drop)
    shortfall = (target - planned) / max(target, 1)
    if shortfall > 0.01 and structure is not None and low == 0:
        closer = "--schedule mlp" if heads is not None else "fewer layers or --schedule mlp"
        planning["note"] = (
            f"the plan has {planned:,} parameters, {shortfall:.1%} below the target: {structure} "
            f"alone removes more than the budget asks; use {closer} to land closer"
        )
    elif shortfall > 0.01:
        planning["note"] = (
            f"the plan has {planned:,} parameters, {shortfall:.1%} below the target: MLP widths move in steps of "
            f"--round-to {config.round_to}; lower it to land closer"
        )
    return LocalPlan(widths, original, planning, warnings, heads, drop)


def _layers_words(drop: tuple[int, ...], num_layers: int) -> str | None:
    if not drop:
        return None
    which = ", ".join(str(i) for i in drop)
    return f"{len(drop)} of {num_layers} whole layers removed ({which})"


def check_layers_droppable(model: nn.Module, layout: Layout, drop: Sequence[int]) -> None:
    """Refuse in one line whole-layer removal where the stock config cannot describe the rest.

    The stock config with fewer ``num_hidden_layers`` (and its per-layer lists trimmed) rebuilds every
    layer alike, by its new index: that is the same model only when all layers have the same
    parameters' shapes (Qwen-MoE's dense ``mlp_only_layers`` do not) and the one-basis stream has no
    shortcut matrices. Layers must be given (``--schedule layers`` measures which).
    """
    layers = get_module(model, layout.layers)
    if len(layers) < 2:
        raise SlicelmError("--schedule layers: this model has one decoder layer, none to remove; use --schedule mlp")
    if not drop:
        raise SlicelmError("--schedule layers needs the layers to remove (measured by slicelm.allocate.local)")
    if not set(drop) <= set(range(len(layers))) or len(set(drop)) >= len(layers):
        raise SlicelmError(f"cannot remove layers {sorted(drop)} of a {len(layers)}-layer model (keep at least one)")
    shapes = {tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()) for layer in layers}
    if len(shapes) != 1:
        raise SlicelmError(
            f"--schedule layers: the layers of this {layout.model_type} model differ in their weights, so a stock "
            "config with fewer layers would rebuild them differently; use --schedule mlp"
        )


def _heads_words(now: HeadGeometry, kept: HeadGeometry) -> str:
    counts = f"({now.heads} -> {kept.heads} query heads, {now.kv_heads} -> {kept.kv_heads} KV, o_proj refit)"
    if kept.kv_heads == now.kv_heads:
        fewer = now.q_per_kv - kept.q_per_kv
        what = "one query head" if fewer == 1 else f"{fewer} query heads"
        return f"{what} fewer per KV group in every layer {counts}"
    fewer = now.kv_heads - kept.kv_heads
    return f"{'one KV group' if fewer == 1 else f'{fewer} KV groups'} fewer in every layer {counts}"


def check_local_config(model_config: Any, config: SliceConfig) -> bool:
    """Config-only checks of a structure-local run (nothing loaded); False if the run is not one.

    Refuses in one line: an unrecognised family (naming the missing role), a stream sparsity
    without the rotation, widths rounded to nothing, a budget MLP channels cannot meet, widths the
    stock config class refuses.
    """

    model = meta_model(copy.deepcopy(model_config))
    layout = resolve(model)
    if not serves_locally(layout, config):
        return False
    before = count_parameters(model)
    counts = layer_counts(model_config.num_hidden_layers)  # which layers go is measured; their count is not
    if "layers" in local_steps(config):  # the fewest the schedule removes (a one-layer model is refused)
        plan = plan_local(model, layout, config, before, tuple(range(counts[0] if counts else 1)))
    else:
        try:
            plan = plan_local(model, layout, config, before)
        except SlicelmError:
            if config.schedule != "auto":
                raise
            # auto also scores the most layers removed and, on a mixture of experts that rotates, the
            # rotation's uniform plan: the budget is refused only if they fail too (the last refusal says why)
            plan = None
            if counts:
                layers = replace(config, schedule="layers")
                try:
                    plan = plan_local(model, layout, layers, before, tuple(range(counts[-1])))
                except SlicelmError as error:
                    refusal = error
            if plan is None:
                if layout.rotation is not None:
                    raise refusal from None
                check_against_config(model_config, replace(config, schedule="uniform"))
                return True
    stock_config(model_config, plan.fields)
    return True


def stock_config(model_config: Any, widths: dict[str, int]) -> Any:
    """The stock config with the pruned widths and head counts (checked by the config class, as at save
    and load)."""
    new, reason = _stock_config(model_config, widths)
    if reason is not None:
        raise SlicelmError(f"stock {type(model_config).__name__} refuses {widths}: {reason}")
    return new


def config_refusal(model_config: Any, fields: dict[str, int]) -> str | None:
    """Why the stock config class refuses these fields, in its own words (None: it accepts them)."""
    return _stock_config(model_config, fields)[1]


def _stock_config(model_config: Any, fields: dict[str, int]) -> tuple[Any, str | None]:
    new = copy.deepcopy(model_config)
    for name, value in fields.items():
        setattr(new, name, value)
    for key in (SLICELM_KEY, "auto_map"):
        if hasattr(new, key):
            delattr(new, key)
    validate = getattr(new, "validate", None)
    if validate is not None:
        try:
            validate()
        except Exception as error:  # noqa: BLE001 - any refusal by the config class is the user's answer
            return new, str(error).strip().splitlines()[-1].strip()
    return new, None


# --------------------------------------------------------------------------------------------------
# Units: the MLPs of one layer whose channels are pruned together
# --------------------------------------------------------------------------------------------------
@dataclass
class _Unit:
    """One kind of MLP in one layer: a dense MLP (readers, writer) or a block of fused experts."""

    name: str  # "mlp" | "experts" | "shared_expert"
    field: str  # the config field holding its width
    width: int  # intermediate channels now
    readers: list[nn.Module] = field(default_factory=list)
    writer: nn.Module | None = None
    chunks: int = 1
    experts: nn.Module | None = None


def _units(layer: nn.Module, layout: Layout) -> list[_Unit]:
    if layout.experts is not None and _has(layer, layout.experts):
        experts = get_module(layer, layout.experts)
        units = [_Unit("experts", layout.expert_field, experts.down_proj.shape[-1], experts=experts)]
        if layout.shared_expert is not None and _has(layer, layout.shared_expert):
            shared = get_module(layer, layout.shared_expert)
            readers = [get_module(shared, p) for p in MLP_ROLES[0]]
            writer = get_module(shared, MLP_ROLES[1])
            units.append(_Unit("shared_expert", layout.shared_field, _channels(writer), readers, writer))
        return units
    if layout.experts is not None:  # a dense layer of a MoE model (Qwen-MoE's mlp_only_layers)
        mlp = get_module(layer, layout.mlp if isinstance(layout.mlp, str) else layout.mlp[0])
        readers = [get_module(mlp, p) for p in MLP_ROLES[0]]
        writer = get_module(mlp, MLP_ROLES[1])
        return [_Unit("mlp", layout.intermediate_field, _channels(writer), readers, writer)]
    readers = [get_module(layer, p) for p in layout.mlp_inputs]
    writer = get_module(layer, layout.mlp_outputs[0])
    chunks = layout.mlp_chunks or 1
    return [_Unit("mlp", layout.intermediate_field, _channels(writer), readers, writer, chunks)]


def _channels(writer: nn.Module) -> int:
    return stream_weight(writer, "writer").shape[-2]


def expert_activations(experts: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert ``expert``'s intermediate activations ``act(x G^T) * (x U^T)`` (N, I), float32.

    x: (N, D). ``gate_up_proj[e]`` (2I, D) holds the gate rows, then the up rows (transformers 5.x).
    """
    gate_up = experts.gate_up_proj[expert].to(torch.float32)  # (2I, D)
    gate, up = (x.to(torch.float32) @ gate_up.T).chunk(2, dim=-1)  # (N, I) each
    return experts.act_fn(gate) * up


class _Collector:
    """Hooks that accumulate every unit's covariance over one layer's calibration batches."""

    def __init__(self, layer: nn.Module, layout: Layout, units: list[_Unit], device: torch.device) -> None:
        self.units, self.mask = units, None
        self.acc = {}
        self.tokens: dict[str, list[int] | int] = {}
        self.handles = []
        self.gate = None  # (N, 1) the shared expert's gate on the current batch
        for unit in units:
            if unit.experts is not None:
                count = unit.experts.gate_up_proj.shape[0]
                self.acc[unit.name] = [CovarianceAccumulator(unit.width, device) for _ in range(count)]
                self.tokens[unit.name] = [0] * count
                hook = unit.experts.register_forward_pre_hook(self._experts_hook(unit), with_kwargs=True)
            else:
                self.acc[unit.name] = CovarianceAccumulator(unit.width, device)
                self.tokens[unit.name] = 0
                hook = unit.writer.register_forward_pre_hook(self._dense_hook(unit))
            self.handles.append(hook)
        if any(u.name == "shared_expert" for u in units):
            # The block calls its shared expert before its gate: the gate is computed from the block's input.
            block = get_module(layer, layout.mlp if isinstance(layout.mlp, str) else layout.mlp[0])
            gate = get_module(layer, layout.shared_expert_gate)
            self.handles.append(block.register_forward_pre_hook(self._gate_hook(gate)))

    def _flat_mask(self, rows: int) -> torch.Tensor:
        mask = self.mask.reshape(-1)
        if mask.numel() != rows:
            raise RuntimeError(f"expected {mask.numel()} token rows, got {rows}")
        return mask

    def _gate_hook(self, gate: nn.Module):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()  # (B, T, D)
            self.gate = torch.sigmoid(gate(x).to(torch.float32)).reshape(-1, 1)  # (N, 1)

        return hook

    def _dense_hook(self, unit: _Unit):
        def hook(_module: nn.Module, args: tuple) -> None:
            h = args[0].detach()  # (B, T, I) or (N, I)
            rows = h.reshape(-1, h.shape[-1]).to(torch.float32)
            mask = self._flat_mask(rows.shape[0])
            if unit.name == "shared_expert":
                if self.gate is None:
                    raise RuntimeError("the shared expert ran before its gate")
                rows = rows * self.gate.to(rows.device)
            self.acc[unit.name].add(rows[mask.to(rows.device)])
            self.tokens[unit.name] += int(mask.sum())

        return hook

    def _experts_hook(self, unit: _Unit):
        names = ("hidden_states", "top_k_index", "top_k_weights")

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            named = dict(zip(names, args, strict=False)) | kwargs
            x, index, weights = (named[n].detach() for n in names)  # (N, D), (N, k), (N, k)
            mask = self._flat_mask(x.shape[0]).to(x.device)
            for expert in range(len(self.acc[unit.name])):
                routed = (index == expert) & mask[:, None]  # (N, k): token t sent to this expert in slot s
                tokens, slots = torch.nonzero(routed, as_tuple=True)
                if tokens.numel() == 0:
                    continue
                h = expert_activations(module, x[tokens], expert)  # (n, I)
                h = h * weights[tokens, slots].to(torch.float32)[:, None]
                self.acc[unit.name][expert].add(h)
                self.tokens[unit.name][expert] += int(tokens.numel())

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# --------------------------------------------------------------------------------------------------
# Pruning one unit
# --------------------------------------------------------------------------------------------------
def _obs(weight: torch.Tensor, acc: CovarianceAccumulator, keep: int, where: str):
    """(kept channels, refit rows (k, D), output error, output energy) for writer rows ``weight`` (I, D)."""
    cov = acc.covariance()
    if not bool(torch.isfinite(cov).all()):
        raise SlicelmError(f"the intermediate activations of {where} hold non-finite values on the calibration data")
    result = obs_prune(weight, cov, keep)
    energy = torch.einsum("id,ij,jd->", weight.double(), cov, weight.double()).item()
    return result.keep, result.weight, reconstruction_error(weight, cov, result.keep, result.weight), energy


def weight_norm_channels(gate_up: torch.Tensor, down_rows: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` channels with the largest ``|g_j| |u_j| |d_j|`` (sorted indices): a data-free choice.

    gate_up: (2I, D) an expert's reader rows (gate, then up); down_rows: (I, D) its writer rows.
    Channel j's output is ``act(g_j x) (u_j x) d_j``, bounded by those norms for the usual activations.
    """
    width = down_rows.shape[0]
    norms = gate_up.to(torch.float64).norm(dim=-1)  # (2I,)
    score = norms[:width] * norms[width:] * down_rows.to(torch.float64).norm(dim=-1)
    return torch.topk(score, keep).indices.sort().values


def _prune_experts(unit: _Unit, collector: _Collector, keep: int, where: str, notes: list[str]) -> dict:
    experts = unit.experts
    gate_up, down = experts.gate_up_proj, experts.down_proj  # (E, 2I, D), (E, D, I)
    width = unit.width
    need = REFIT_TOKENS_PER_CHANNEL * width
    new_gate_up = gate_up.new_empty(gate_up.shape[0], 2 * keep, gate_up.shape[-1])
    new_down = down.new_empty(down.shape[0], down.shape[1], keep)
    error = energy = 0.0
    fallback = []
    counts = collector.tokens[unit.name]
    for expert, acc in enumerate(collector.acc[unit.name]):
        rows = down[expert].T  # (I, D): the writer, stream axis last
        if counts[expert] < need:  # too few routed tokens to refit on: weight norms, no refit
            kept = weight_norm_channels(gate_up[expert], rows, keep)
            new_rows = rows.index_select(0, kept)
            fallback.append(expert)
        else:
            kept, new_rows, err, en = _obs(rows, acc, keep, f"{where} expert {expert}")
            error, energy = error + err, energy + en
        kept = kept.to(gate_up.device)
        new_gate_up[expert] = gate_up[expert].index_select(0, torch.cat([kept, kept + width]))
        new_down[expert] = new_rows.T.to(down.dtype)
    experts.gate_up_proj.data = new_gate_up.contiguous()
    experts.down_proj.data = new_down.contiguous()
    if isinstance(getattr(experts, "intermediate_dim", None), int):
        experts.intermediate_dim = keep
    if fallback:
        notes.append(
            f"{where}: experts {fallback} had fewer than {need:,} routed calibration tokens "
            f"({REFIT_TOKENS_PER_CHANNEL} per channel; they had {[counts[e] for e in fallback]}): their channels "
            "were chosen by weight norms, "
            "without a refit"
        )
    return {"tokens": list(counts), "fallback": fallback, "error": error, "energy": energy}


def _prune_dense(unit: _Unit, collector: _Collector, keep: int, where: str) -> dict:
    weight = stream_weight(unit.writer, "writer")  # (I, D)
    kept, rows, error, energy = _obs(weight, collector.acc[unit.name], keep, where)
    keep_mlp_channels(unit.readers, unit.writer, unit.chunks, kept, rows)
    return {"tokens": collector.tokens[unit.name], "error": error, "energy": energy}


# --------------------------------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised from the final norm's hook: the calibration pass needs nothing after the layers."""


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture_all_layer_inputs(
    model: nn.Module,
    layout: Layout,
    samples: Sequence[torch.Tensor],
    batch_size: int,
    pad_id: int,
    store: ActivationStore,
) -> tuple[list[Batch], list[list[dict[str, Any]]]]:
    """One dense forward per batch: layer 0's input (into ``store["x", i]``) and what the model passes
    to *every* layer (masks and position embeddings differ per layer type: sliding windows, NoPE...).

    Returns (batches, kwargs[layer][batch]).
    """
    layers = get_module(model, layout.layers)
    device = get_module(model, layout.embeddings[0]).weight.device
    per_layer: list[list[dict[str, Any]]] = [[] for _ in layers]
    caught: dict[str, Any] = {}

    def layer_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, named = split_layer_call(module, args, kwargs)
            if index == 0:
                caught["hidden"] = hidden.detach()
            per_layer[index].append(named)

        return hook

    def stop(_module: nn.Module, _args: tuple) -> None:
        raise _Stop

    handles = [layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    final = get_module(model, layout.final_norm)
    if isinstance(final, nn.Module):  # post-LN OPT has none: the head then runs too
        handles.append(final.register_forward_pre_hook(stop))
    batches: list[Batch] = []
    try:
        for ids, mask in pad_batches(samples, batch_size, pad_id):
            try:
                model(input_ids=ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
            except _Stop:
                pass
            store[("x", len(batches))] = caught["hidden"]
            batches.append(Batch(mask, per_layer[0][-1]))
    finally:
        for handle in handles:
            handle.remove()
    return batches, per_layer


@torch.no_grad()
def prune_layer_heads(
    layer: nn.Module,
    layout: Layout,
    heads: HeadGeometry,
    batches: list[Batch],
    kwargs: list[dict[str, Any]],
    store: ActivationStore,
) -> float:
    """Keep ``heads`` in one layer, chosen on o_proj's input moment over the whole layer's call on its
    real inputs (no sliced block needed); o_proj refit. Returns the refit's relative output error."""
    device = next(layer.parameters()).device

    def forward(i: int, x: torch.Tensor) -> None:
        layer(x, **kwargs[i])

    stats = head_statistics(layer, layout, batches, store, device, forward=forward)
    choice = choose_heads(stats, heads.kv_heads, heads.q_per_kv)
    apply_heads(layer, layout, choice)
    return choice.relative


@torch.no_grad()
def prune_layers(
    model: nn.Module,
    layout: Layout,
    widths: dict[str, int],
    batches: list[Batch],
    layer_kwargs: list[list[dict[str, Any]]],
    store: ActivationStore,
    progress: bool = False,
    heads: HeadGeometry | None = None,
) -> dict[str, Any]:
    """Prune every layer's MLP units to ``widths`` (config field -> channels), layer by layer, after
    keeping ``heads`` in its attention (None: heads untouched).

    Each layer sees the outputs of the already-pruned layers before it, and its MLPs the output of
    its own pruned attention. Returns per-layer details: routed token counts, fallbacks, relative
    refit errors (``heads``: o_proj's, by layer), and notes.
    """
    layers = get_module(model, layout.layers)
    device = next(model.parameters()).device
    details: dict[str, Any] = {"layers": {}, "heads": {}, "notes": []}
    for index, layer in enumerate(tqdm(layers, desc="prune layers", disable=not progress)):
        if heads is not None and head_geometry(layer, layout) != heads:
            details["heads"][f"layer{index}"] = prune_layer_heads(
                layer, layout, heads, batches, layer_kwargs[index], store
            )
        units = [u for u in _units(layer, layout) if widths.get(u.field, u.width) < u.width]
        record: dict[str, Any] = {}
        if units:
            collector = _Collector(layer, layout, units, device)
            try:
                for i, batch in enumerate(batches):
                    collector.mask = batch.mask.to(device)
                    collector.gate = None
                    layer(store[("x", i)].to(device), **layer_kwargs[index][i])
            finally:
                collector.remove()
            for unit in units:
                where = f"layer {index} {unit.name.replace('_', ' ')}"
                keep = widths[unit.field]
                if unit.experts is not None:
                    result = _prune_experts(unit, collector, keep, where, details["notes"])
                else:
                    result = _prune_dense(unit, collector, keep, where)
                result["relative_error"] = result.pop("error") / max(result.pop("energy"), 1e-30)
                record[unit.name] = result
        details["layers"][f"layer{index}"] = record
        for i in range(len(batches)):
            store[("x", i)] = _first(layer(store[("x", i)].to(device), **layer_kwargs[index][i]))
    return details


@torch.no_grad()
def slice_locally(
    model: nn.Module,
    layout: Layout,
    calibration: Sequence[torch.Tensor],
    config: SliceConfig,
    *,
    pad_token_id: int | None = None,
    progress: bool = True,
    access: WeightAccess | None = None,
    store: ActivationStore | None = None,
    device: torch.device | str | None = None,
    drop: Sequence[int] = (),
) -> SliceReport:
    """Prune MLP channels of ``model`` in place (structure-local steps; the stream is untouched).

    drop: whole decoder layers to remove first (``--schedule layers``; exact, the residual passes),
    so the kept layers are pruned on the signals of the model without them.

    The model stays an instance of its stock class with smaller MLP widths in its config (and fewer
    layers); it is marked as compressed (slicing it again is refused) and :func:`slicelm.save_sliced`
    writes it as a stock folder.
    """
    if access is not None and type(access) is not WeightAccess:
        raise SlicelmError("pruning MLP channels without the rotation runs in memory; drop --stream / --max-memory")
    home = next(p.device for p in model.parameters())
    if device is not None and torch.device(device) != home:
        model.to(device)
    store = store if store is not None else ActivationStore()
    memory = PeakMemory()
    start = time.perf_counter()
    params_before = count_parameters(model)
    plan = plan_local(model, layout, config, params_before, drop)
    stock_config(model.config, plan.fields)  # refused before any weight changes
    if plan.drop:
        drop_layers(model, layout, plan.drop)
    pad_id = pad_token_id if pad_token_id is not None else (model.config.pad_token_id or 0)
    if isinstance(pad_id, (list, tuple)):
        pad_id = pad_id[0]
    timings: dict[str, float] = {}
    details: dict[str, Any] = {"layers": {}, "heads": {}, "notes": []}
    tokens = 0
    if plan.prunes:
        batches, layer_kwargs = capture_all_layer_inputs(
            model, layout, calibration, config.batch_size, int(pad_id), store
        )
        timings["embed"] = time.perf_counter() - start
        tokens = sum(int(b.mask.sum()) for b in batches)
        dense = [w for f, w in plan.original.items() if f != layout.expert_field or layout.experts is None]
        if dense and tokens < REFIT_TOKENS_PER_CHANNEL * max(dense):
            plan.warnings.append(
                f"calibration has {tokens:,} tokens for {max(dense):,}-channel MLPs: the refit of pruned MLPs is "
                f"poorly determined below ~{REFIT_TOKENS_PER_CHANNEL * max(dense):,}; give more --calib-samples "
                "or a longer --calib-seqlen"
            )
        t_layers = time.perf_counter()
        details = prune_layers(model, layout, plan.widths, batches, layer_kwargs, store, progress, plan.heads)
        timings["layers"] = time.perf_counter() - t_layers
        for i in range(len(batches)):
            del store[("x", i)]
    for name, value in plan.fields.items():  # the stock config of the pruned model
        setattr(model.config, name, value)
    if device is not None and torch.device(device) != home:
        model.to(home)
    hidden = model.config.hidden_size
    changed = {f for f, w in plan.widths.items() if w != plan.original[f]}
    per_layer = []
    for layer in get_module(model, layout.layers):
        first = _units(layer, layout)[0]  # the layer's main MLP (experts, or its dense MLP)
        mlp = first.width if first.field in changed else None
        kv_heads, q_per_kv = (plan.heads.kv_heads, plan.heads.q_per_kv) if plan.heads is not None else (None, None)
        per_layer.append(LayerWidths(None if layout.parallel else hidden, hidden, mlp, kv_heads, q_per_kv))
    widths_plan = SlicingPlan(hidden, hidden, tuple(per_layer))
    plan_dict = widths_plan.to_dict() | {"mlp_widths": plan.widths}
    if plan.drop:
        plan_dict["dropped_layers"] = list(plan.drop)
    info = {"version": __version__, "kind": KIND, "layout": layout.to_dict(), "plan": plan_dict}
    setattr(model.config, SLICELM_KEY, info)
    model._slicelm_model = True  # an instance flag: slicing it again is refused, save_sliced writes it stock
    timings["total"] = time.perf_counter() - start
    memory.sample()
    mlp_error = {
        name: max((unit["relative_error"] for unit in record.values()), default=0.0)
        for name, record in details["layers"].items()
        if record
    }
    return SliceReport(
        params_before=params_before,
        params_after=count_parameters(model),
        plan=plan_dict,
        explained_variance={"stream (untouched)": 1.0},
        calibration={
            "samples": len(calibration),
            "tokens": int(sum(len(s) for s in calibration)),
            "max_seqlen": int(max(len(s) for s in calibration)),
            "batch_size": config.batch_size,
            "routed": {
                name: {u: r["tokens"] for u, r in rec.items()} for name, rec in details["layers"].items() if rec
            },
        },
        seconds=timings,
        peak_memory=memory.as_dict(),
        layout="stock",
        planning=plan.planning,  # empty for explicit widths (the CLI summary reads a budget from it)
        mlp_error=mlp_error,
        head_error=details["heads"],
        warnings=plan.warnings + details["notes"],
    )
