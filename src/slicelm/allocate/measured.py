"""The measured allocator (``--schedule auto``): score whole candidate plans end to end, keep the best.

A per-layer proxy (an MLP's refit error over the stream's energy) misjudges what a layer's channels
are worth to the model's output: on SmolLM2 it left the middle MLPs with 8 of 1,536 channels and
scored 169.8 perplexity where the uniform MLP plan scores 31.8. Here every decision is measured on
the model's own next-token distribution:

1. **Split the calibration samples**: the last ones (up to :data:`SCORE_TOKENS` tokens) are held out
   for scoring; refits during the search use the others (up to :data:`SEARCH_TOKENS` tokens).
2. **Layer sensitivity, measured**: for each layer alone, its MLP is pruned to the uniform-MLP width
   of this budget (structured OBS + refit on the dense inputs it receives) and the KL divergence of
   the model's next-token distribution from the dense one is measured on the held-out windows.
3. **Candidates at the same budget**, each followed by the executor on a copy of the model (so every
   refit sees the signals of the already-compressed layers before it) and scored by the same KL:
   the uniform MLP plan, the uniform stream plan (SliceGPT), their combination, and per-layer MLP
   widths shaped by the measured sensitivities (removal proportional to ``s_i ** -beta`` for each
   beta in :data:`SHAPES`; beta = 0 would be the uniform plan); the mildest uniform head removals
   (one query head fewer per KV group, one KV group fewer; o_proj refit) with the rest of the
   budget from every MLP; and the attention sub-blocks of the least sensitive layers removed
   (their sensitivity measured like the MLPs': one layer at a time, KL on the held-out windows),
   the rest from every MLP.
   With ``layout="plain"`` (the stock architecture, one MLP width) only the stock-shaped
   candidates (uniform widths and heads) are scored: a layout the user asked for is honoured.
4. A second round combines what won: when a structural candidate (heads, sub-blocks) and a
   per-layer MLP allocation each beat the uniform MLP plan, the best
   structural one is scored again with its MLPs allocated the best one's way.
5. The candidate with the lowest KL is the plan; the uniform plans are always among the scored
   candidates, so the choice never scores worse than they do.

Per-layer MLP widths from measured removal curves (each layer's KL also measured at the removals of
:data:`LEVELS`, channels spent where the summed KL grows least) were a candidate too; they lost to the
shaped widths and cost 45% of the search's evaluations, so they are the named option
``--schedule mlp-levels`` (:func:`levels_allocator`).

Nothing is tuned to a model: the widths come from measurements on the calibration data, and the
few constants below are search budgets (tokens, shapes tried), reported with every plan.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from slicelm.allocate.budget import ALLOCATORS, PlanRequest, counter_for, register_allocator, spend_mlp
from slicelm.allocate.context import stream_plan
from slicelm.allocate.counting import ParameterCounter
from slicelm.core.calibration import capture_layer_inputs
from slicelm.core.offload import ActivationStore
from slicelm.core.pca import CovarianceAccumulator
from slicelm.core.plan import WHOLE_STREAM_LAYOUT, SlicingPlan, round_width
from slicelm.errors import SlicelmError
from slicelm.modeling.modeling_slicelm import get_module, stream_weight
from slicelm.steps.blocks import remove_attention
from slicelm.steps.channels import obs_prune, select_channels
from slicelm.steps.executor import execute
from slicelm.steps.heads import head_geometry

SCORE_TOKENS = 2048  # held-out calibration tokens every candidate is scored on
SEARCH_TOKENS = 8192  # calibration tokens the candidates' refits use during the search
SHAPES = (0.5, 1.0, 2.0)  # exponents of the sensitivity-shaped MLP allocations tried
LEVELS = (0.5, 1.5)  # further MLP removals measured per layer, as multiples of the uniform plan's
ATTENTION_REMOVAL_SHARES = (16, 8, 4)  # attention sub-blocks removed: 1/16, 1/8, 1/4 of the layers

Scorer = Callable[[str, SlicingPlan], float]  # (candidate name, plan) -> score, lower is better


def measured_allocator(request: PlanRequest, scorer: Scorer | None = None) -> tuple[SlicingPlan, dict]:
    """Spend ``request``'s budget on the candidate with the lowest measured KL.

    scorer: replaces the measurement (tests use a deterministic one); the default executes each
    candidate on a copy of the model and measures KL(dense || candidate) on held-out windows.
    """
    start = time.perf_counter()
    model, calibration = request.model, request.calibration
    if model is None or calibration is None or any(p.device.type == "meta" for p in model.parameters()):
        return _fallback(request, "the measured allocator needs the model in memory (streaming)")
    held, search = split_calibration(calibration)
    if scorer is None:
        measure = KLScorer(model, held, search, request)
        scorer = measure.score
    else:
        measure = None
    candidates = simple_candidates(request)
    sensitivity: list[float] | None = None
    uniform_mlp = candidates.get("uniform-mlp")
    # --layout plain asks for the stock architecture, which holds one MLP width: only uniform candidates.
    shaped = uniform_mlp is not None and not request.ctx.stream.stock
    if shaped and measure is None:  # an injected scorer: a deterministic stand-in for the measurement
        sensitivity = [1.0 + i for i in range(request.ctx.num_layers)]
    elif shaped and _can_measure_layers(request) and uniform_mlp.layers[0].mlp is not None:
        sensitivity = measure.layer_sensitivity(uniform_mlp.layers[0].mlp)
    if sensitivity is not None and uniform_mlp.layers[0].mlp is not None:
        for beta in SHAPES:
            shaped = shaped_plan(request, uniform_mlp, sensitivity, beta)
            if shaped is not None and all(shaped.layers != c.layers for c in candidates.values()):
                candidates[f"mlp-shaped-{beta:g}"] = shaped
    candidates |= head_candidates(request)
    attention_sensitivity: list[float] | None = None
    if uniform_mlp is not None and not request.ctx.stream.stock:  # sub-block removal is not stock-shaped
        if measure is None:
            attention_sensitivity = [1.0 + ((i * 7) % 5) for i in range(request.ctx.num_layers)]
        elif isinstance(request.ctx.layout.attn, str):
            attention_sensitivity = measure.attention_sensitivity()
    if attention_sensitivity is not None:
        candidates |= attention_removal_candidates(request, attention_sensitivity)
    if not candidates:
        raise SlicelmError(
            f"--target-params {request.config.target_params} cannot be met on this model by any candidate plan; "
            "raise it"
        )
    scored = []
    for name, plan in tqdm(list(candidates.items()), desc="score candidates", disable=not request.progress):
        scored.append((scorer(name, plan), name, plan))
    if sensitivity is not None:  # second round: the best structural removal with the best MLP allocation
        allocations = {
            f"mlp-shaped-{beta:g}": (lambda base, b=beta: shaped_plan(request, base, sensitivity, b)) for beta in SHAPES
        }
        for name, plan in combined_candidates(scored, allocations).items():
            scored.append((scorer(name, plan), name, plan))
    best_score, best_name, best = min(scored, key=lambda s: s[0])  # ties keep the simpler, earlier plan
    report = {
        "chosen": best_name,
        "candidates": [
            {"name": name, "score": score, "params": counter_for(request, plan).count(plan)}
            for score, name, plan in scored
        ],
        "score": "KL(dense || candidate) per held-out token" if measure is not None else "injected scorer",
        "evaluations": len(scored)
        + sum(len(v) for v in (sensitivity, attention_sensitivity) if v is not None and measure is not None),
        "score_tokens": sum(len(s) for s in held),
        "search_tokens": sum(len(s) for s in search),
        "layer_sensitivity": sensitivity,
        "attention_sensitivity": attention_sensitivity,
        "search_seconds": time.perf_counter() - start,
        "stream_width": best.embedding if best.keeps_stream else min(lw.out for lw in best.layers),
    }
    return best, report


def _fallback(request: PlanRequest, why: str) -> tuple[SlicingPlan, dict]:
    plan, details = ALLOCATORS["mlp"].fn(request)
    return plan, details | {"chosen": "uniform-mlp", "note": f"{why}: planned the uniform MLP plan"}


def split_calibration(samples: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(held-out samples for scoring, samples for the search's refits), disjoint when there are two
    or more samples; each set is capped by its token budget (a long sample is cut, never dropped)."""
    samples = list(samples)
    if len(samples) == 1:  # nothing to hold out: score on what is refit (the report says so)
        return [samples[0][:SCORE_TOKENS]], [samples[0][:SEARCH_TOKENS]]
    held: list[torch.Tensor] = []
    tokens = 0
    for sample in reversed(samples[1:]):  # at least one sample is left for the refits
        if tokens >= SCORE_TOKENS:
            break
        held.append(sample[: SCORE_TOKENS - tokens])
        tokens += len(held[-1])
    rest = samples[: len(samples) - len(held)]
    search: list[torch.Tensor] = []
    tokens = 0
    for sample in rest:
        if tokens >= SEARCH_TOKENS:
            break
        search.append(sample[: SEARCH_TOKENS - tokens])
        tokens += len(search[-1])
    return held[::-1], search


