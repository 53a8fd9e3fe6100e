"""The front door: ``slice_model(model, calibration, config)`` plans, then executes.

Deciding and doing are separate steps: :func:`slicelm.allocate.planning.plan` turns a
:class:`~slicelm.config.SliceConfig` into a :class:`~slicelm.core.plan.SlicingPlan` (every width, the
layout, the basis source, the tie), and :func:`slicelm.steps.executor.execute` follows a plan. This module
joins them for the one-call case, and takes a ready plan (``plan=``) to follow one made earlier,
by hand, or by another tool.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from slicelm.allocate.local import LocalChoice, choose_local, needs_choice
from slicelm.allocate.planning import gather_statistics, plan_with_statistics
from slicelm.config import BASES, LAYOUTS, SCHEDULES, Basis, LayoutKind, SliceConfig
from slicelm.core.arch import resolve
from slicelm.core.bases import needs_moments
from slicelm.core.calibration import WeightAccess
from slicelm.core.offload import ActivationStore
from slicelm.core.plan import SlicingPlan
from slicelm.core.statistics import ModelStatistics
from slicelm.steps.executor import REFIT_TOKENS_PER_CHANNEL, SliceReport, execute, merge_report, resolve_pad_id
from slicelm.steps.local import serves_locally, slice_locally

__all__ = [
    "BASES",
    "LAYOUTS",
    "REFIT_TOKENS_PER_CHANNEL",
    "SCHEDULES",
    "Basis",
    "LayoutKind",
    "SliceConfig",
    "SliceReport",
    "merge_report",
    "slice_model",
]


@torch.no_grad()
def slice_model(
    model: nn.Module,
    calibration: Sequence[torch.Tensor],
    config: SliceConfig | None = None,
    *,
    plan: SlicingPlan | None = None,
    statistics: ModelStatistics | None = None,
    pad_token_id: int | None = None,
    progress: bool = True,
    access: WeightAccess | None = None,
    store: ActivationStore | None = None,
    device: torch.device | str | None = None,
    statistics_cache: str | Path | None = None,
) -> SliceReport:
    """Slice ``model`` in place: plan with ``config`` (or follow ``plan``), then execute.

    calibration: 1-D token-id tensors. plan: a plan to follow instead of making one (``config``
    then only gives the calibration batch size). statistics: the unsliced model's statistics,
    reused by planning and by the executor. statistics_cache: a folder holding them; reused when it
    exists, written when a pass ran (the caller keys it by model and calibration settings).
    See :func:`slicelm.steps.executor.execute` for access, store and device.
    """
    config = config or SliceConfig()
    store = store if store is not None else ActivationStore()
    cache = Path(statistics_cache) if statistics_cache is not None else None
    if statistics is None and cache is not None and (cache / "statistics.json").is_file():
        statistics = ModelStatistics.load(cache, store)
    given = statistics
    layout = resolve(model)
    chosen: LocalChoice | None = None  # the local tier's measured choice, when it chose the rotation's plan
    if plan is None and serves_locally(layout, config):
        # Structure-local steps only (MLP channels, the stream untouched): families without the
        # rotation, mixtures of experts, unregistered families recognised by their roles.
        choice = LocalChoice(config)
        if needs_choice(config):  # auto and layers: measured on the calibration data
            choice = choose_local(model, layout, calibration, config, pad_token_id=pad_token_id, progress=progress)
        if not choice.rotation:
            report = slice_locally(
                model,
                layout,
                calibration,
                choice.config,
                pad_token_id=pad_token_id,
                progress=progress,
                access=access,
                store=store,
                device=device,
                drop=choice.drop,
            )
            return choice.record(report)
        chosen, config = choice, choice.config  # a mixture of experts' auto chose the rotation's uniform plan
    if plan is None:
        plan, statistics = plan_with_statistics(
            model,
            calibration,
            config,
            statistics=statistics,
            pad_token_id=pad_token_id,
            progress=progress,
            access=access,
            store=store,
            device=device,
        )
    if cache is not None and (statistics is None or not statistics.has_moments) and _needs_moments(plan):
        # A one-basis plan chooses its basis from the stream moments: gather them here to cache them.
        statistics = gather_statistics(
            model,
            resolve(model),
            calibration,
            config.batch_size,
            resolve_pad_id(model, pad_token_id),
            store,
            access or WeightAccess(),
            device=device,
            progress=progress,
        )
    if cache is not None and statistics is not None and statistics is not given:
        statistics.save(cache)
    report = execute(
        model,
        calibration,
        plan,
        batch_size=config.batch_size,
        pad_token_id=pad_token_id,
        progress=progress,
        access=access,
        store=store,
        device=device,
        statistics=statistics,
    )
    return chosen.record(report) if chosen is not None else report


def _needs_moments(plan: SlicingPlan) -> bool:
    return needs_moments(plan.basis, plan.one_basis, plan.keeps_stream)
