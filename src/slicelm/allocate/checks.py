"""Checks of a config or a plan against a model's config alone, before any weight is loaded."""

from __future__ import annotations

from typing import Any

from slicelm.allocate.context import PlanContext, context_from_config, explicit_plan, model_identity, stream_plan
from slicelm.allocate.counting import ParameterCounter
from slicelm.config import SliceConfig
from slicelm.core.arch import spec_for
from slicelm.core.plan import SlicingPlan
from slicelm.errors import SlicelmError
from slicelm.layouts.plain import check_plain, plain_config
from slicelm.steps.channels import check_prunable


def minimal_plan_params(ctx: PlanContext, config: SliceConfig) -> int:
    """Parameters of the smallest plan a schedule could choose (every width one ``round_to`` step)."""
    counter = ParameterCounter(ctx)
    step = config.round_to
    narrows_stream = config.schedule != "mlp" and config.schedule != "mlp-global"
    width = min(ctx.stream_step(step), ctx.hidden) if narrows_stream else ctx.hidden
    plan = stream_plan(ctx, width, config)
    if config.prunes_mlp and ctx.layout.mlp_chunks is not None:
        plan = plan.with_mlp([step] * ctx.num_layers)
    return counter.count(plan)


def check_against_config(model_config: Any, config: SliceConfig) -> None:
    """Everything the config alone can refuse, before any weight is loaded: the architecture, the
    layout, MLP pruning of a MoE, widths rounded to nothing, an impossible ``target_params``."""
    spec = spec_for(model_config)
    if config.stream.one_basis:
        check_plain(spec.norm, model_config.model_type)
    if config.prunes_mlp:
        check_prunable(spec.mlp_chunks, model_config.model_type)
    ctx, params = context_from_config(model_config, config)
    if config.target_params is None:
        plan = explicit_plan(ctx, config)  # widths rounded to nothing are refused here
        if ctx.stream.stock:
            plain_config(ctx.model_config, ctx.layout, plan)  # and widths the stock config refuses
        return
    smallest = minimal_plan_params(ctx, config)
    if config.target_params * params < smallest:
        raise SlicelmError(
            f"--target-params {config.target_params} ({int(config.target_params * params):,} parameters) is below "
            f"the smallest model schedule {config.schedule} can make ({smallest:,}, mostly the embeddings); raise it"
        )


def check_plan_against_config(model_config: Any, plan: SlicingPlan) -> None:
    """Refuse a plan (``--plan``) that does not fit this model, before any weight is loaded."""
    spec = spec_for(model_config)
    if plan.one_basis:
        check_plain(spec.norm, model_config.model_type)
    if plan.prunes_mlp:
        check_prunable(spec.mlp_chunks, model_config.model_type)
    config = SliceConfig(layout=plan.layout, untie_head=plan.tied is False)
    ctx, params = context_from_config(model_config, config)
    plan.check_model(model_identity(ctx.model_config, ctx.intermediate, params))
    if plan.tied and not ctx.tied:
        raise SlicelmError("the plan keeps the head tied to the embedding, but this model's head is not tied")
    expected = stream_plan(ctx, ctx.hidden, config)
    for i, (lw, want) in enumerate(zip(plan.layers, expected.layers, strict=True)):
        if (lw.mid is None) != (want.mid is None):
            shape = "parallel" if want.mid is None else "sequential"
            raise SlicelmError(f"the plan's layer {i} does not match this model's {shape} blocks")
    if plan.is_stock_shaped:
        plain_config(ctx.model_config, ctx.layout, plan)  # widths the stock config refuses