def simple_candidates(request: PlanRequest) -> dict[str, SlicingPlan]:
    """The uniform plans at this budget: MLP channels only, stream only, and half of each."""
    out: dict[str, SlicingPlan] = {}
    ctx = request.ctx
    mlp_request = _mlp_only_request(request)
    if ctx.layout.mlp_chunks is not None:
        try:
            out["uniform-mlp"] = ALLOCATORS["mlp"].fn(mlp_request)[0]
        except SlicelmError:
            pass
    if _rotation_allowed(request):
        try:
            out["uniform-stream"] = ALLOCATORS["uniform"].fn(request)[0]
        except SlicelmError:
            pass
        combined = _combined(request)
        if combined is not None:
            out["stream+mlp"] = combined
    return out


def _rotation_allowed(request: PlanRequest) -> bool:
    return getattr(request.ctx.layout, "rotation", None) is None


def _mlp_only_request(request: PlanRequest) -> PlanRequest:
    """The request as planned for a stream that stays whole: one basis (the identity), no shortcuts,
    the stock architecture — wherever the family admits the plain layout."""
    if request.ctx.stream.one_basis or request.ctx.layout.norm != "rms":
        return request
    ctx = replace(request.ctx, kind=WHOLE_STREAM_LAYOUT)
    config = replace(request.config, layout=WHOLE_STREAM_LAYOUT)
    return replace(request, ctx=ctx, config=config, counter=ParameterCounter(ctx))


