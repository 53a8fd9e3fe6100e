"""Deciding: every width of a slicing run, made into a :class:`~slicelm.core.plan.SlicingPlan`.

:func:`plan` is pure with respect to the model: it reads the model (shapes, the head's tie, and for
some allocators a read-only statistics pass or measurements on copies) and changes nothing, so its
plan can be saved, edited and followed later by :func:`slicelm.slicing.slice_model` (or
``slicelm slice --plan``). Statistics are an input: pass a :class:`~slicelm.core.statistics.ModelStatistics`
to reuse one pass across plans.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from slicelm.allocate.budget import ALLOCATORS, PlanRequest, explicit_or_budget
from slicelm.allocate.context import PlanContext, model_identity
from slicelm.allocate.counting import ParameterCounter
from slicelm.allocate.measured import measured_allocator  # noqa: F401  (registers the auto schedule)
from slicelm.config import SliceConfig
from slicelm.core.arch import Layout, resolve
from slicelm.core.calibration import WeightAccess, capture_layer_inputs
from slicelm.core.devices import DeviceAccess, move_buffers_outside
from slicelm.core.fuse import is_tied
from slicelm.core.offload import ActivationStore
from slicelm.core.plan import WHOLE_STREAM_LAYOUT, SlicingPlan
from slicelm.core.resources import count_parameters
from slicelm.core.statistics import ModelStatistics, collect_statistics
from slicelm.errors import SlicelmError
from slicelm.layouts.plain import check_plain
from slicelm.modeling.modeling_slicelm import get_module
from slicelm.steps.channels import check_prunable, intermediate_width
from slicelm.steps.executor import resolve_pad_id
from slicelm.steps.local import keeps_stream


def plan(
    model: nn.Module, calibration: Sequence[torch.Tensor], config: SliceConfig | None = None, **options
) -> SlicingPlan:
    """The plan ``config`` asks for on ``model`` (left unchanged). ``options``: those of
    :func:`plan_with_statistics` (statistics, pad_token_id, progress, access, store, device)."""
    return plan_with_statistics(model, calibration, config, **options)[0]


def plan_with_statistics(
    model: nn.Module,
    calibration: Sequence[torch.Tensor],
    config: SliceConfig | None = None,
    *,
    statistics: ModelStatistics | None = None,
    pad_token_id: int | None = None,
    progress: bool = True,
    access: WeightAccess | None = None,
    store: ActivationStore | None = None,
    device: torch.device | str | None = None,
) -> tuple[SlicingPlan, ModelStatistics | None]:
    """(plan, the statistics planning gathered or was given — None if it needed none)."""
    config = config or SliceConfig()
    access = access or WeightAccess()
    store = store if store is not None else ActivationStore()
    if getattr(model, "_slicelm_model", False):
        raise SlicelmError("this model is already sliced; load the original model to slice it again")
    layout = resolve(model)
    # A stream that stays whole needs no shortcuts: the stock architecture, whatever --layout says.
    whole_stream = not config.stream.one_basis and layout.norm == "rms" and keeps_stream(config)
    if whole_stream:
        config = replace(config, layout=WHOLE_STREAM_LAYOUT)
    if config.stream.one_basis:
        check_plain(layout.norm, layout.model_type)
    if config.prunes_mlp:
        check_prunable(layout.mlp_chunks, layout.model_type)
    ctx = planning_context(model, layout, config)
    params_before = count_parameters(model)
    allocator = ALLOCATORS[config.schedule] if config.target_params is not None else None
    stats = statistics
    if allocator is not None and allocator.needs == "curves" and (stats is None or not stats.mlp_cost):
        stats = gather_statistics(
            model,
            layout,
            calibration,
            config.batch_size,
            resolve_pad_id(model, pad_token_id),
            store,
            access,
            device=device,
            curves=True,
            progress=progress,
        )
    request = PlanRequest(
        ctx,
        config,
        params_before,
        ParameterCounter(ctx),
        statistics=stats,
        model=model,
        calibration=calibration,
        pad_id=resolve_pad_id(model, pad_token_id),
        progress=progress,
        device=device,
    )
    chosen, report = explicit_or_budget(request)
    if whole_stream:
        report = report | {"layout_note": "the stream stays whole: written in the stock architecture (no shortcuts)"}
    chosen = replace(
        chosen,
        basis=config.basis,
        seed=config.seed,
        model=model_identity(ctx.model_config, ctx.intermediate, params_before),
        planning=report,
    )
    return chosen, stats


def planning_context(model: nn.Module, layout: Layout, config: SliceConfig) -> PlanContext:
    """What planning knows of the model, without changing it: the config as it will be sliced (a
    head the executor will untie is untied here), the tie, the MLP width."""
    tied = not config.untie_head and layout.norm == "rms" and is_tied(model, layout)
    model_config = copy.deepcopy(model.config)
    if not tied:
        model_config.tie_word_embeddings = False
        text_config = getattr(model_config, "get_text_config", lambda: model_config)()
        text_config.tie_word_embeddings = False
    width = intermediate_width(get_module(model, layout.layers)[0], layout)
    return PlanContext(layout, model_config, config.layout, tied, width)


@torch.no_grad()
def gather_statistics(
    model: nn.Module,
    layout: Layout,
    calibration: Sequence[torch.Tensor],
    batch_size: int,
    pad_id: int,
    store: ActivationStore,
    access: WeightAccess,
    *,
    device: torch.device | str | None = None,
    curves: bool = False,
    progress: bool = True,
) -> ModelStatistics:
    """One read-only statistics pass over the unmodified model (stream moments, and MLP removal
    curves with ``curves``), describing the stream the executor will slice (centred for LayerNorm)."""
    home = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    moved = device is not None and torch.device(device) != home
    if moved:  # each layer visits the device, as in the executor
        access = DeviceAccess(access, torch.device(device), home)
        move_buffers_outside(model, layout.layers, torch.device(device))
    try:
        for path in layout.embeddings:
            access.load(model, path)
        where = get_module(model, layout.embeddings[0]).weight.device
        batches = capture_layer_inputs(model, layout, calibration, batch_size, pad_id, store, progress)
        stats = collect_statistics(
            model, layout, batches, store, access, device=where, mlp_curves=curves, progress=progress
        )
        for i in range(len(batches)):
            del store[("x", i)]
    finally:
        if moved:
            move_buffers_outside(model, layout.layers, home)
    if layout.norm == "layer":
        stats.center()
    return stats
