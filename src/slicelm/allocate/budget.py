"""Budgets: the allocators that spend a budget, and the plan a config asks for.

A budget (``target_params``, counted by :mod:`slicelm.allocate.counting`) is spent by an allocator,
registered in :data:`ALLOCATORS` by schedule name (a new one is one :func:`register_allocator` call;
the executor never changes):

* ``uniform``: stream width only (SliceGPT);
* ``mlp``: MLP channels only, the same number in every layer;
* ``mlp-global``: MLP channels where a proxy says they cost least — each layer's structured-OBS
  removal curve divided by the energy of the stream the MLP writes into;
* ``proxy``: stream width too, by the share of stream energy a width drops (PCA tail) plus the
  MLP proxy (slicelm's former ``auto``);
* ``auto``: the measured allocator of :mod:`slicelm.allocate.measured` (candidates, these simple plans among
  them, scored end to end on held-out calibration windows).

The proxies are kept as named options: on SmolLM2 they lose badly to the uniform MLP plan
(docs/results/compression_smollm2.md).

:func:`explicit_or_budget` is the plan for a config: its explicit sparsities, or its budget spent by
its schedule's allocator, with how close the count landed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from slicelm.allocate.context import PlanContext, explicit_plan, stream_plan
from slicelm.allocate.counting import ParameterCounter
from slicelm.config import SliceConfig
from slicelm.core.plan import SlicingPlan
from slicelm.core.statistics import global_basis
from slicelm.errors import SlicelmError
from slicelm.steps.channels import check_prunable

TOLERANCE = 0.01  # --target-params lands within 1% below the requested count, or says why not


# --------------------------------------------------------------------------------------------------
# Spending a budget
# --------------------------------------------------------------------------------------------------
def stream_costs(stats: Any, ctx: PlanContext) -> dict[int, float]:
    """Stream width -> share of stream energy dropped, summed over every point (calibration data).

    slicegpt: each point keeps its own top-k PCA directions; plain: the global basis's top k.
    """
    hidden = ctx.hidden
    tails = torch.zeros(hidden + 1, dtype=torch.float64)  # tails[k]: energy share lost keeping k
    q = global_basis(stats)[1] if ctx.stream.one_basis else None
    for point in stats.points:
        moment = stats.moment(point).to(torch.float64)
        if q is None:
            energy = torch.linalg.eigvalsh((moment + moment.T) / 2).flip(0).clamp_min(0)
        else:
            energy = torch.einsum("ij,ik,kj->j", q, moment, q).clamp_min(0)
        share = energy / energy.sum().clamp_min(1e-30)
        kept = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(share, 0)])
        tails += 1.0 - kept
    return {k: tails[k].item() for k in range(hidden + 1)}


def mlp_relative_costs(stats: Any) -> dict[int, torch.Tensor]:
    """Layer -> cumulative MLP error after removing 1, 2, ... channels, over the energy of the
    stream the MLP writes into (the same currency as :func:`stream_costs`)."""
    return {layer: cost / max(stats.traces[stats.mlp_point[layer]], 1e-30) for layer, cost in stats.mlp_cost.items()}


def allocate_global(costs: dict[int, torch.Tensor], per_channel: list[int], need: int, step: int, floor: int):
    """Remove channels in blocks of ``step`` where the relative cost per parameter is lowest until
    ``need`` parameters are gone. Returns (channels removed per layer, total relative cost)."""
    removed = [0] * len(per_channel)
    saved = 0
    while saved < need:
        best, best_layer = None, None
        for layer, curve in costs.items():
            r = removed[layer]
            if r + step > curve.numel() + 1 - floor:
                continue
            before = curve[r - 1].item() if r > 0 else 0.0
            price = (curve[r + step - 1].item() - before) / (step * per_channel[layer])
            if best is None or price < best:
                best, best_layer = price, layer
        if best_layer is None:
            return None, float("inf")
        removed[best_layer] += step
        saved += step * per_channel[best_layer]
    total = sum(costs[layer][r - 1].item() for layer, r in enumerate(removed) if r > 0)
    return removed, total


# --------------------------------------------------------------------------------------------------
# Allocators: functions from a budget (and, for some, statistics or the model) to a plan
# --------------------------------------------------------------------------------------------------
@dataclass
class PlanRequest:
    """Everything an allocator may use. ``statistics`` is filled when the allocator says it needs
    them (``needs = "curves"``); ``model`` and ``calibration`` are there for allocators that measure
    candidates on the model itself (``needs = "model"``), which they must leave unchanged."""

    ctx: PlanContext
    config: SliceConfig
    params_before: int
    counter: ParameterCounter
    statistics: Any = None  # slicelm.core.statistics.ModelStatistics
    model: Any = None  # the dense model (nn.Module), for measured allocators
    calibration: Any = None  # 1-D token-id tensors
    pad_id: int = 0
    progress: bool = False
    device: Any = None

    @property
    def target(self) -> int:
        return int(self.config.target_params * self.params_before)


@dataclass(frozen=True)
class Allocator:
    """A registered way to spend a budget: ``fn(request) -> (plan, report)``.

    needs: what planning must gather first: ``""`` (nothing), ``"curves"`` (the statistics pass with
    MLP removal curves) or ``"model"`` (the dense model in memory and the calibration samples)."""

    fn: Callable[[PlanRequest], tuple[SlicingPlan, dict]]
    needs: str = ""
    prunes_mlp: bool = True
    help: str = ""


ALLOCATORS: dict[str, Allocator] = {}


def register_allocator(name: str, fn: Callable, needs: str = "", prunes_mlp: bool = True, help: str = "") -> None:
    """Add a schedule: ``register_allocator("mine", fn)``; ``fn(request)`` returns (plan, report)."""
    ALLOCATORS[name] = Allocator(fn, needs, prunes_mlp, help)


def get_allocator(name: str) -> Allocator:
    """The allocator registered as ``name`` (``auto`` registers itself with :mod:`slicelm.allocate.measured`,
    which :mod:`slicelm.allocate.planning` imports)."""
    if name not in ALLOCATORS:
        raise SlicelmError(f"no allocator is registered as schedule {name!r}; import slicelm.allocate.planning first")
    return ALLOCATORS[name]


def _stream_widths(ctx: PlanContext, step: int) -> list[int]:
    """Every stream width the layout allows, widest first (the full width included)."""
    stream_step = ctx.stream_step(step)
    widths = [ctx.hidden] + list(range(ctx.hidden // stream_step * stream_step, 0, -stream_step))
    return sorted({w for w in widths if w > 0}, reverse=True)


def _search(request: PlanRequest, schedule: str) -> tuple[SlicingPlan, dict]:
    """The proxy schedules: candidates over stream widths, MLP channels spent to meet the budget."""
    ctx, config, counter = request.ctx, request.config, request.counter
    stats, target, step = request.statistics, request.target, config.round_to
    if schedule != "uniform":
        check_prunable(ctx.layout.mlp_chunks, ctx.layout.model_type)
    widths = _stream_widths(ctx, step) if schedule in ("uniform", "proxy") else [ctx.hidden]
    stream_cost = stream_costs(stats, ctx) if schedule == "proxy" else None
    mlp_cost = mlp_relative_costs(stats) if schedule in ("mlp-global", "proxy") else None
    # proxy keeps a stock layout stock-shaped (one MLP width); mlp-global always spends per layer.
    uniform_mlp = schedule == "mlp" or (schedule == "proxy" and ctx.stream.stock)
    candidates = []
    for width in widths:
        plan = stream_plan(ctx, width, config)
        if schedule == "uniform":
            if counter.count(plan) <= target:
                candidates.append((plan, counter.count(plan), 0.0, width))
                break  # the widest stream that fits: the paper's plan
            continue
        candidate, cost = spend_mlp(request, plan, uniform_mlp, mlp_cost)
        if candidate is None:
            continue
        score = cost + (stream_cost[width] if stream_cost is not None else 0.0)
        candidates.append((candidate, counter.count(candidate), score, width))
    if not candidates:
        raise SlicelmError(
            f"--target-params {config.target_params} ({target:,} parameters) cannot be met with schedule "
            f"{schedule} on this model; raise it or use --schedule auto"
        )
    plan, count, score, width = min(candidates, key=lambda c: (c[2], -c[1])) if schedule == "proxy" else candidates[0]
    report = {"stream_width": width, "predicted_cost": score if schedule in ("proxy", "mlp-global") else None}
    if schedule == "proxy":
        report["candidates"] = [
            {"stream_width": w, "params": n, "cost": c} for _, n, c, w in sorted(candidates, key=lambda c: -c[3])
        ]
    return plan, report


def spend_mlp(
    request: PlanRequest, plan: SlicingPlan, uniform: bool, mlp_cost: dict | None
) -> tuple[SlicingPlan | None, float]:
    """``plan`` with MLP channels removed until it meets the budget, counted as it will be written.

    uniform: the same number of channels in every layer; else by the relative removal costs. The
    count is checked on the final structure (a per-layer plan may be written in another
    architecture than the stock one its per-channel prices came from) and more is removed while it
    is over.
    """
    ctx, counter, target, step = request.ctx, request.counter, request.target, request.config.round_to
    intermediate = ctx.intermediate
    total, per_channel = counter.stream_counts(plan)
    need = total - target
    for _ in range(8):
        if need <= 0:
            removed, cost = [0] * ctx.num_layers, 0.0
        elif uniform:
            per_layer = -(-need // sum(per_channel))  # channels per layer, rounded up to the step
            per_layer = -(-per_layer // step) * step
            if per_layer > intermediate - step:
                return None, float("inf")
            removed = [per_layer] * ctx.num_layers
            cost = sum(mlp_cost[i][per_layer - 1].item() for i in range(ctx.num_layers)) if mlp_cost else 0.0
        else:
            removed, cost = allocate_global(mlp_cost, per_channel, need, step, floor=step)
            if removed is None:
                return None, float("inf")
        candidate = plan.with_mlp([intermediate - r if r else None for r in removed])
        over = counter.count(candidate) - target
        if over <= 0:
            return candidate, cost
        need += over
    return None, float("inf")


register_allocator("uniform", lambda r: _search(r, "uniform"), prunes_mlp=False, help="stream width only (the paper)")
register_allocator("mlp", lambda r: _search(r, "mlp"), help="MLP channels, the same width in every layer")
register_allocator(
    "mlp-global",
    lambda r: _search(r, "mlp-global"),
    needs="curves",
    help="MLP channels per layer by OBS error over stream energy (a proxy; measured to lose)",
)
register_allocator(
    "proxy",
    lambda r: _search(r, "proxy"),
    needs="curves",
    help="stream width and MLP channels by PCA tail + OBS proxy (the old auto; measured to lose)",
)


def counter_for(request: PlanRequest, plan: SlicingPlan) -> ParameterCounter:
    """The counter for the layout ``plan`` is written in (an allocator may write a stream that stays
    whole in the plain layout whatever was asked: it needs no shortcuts)."""
    if plan.layout == request.ctx.kind:
        return request.counter
    return ParameterCounter(replace(request.ctx, kind=plan.layout))


def explicit_or_budget(request: PlanRequest) -> tuple[SlicingPlan, dict]:
    """The plan for ``request.config`` (explicit sparsities or a budget) and how it was chosen."""
    config, ctx = request.config, request.ctx
    if config.target_params is None:
        return explicit_plan(ctx, config), {}
    allocator = get_allocator(config.schedule)
    plan, details = allocator.fn(request)
    count = counter_for(request, plan).count(plan)
    target, step = request.target, config.round_to
    report = {
        "target_params": config.target_params,
        "target_count": target,
        "planned_count": count,
        "planned_ratio": count / request.params_before,
        "schedule": config.schedule,
    } | details
    shortfall = (target - count) / max(target, 1)
    if shortfall > TOLERANCE:
        steps = f"--round-to {step}; lower it to land closer"
        if config.schedule == "uniform" and ctx.stream_step(step) != step:
            heads = ctx.model_config.num_attention_heads
            steps = (
                f"{ctx.stream_step(step)} (--round-to {step} and the {heads} attention heads a stock config "
                "divides the width into); use a schedule that prunes MLP channels to land closer"
            )
        report["note"] = (
            f"the plan has {count:,} parameters, {shortfall:.1%} below the target: widths move in steps of {steps}"
        )
    return plan, report


def build_plan(
    ctx: PlanContext, config: SliceConfig, params_before: int, stats: Any = None
) -> tuple[SlicingPlan, dict]:
    """The plan for ``config`` from the context alone (allocators that need the model are refused:
    use :func:`slicelm.allocate.planning.plan`)."""
    if config.target_params is not None and get_allocator(config.schedule).needs == "model":
        raise SlicelmError(f"schedule {config.schedule} measures candidates on the model: use slicelm.plan()")
    request = PlanRequest(ctx, config, params_before, ParameterCounter(ctx), statistics=stats)
    return explicit_or_budget(request)
