"""The planning context: what planning knows about the model being sliced, and the plans it gives from
sparsities alone.

Every width lives in a :class:`~slicelm.core.plan.SlicingPlan`. ``explicit_plan`` makes one from
sparsities (the same stream width at every point, the same MLP width in every layer); ``stream_plan``
is the plan of one stream width everywhere the layout allows (where the allocators start).
``context_from_config`` builds the context from a config alone, on the meta device, and
``model_identity`` is what a plan records of that model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

from slicelm.config import SliceConfig
from slicelm.core.arch import Layout, resolve
from slicelm.core.meta import meta_model
from slicelm.core.plan import STREAM_LAYOUTS, LayerWidths, SlicingPlan, StreamLayout, round_width, uniform_width
from slicelm.errors import SlicelmError
from slicelm.modeling.modeling_slicelm import get_module
from slicelm.steps.channels import intermediate_width


@dataclass(frozen=True)
class PlanContext:
    """What planning needs to know about the model being sliced."""

    layout: Layout
    model_config: Any  # the config as it will be sliced (a head untied by slicing is untied here)
    kind: str  # the stream layout's name (core.plan.STREAM_LAYOUTS)
    tied: bool  # the tie is kept: head and embedding share one matrix
    intermediate: int  # the MLP's intermediate width

    @property
    def stream(self) -> StreamLayout:
        return STREAM_LAYOUTS[self.kind]

    @property
    def hidden(self) -> int:
        return self.model_config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.model_config.num_hidden_layers

    def stream_step(self, round_to: int) -> int:
        """Stream widths are multiples of this: ``round_to``, and in the plain layout also of the
        number of attention heads — a stock config with another ``hidden_size`` is refused by
        transformers (``LlamaConfig`` validates it) and misread by runtimes that derive ``head_dim``
        from it."""
        if not self.stream.stock:
            return round_to
        return math.lcm(round_to, int(getattr(self.model_config, "num_attention_heads", None) or 1))


def mlp_width(intermediate: int, sparsity: float, round_to: int) -> int | None:
    """Intermediate width after removing ``sparsity`` of the channels (None: nothing removed)."""
    if sparsity == 0.0:
        return None
    # 1e-6: a width asked as 1 - w / I comes back as w - 1e-13, not w - 1 (widths are whole numbers)
    width = round_width(intermediate * (1.0 - sparsity) + 1e-6, round_to)
    if width == 0:
        raise SlicelmError(f"mlp-sparsity {sparsity} with --round-to {round_to} leaves no MLP channel; lower either")
    return width


def stream_plan(ctx: PlanContext, width: int, config: SliceConfig) -> SlicingPlan:
    """A plan with stream width ``width`` everywhere the layout allows, MLPs unchanged."""
    hidden, parallel = ctx.hidden, ctx.layout.parallel
    common = {"layout": ctx.kind, "tied": ctx.tied}
    if ctx.stream.one_basis:  # one basis, one width: the head reads it too
        layers = tuple(LayerWidths(None if parallel else width, width) for _ in range(ctx.num_layers))
        return SlicingPlan(hidden, width, layers, **common)
    slice_head = config.slice_head
    layers = [LayerWidths(None if parallel else width, width) for _ in range(ctx.num_layers)]
    if not slice_head:
        layers[-1] = LayerWidths(layers[-1].mid, hidden)
    plan = SlicingPlan(hidden, width, tuple(layers), **common)
    if ctx.tied and not slice_head:  # the head *is* the embedding: an unsliced head keeps it full width
        plan = replace(plan, embedding=hidden)
    if ctx.layout.mlp_same_width:  # MoE experts write as wide as they read: the MLP keeps its width
        plan = replace(plan, layers=tuple(LayerWidths(w.out, w.out) for w in plan.layers))
    if ctx.layout.ends_same_width:  # GPT-2 views its final stream with the embeddings' width
        plan = replace(plan, embedding=plan.head)
    return plan


def explicit_plan(ctx: PlanContext, config: SliceConfig) -> SlicingPlan:
    width = uniform_width(ctx.hidden, config.sparsity, ctx.stream_step(config.round_to))
    plan = stream_plan(ctx, width, config)
    mlp = mlp_width(ctx.intermediate, config.mlp_sparsity, config.round_to)
    return plan.with_mlp([mlp] * ctx.num_layers) if mlp is not None else plan


def context_from_config(model_config: Any, config: SliceConfig) -> tuple[PlanContext, int]:
    """(planning context, dense parameter count) from a config alone, on the meta device."""
    model_config = copy.deepcopy(model_config)
    model = meta_model(model_config)
    params = sum(p.numel() for p in model.parameters())
    layout = resolve(model)
    tied = bool(getattr(model_config, "tie_word_embeddings", False)) and not config.untie_head and layout.norm == "rms"
    if not tied:
        model_config.tie_word_embeddings = False
    width = intermediate_width(get_module(model, layout.layers)[0], layout)
    return PlanContext(layout, model_config, config.layout, tied, width), params


def model_identity(model_config: Any, intermediate: int, params: int) -> dict[str, Any]:
    """What a plan records of the model it was made for (checked when the plan is followed)."""
    return {
        "model_type": model_config.model_type,
        "num_hidden_layers": int(model_config.num_hidden_layers),
        "hidden_size": int(model_config.hidden_size),
        "intermediate_size": int(intermediate),
        "params": int(params),
    }