def _combined(request: PlanRequest) -> SlicingPlan | None:
    """Half of the parameters to remove from the stream, the rest from every MLP alike."""
    ctx, counter, config = request.ctx, request.counter, request.config
    if ctx.layout.mlp_chunks is None:
        return None
    dense = counter.count(stream_plan(ctx, ctx.hidden, config))
    halfway = dense - (dense - request.target) // 2
    step = ctx.stream_step(config.round_to)
    width = None
    for w in range(ctx.hidden // step * step, 0, -step):
        if counter.count(stream_plan(ctx, w, config)) <= halfway:
            width = w
            break
    if width is None or width == ctx.hidden:
        return None
    plan = stream_plan(ctx, width, config)
    total, per_channel = counter.stream_counts(plan)
    need = total - request.target
    if need <= 0:
        return plan
    per_layer = -(-need // sum(per_channel))
    per_layer = -(-per_layer // config.round_to) * config.round_to
    if per_layer > ctx.intermediate - config.round_to:
        return None
    candidate = plan.with_mlp([ctx.intermediate - per_layer] * ctx.num_layers)
    return candidate if counter.count(candidate) <= request.target else None


def shaped_plan(
    request: PlanRequest, uniform: SlicingPlan, sensitivity: Sequence[float], beta: float
) -> SlicingPlan | None:
    """``uniform`` (any plan; its heads and sub-blocks kept) with per-layer MLP widths at the budget,
    removal proportional to ``sensitivity ** -beta``.

    Channels removed per layer are ``min(I - step, lam * s_i ** -beta)`` rounded to the step, with
    ``lam`` found by bisection: the largest plan within the budget (counted as it is written).
    """
    s = torch.tensor([max(float(v), 0.0) for v in sensitivity], dtype=torch.float64)
    s = s.clamp_min(max(s.max().item(), 1e-30) * 1e-6)
    weights = s.pow(-beta)
    weights = (weights / weights.mean()).tolist()
    inter = request.ctx.intermediate
    return _largest_within_budget(
        request,
        uniform,
        lambda lam: _with_removed(request, uniform, [lam * w for w in weights]),
        float(inter) * max(weights) ** -1 * 4 + inter,
    )


def _with_removed(request: PlanRequest, base: SlicingPlan, removed: Sequence[float]) -> SlicingPlan:
    """``base`` with ``removed[i]`` MLP channels gone in layer i (on the step grid, at least one step
    kept; a removed MLP stays removed)."""
    inter, step = request.ctx.intermediate, request.config.round_to
    widths = []
    for r, lw in zip(removed, base.layers, strict=True):
        r = min(inter - step, round_width(r, step))
        widths.append(0 if lw.mlp_removed else inter - r if r > 0 else None)
    return base.with_mlp(widths)


def _largest_within_budget(
    request: PlanRequest, base: SlicingPlan, plan_at: Callable[[float], SlicingPlan], high: float
) -> SlicingPlan | None:
    """``plan_at(x)`` for the smallest ``x`` in [0, high] (by bisection) whose count as written meets
    the budget; None when even ``plan_at(high)`` does not (counts fall as ``x`` grows)."""
    counter = counter_for(request, base)
    if counter.count(plan_at(high)) > request.target:
        return None
    low = 0.0
    for _ in range(40):
        mid = (low + high) / 2
        if counter.count(plan_at(mid)) > request.target:
            low = mid
        else:
            high = mid
    return plan_at(high)


STRUCTURAL = ("heads-", "no-attn-")  # name prefixes of the candidates that remove heads or sub-blocks


def combined_candidates(
    scored: Sequence[tuple[float, str, SlicingPlan]],
    allocations: dict[str, Callable[[SlicingPlan], SlicingPlan | None]],
) -> dict[str, SlicingPlan]:
    """The second round of the search: the best-scored structural candidate (heads or attention
    sub-blocks removed, MLPs filled uniformly) with its MLPs allocated instead as the best-scored
    per-layer MLP allocation did (``allocations``: candidate name -> how it allocates on a base plan),
    when each of the two beat the uniform MLP plan on its own. Empty otherwise."""
    score = {name: value for value, name, _ in scored}
    plans = {name: plan for _, name, plan in scored}
    if "uniform-mlp" not in score:
        return {}
    baseline = score["uniform-mlp"]
    structural = [n for n in score if n.startswith(STRUCTURAL) and score[n] < baseline]
    allocated = [n for n in score if n in allocations and score[n] < baseline]
    if not structural or not allocated:
        return {}
    base = min(structural, key=score.get)
    allocation = min(allocated, key=score.get)
    plan = allocations[allocation](plans[base])
    if plan is None or any(plan.layers == p.layers for p in plans.values()):
        return {}
    return {f"{base}+{allocation.removeprefix('mlp-')}": plan}


def _level_widths(request: PlanRequest, removed: int) -> list[int]:
    """The MLP widths of :data:`LEVELS` (multiples of the uniform plan's ``removed`` channels), on the
    step grid and keeping at least one step."""
    inter, step = request.ctx.intermediate, request.config.round_to
    widths = []
    for level in LEVELS:
        width = inter - round_width(level * removed, step)
        if step <= width < inter and width != inter - removed and width not in widths:
            widths.append(width)
    return widths


def removal_curves(intermediate: int, levels: dict[int, Sequence[float]]) -> list[list[tuple[int, float]]]:
    """Per layer, the lower convex hull of (channels removed, measured KL) from (0, 0) through the
    measured widths: the marginal KL per channel grows along each curve. levels: width -> KL by layer."""
    layers = len(next(iter(levels.values())))
    curves = []
    for i in range(layers):
        points = sorted([(0, 0.0)] + [(intermediate - w, max(float(kl[i]), 0.0)) for w, kl in levels.items()])
        hull: list[tuple[int, float]] = []
        for point in points:  # monotone chain, lower hull
            while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) <= 0:
                hull.pop()
            hull.append(point)
        curves.append(hull)
    return curves


def _cross(o: tuple[int, float], a: tuple[int, float], b: tuple[int, float]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def levels_plan(
    request: PlanRequest, base: SlicingPlan, curves: Sequence[Sequence[tuple[int, float]]]
) -> SlicingPlan | None:
    """``base`` (its heads and sub-blocks kept) with per-layer MLP removals that minimise the summed
    measured KL at the budget: the segments of every layer's convex removal curve are taken in order
    of their KL per channel, the last one partly (on the step grid), up to the furthest measured
    removal. None when the budget needs more than the curves reach."""
    segments = []  # (KL per channel, layer, channels at its start, channels at its end)
    for layer, hull in enumerate(curves):
        for (r0, k0), (r1, k1) in zip(hull, hull[1:], strict=False):
            segments.append(((k1 - k0) / (r1 - r0), layer, r0, r1))
    segments.sort()

    def plan_at(taken: float) -> SlicingPlan:
        removed = [0.0] * len(curves)
        left = taken
        for _, layer, r0, r1 in segments:
            if left <= 0:
                break
            removed[layer] = r0 + min(r1 - r0, left)
            left -= r1 - r0
        return _with_removed(request, base, removed)

    return _largest_within_budget(request, base, plan_at, float(sum(r1 - r0 for _, _, r0, r1 in segments)))


def _mlp_filled(mlp_request: PlanRequest, base: SlicingPlan) -> SlicingPlan | None:
    """``base`` (its heads and sub-blocks as they are) with the rest of the budget taken from every
    kept MLP alike, counted as written; None if the budget cannot be met that way. mlp_request: the
    request as :func:`_mlp_only_request` plans it (one counter, its cache shared by every candidate)."""
    if base.layout != mlp_request.ctx.kind or mlp_request.ctx.layout.mlp_chunks is None:
        return None
    plan, _ = spend_mlp(mlp_request, base, uniform=True, mlp_cost=None)
    if plan is None:
        return None
    # A removed MLP stays removed (the uniform spend names a width for every layer).
    return plan.with_mlp([0 if b.mlp_removed else lw.mlp for b, lw in zip(base.layers, plan.layers, strict=True)])


def _whole_stream(mlp_request: PlanRequest) -> SlicingPlan:
    return stream_plan(mlp_request.ctx, mlp_request.ctx.hidden, mlp_request.config)


def head_levels(request: PlanRequest) -> list[tuple[int, int]]:
    """The mildest uniform head removals: one query head fewer per KV group, one KV group fewer.

    Empty where the family's attention is fused or its model is not in memory."""
    model, layout = request.model, request.ctx.layout
    try:
        geometry = head_geometry(get_module(model, layout.layers)[0], layout)
    except (SlicelmError, AttributeError, TypeError):
        return []
    levels = []
    if geometry.q_per_kv > 1:
        levels.append((geometry.kv_heads, geometry.q_per_kv - 1))
    if geometry.kv_heads > 1:
        levels.append((geometry.kv_heads - 1, geometry.q_per_kv))
    return levels


def head_candidates(request: PlanRequest) -> dict[str, SlicingPlan]:
    """Uniform head removal, the rest of the budget from every MLP alike (stock-shaped: any layout).

    The heads go on the inputs each layer receives, chosen by grouped OBS with an o_proj refit."""
    out: dict[str, SlicingPlan] = {}
    mlp_request = _mlp_only_request(request)
    base = _whole_stream(mlp_request)
    for kv_heads, q_per_kv in head_levels(request):
        plan = _mlp_filled(mlp_request, base.with_heads([(kv_heads, q_per_kv)] * len(base.layers)))
        if plan is not None:
            out[f"heads-{kv_heads}x{q_per_kv}+mlp"] = plan
    return out


def attention_removal_candidates(request: PlanRequest, sensitivity: Sequence[float]) -> dict[str, SlicingPlan]:
    """The attention sub-blocks of the n least sensitive layers removed, the rest from every MLP
    alike, for n of 1/16, 1/8 and 1/4 of the layers (rounded up; measured sensitivities)."""
    layers = len(sensitivity)
    order = sorted(range(layers), key=lambda i: sensitivity[i])
    mlp_request = _mlp_only_request(request)
    base = _whole_stream(mlp_request)
    out: dict[str, SlicingPlan] = {}
    for n in sorted({-(-layers // d) for d in ATTENTION_REMOVAL_SHARES}):
        gone = set(order[:n])
        plan = _mlp_filled(mlp_request, base.with_heads([(0, 0) if i in gone else None for i in range(layers)]))
        if plan is not None:
            out[f"no-attn-{n}+mlp"] = plan
    return out


@torch.no_grad()
def window_log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's next-token log-probabilities (T, V) on one window ``ids`` (T,), float32 on the CPU."""
    device = next(p.device for p in model.parameters())
    logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0]  # (T, V)
    return F.log_softmax(logits.float(), dim=-1).cpu()


def kl_sum(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Sum over a window's positions of KL(p || q), from log-probabilities (T, V) of each."""
    return (log_p.exp() * (log_p - log_q.float().cpu())).sum().item()


def _can_measure_layers(request: PlanRequest) -> bool:
    """Layer sensitivities need an MLP that is one submodule and channels that can be pruned."""
    layout = request.ctx.layout
    return isinstance(layout.mlp, str) and layout.mlp_chunks is not None


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------
class KLScorer:
    """KL divergence of candidates' next-token distributions from the dense model's, per held-out token.

    The dense model is never changed: candidates are followed on copies; layer sensitivities swap
    one pruned copy of a layer in at a time.
    """

    def __init__(self, model: nn.Module, held: list[torch.Tensor], search: list[torch.Tensor], request: PlanRequest):
        self.model, self.held, self.search, self.request = model, held, search, request
        self.batch_size = request.config.batch_size
        self.pad_id = request.pad_id
        # float32 (T, V) each: float16 would bias every KL by its rounding (2048 x 49k tokens: 0.4 GB)
        self.reference = [window_log_probs(model, ids) for ids in held]

    def _kl(self, log_q: torch.Tensor, index: int) -> float:
        return kl_sum(self.reference[index], log_q)

    @torch.no_grad()
    def score(self, name: str, plan: SlicingPlan) -> float:
        candidate = copy.deepcopy(self.model)
        execute(candidate, self.search, plan, batch_size=self.batch_size, pad_token_id=self.pad_id, progress=False)
        total = sum(self._kl(window_log_probs(candidate, ids), i) for i, ids in enumerate(self.held))
        del candidate
        return total / sum(len(ids) for ids in self.held)

    @torch.no_grad()
    def attention_sensitivity(self) -> list[float]:
        """For each layer alone: KL when its attention sub-block is removed (the residual passes)."""
        layout = self.request.ctx.layout

        def without_attention(layer: nn.Module) -> nn.Module:
            removed = copy.deepcopy(layer)
            remove_attention(removed, layout)
            return removed

        return self._one_layer_at_a_time(without_attention, "attention sensitivity")

    @torch.no_grad()
    def _one_layer_at_a_time(self, change: Callable[[nn.Module], nn.Module], desc: str) -> list[float]:
        """KL of the model with ``change(layer)`` in place of each layer in turn (dense elsewhere)."""
        model, layout = self.model, self.request.ctx.layout
        held_store = ActivationStore()
        held = capture_layer_inputs(model, layout, self.held, 1, self.pad_id, held_store, False)
        layers = get_module(model, layout.layers)
        tokens = sum(len(ids) for ids in self.held)
        result = []
        for index, layer in enumerate(tqdm(layers, desc=desc, disable=not self.request.progress)):
            changed = change(layer)
            result.append(self._held_kl(changed, index, held, held_store) / tokens)
            for i, b in enumerate(held):
                held_store[("x", i)] = _first(layer(held_store[("x", i)], **b.kwargs))
            del changed
        for i in range(len(held)):
            del held_store[("x", i)]
        return result

    def _held_kl(self, changed: nn.Module, index: int, held, held_store: ActivationStore) -> float:
        """Summed KL on the held-out windows with ``changed`` as layer ``index`` (its input: the
        dense signals in ``held_store``), the dense layers after it."""
        layers = get_module(self.model, self.request.ctx.layout.layers)
        total = 0.0
        for i, b in enumerate(held):
            x = _first(changed(held_store[("x", i)], **b.kwargs))
            for later in layers[index + 1 :]:
                x = _first(later(x, **b.kwargs))
            total += self._kl(self._head(x)[0], i)
        return total

    @torch.no_grad()
    def layer_sensitivity(self, width: int) -> list[float]:
        """For each layer alone: KL when its MLP keeps ``width`` channels (OBS + refit on the dense
        inputs it receives). One pass over the layers; the held-out signals run on from each layer."""
        model, layout = self.model, self.request.ctx.layout
        store, held_store = ActivationStore(), ActivationStore()
        search = capture_layer_inputs(model, layout, self.search, self.batch_size, self.pad_id, store, False)
        held = capture_layer_inputs(model, layout, self.held, 1, self.pad_id, held_store, False)
        layers = get_module(model, layout.layers)
        tokens = sum(len(ids) for ids in self.held)
        result = []
        for index, layer in enumerate(tqdm(layers, desc="layer sensitivity", disable=not self.request.progress)):
            # The MLP's input moments on the dense signals; the search signals move on to the next layer.
            writer = get_module(layer, layout.mlp_outputs[0])
            weight = stream_weight(writer, "writer")  # (I, D)
            acc = CovarianceAccumulator(weight.shape[-2], device=weight.device)
            caught: list[torch.Tensor] = []
            handle = writer.register_forward_pre_hook(lambda _m, args, seen=caught: seen.append(args[0]))
            try:
                for i, b in enumerate(search):
                    store[("x", i)] = _first(layer(store[("x", i)], **b.kwargs))
                    acc.add(caught.pop(), b.mask.to(weight.device))
            finally:
                handle.remove()
            pruned = copy.deepcopy(layer)
            if width < weight.shape[-2]:
                obs = obs_prune(weight, acc.covariance(), width)
                select_channels(pruned, layout, obs.keep, obs.weight)
            total = self._held_kl(pruned, index, held, held_store)
            for i, b in enumerate(held):
                held_store[("x", i)] = _first(layer(held_store[("x", i)], **b.kwargs))
            result.append(total / tokens)
            del pruned
        for batches, where in ((search, store), (held, held_store)):
            for i in range(len(batches)):
                del where[("x", i)]
        return result

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, T, V) from the last layer's output (B, T, D)."""
        layout = self.request.ctx.layout
        h = get_module(self.model, layout.final_norm)(x)
        logits = get_module(self.model, layout.head)(h)
        return F.log_softmax(logits.float(), dim=-1)


def _first(output):
    """A decoder layer's hidden states (some releases return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


register_allocator(
    "auto",
    measured_allocator,
    needs="model",
    help="the simple plans and per-layer allocations, scored end to end on held-out calibration windows",
)


def heads_allocator(request: PlanRequest) -> tuple[SlicingPlan, dict]:
    """``--schedule heads``: the head-removal step with the MLPs (one query head fewer per KV
    group, else one KV group fewer, in every layer; the rest of the budget from every MLP alike)."""
    candidates = head_candidates(request)
    if not candidates:
        raise SlicelmError(
            f"--schedule heads: the attention of {request.ctx.layout.model_type} cannot lose heads here (fused "
            "q/k/v projections, a single head, or no budget left for the MLPs); use --schedule mlp or auto"
        )
    name, plan = next(iter(candidates.items()))
    return plan, {"chosen": name}


def levels_allocator(request: PlanRequest) -> tuple[SlicingPlan, dict]:
    """``--schedule mlp-levels``: per-layer MLP widths along each layer's measured removal curve.

    Each layer's KL is measured alone at the uniform MLP plan's removal and at the multiples of it in
    :data:`LEVELS`; the channels go where the summed KL grows least (:func:`levels_plan`). It was one of
    ``auto``'s candidates; measured to lose to the sensitivity-shaped widths at 0.75x of SmolLM2 while
    costing 45% of that search's evaluations (docs/results/compression_smollm2.md), it is kept as a
    named option.
    """
    model, calibration = request.model, request.calibration
    if model is None or calibration is None or any(p.device.type == "meta" for p in model.parameters()):
        raise SlicelmError("--schedule mlp-levels measures layers on the model in memory; it cannot stream")
    if request.ctx.stream.stock or not _can_measure_layers(request):
        raise SlicelmError(
            "--schedule mlp-levels gives every layer its own MLP width, which needs an MLP that is one module and "
            "a layout that holds per-layer widths (not --layout plain); use --schedule mlp"
        )
    uniform = simple_candidates(request).get("uniform-mlp")
    if uniform is None or uniform.layers[0].mlp is None:
        raise SlicelmError("--schedule mlp-levels cannot meet this budget with the MLPs alone; use --schedule auto")
    held, search = split_calibration(calibration)
    measure = KLScorer(model, held, search, request)
    width = uniform.layers[0].mlp
    levels = {
        w: measure.layer_sensitivity(w) for w in (width, *_level_widths(request, request.ctx.intermediate - width))
    }
    curves = removal_curves(request.ctx.intermediate, levels)
    plan = levels_plan(request, uniform, curves)
    if plan is None:
        raise SlicelmError("--schedule mlp-levels: the measured curves do not reach this budget; use --schedule auto")
    details = {"chosen": "mlp-levels", "removal_curves": curves, "evaluations": len(levels) * request.ctx.num_layers}
    return plan, details


def attention_blocks_allocator(request: PlanRequest) -> tuple[SlicingPlan, dict]:
    """``--schedule attn-blocks``: the sub-block step with the MLPs (the attention of the least
    sensitive 1/16 of the layers removed, sensitivity measured as ``auto`` does; the rest from
    every MLP alike)."""
    model, calibration = request.model, request.calibration
    if model is None or calibration is None or any(p.device.type == "meta" for p in model.parameters()):
        raise SlicelmError("--schedule attn-blocks measures layers on the model in memory; it cannot stream")
    if not isinstance(request.ctx.layout.attn, str):
        raise SlicelmError(f"--schedule attn-blocks: {request.ctx.layout.model_type}'s attention is not one module")
    held, search = split_calibration(calibration)
    sensitivity = KLScorer(model, held, search, request).attention_sensitivity()
    candidates = attention_removal_candidates(request, sensitivity)
    if not candidates:
        raise SlicelmError("--schedule attn-blocks cannot meet this budget with the MLPs left; raise it")
    name, plan = next(iter(candidates.items()))
    return plan, {"chosen": name, "attention_sensitivity": sensitivity}


register_allocator(
    "heads",
    heads_allocator,
    needs="model",
    help="one attention head fewer per KV group in every layer (o_proj refit), the rest from every MLP",
)
register_allocator(
    "mlp-levels",
    levels_allocator,
    needs="model",
    help="per-layer MLP widths along each layer's measured KL removal curve (was an auto candidate; lost)",
)
register_allocator(
    "attn-blocks",
    attention_blocks_allocator,
    needs="model",
    help="the attention sub-blocks of the least sensitive 1/16 of the layers removed, the rest from every MLP",
)
