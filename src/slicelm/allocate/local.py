"""The measured choice of the structure-local steps (families without the rotation, ``--schedule layers``).

Without the rotation a budget can go to three structure-local removals: MLP channels (every layer
alike: a stock config holds one width), attention heads (every layer alike) and whole decoder layers
(a stock config with fewer ``num_hidden_layers``). Which to use is measured, as
:mod:`slicelm.allocate.measured` does for the rotation:

1. **Split the calibration samples** (:func:`~slicelm.allocate.measured.split_calibration`): held-out
   windows for scoring, the rest for the candidates' refits.
2. **Layer sensitivity**: for each layer alone, the KL divergence of the model's next-token
   distribution from the dense one on the held-out windows when that layer is skipped (its residual
   passes; every other layer dense). The least sensitive layers are the ones removed.
3. **Candidates at the same budget** (``--schedule auto``), each run by
   :func:`slicelm.steps.local.slice_locally` on a copy of the model (its refits see the signals of the
   already-compressed layers) and scored by the same KL: the uniform MLP plan; the mildest uniform head
   removal with MLPs (where the family's attention allows it); and the least sensitive 1/16, 1/8 and
   1/4 of the layers removed (:data:`~slicelm.steps.local.LAYER_REMOVAL_SHARES`), the rest of the budget
   from every MLP. They are compared at equal size: a candidate whose structure alone leaves more than
   :data:`BUDGET_TOLERANCE` fewer parameters than the uniform MLP plan is not run (the report says
   why). The lowest KL wins; the uniform MLP plan is always scored, so the choice never scores worse
   than it. ``--schedule layers`` takes the 1/16 share without scoring (the step alone).
4. **Mixtures of experts with the rotation** (Mixtral, Qwen3-MoE): their experts lose channels only here,
   so ``auto`` is measured here too, and the rotation's uniform plan (SliceGPT at the budget, planned and
   executed as ``--schedule uniform`` is) is one more scored candidate, ``uniform-stream``. Its
   combination with MLP channels is not a candidate: experts cannot lose channels beside the rotation.
   When it wins, :func:`slicelm.slicing.slice_model` runs it on the rotation's path.

Nothing here is tuned to a model: the layers come from measurements on the calibration data; the
shares are the candidates tried, reported with every plan.
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

from slicelm.allocate.measured import kl_sum, split_calibration, window_log_probs
from slicelm.allocate.planning import plan as plan_rotation
from slicelm.config import SliceConfig
from slicelm.core.arch import Layout
from slicelm.core.resources import count_parameters
from slicelm.errors import SlicelmError
from slicelm.modeling.modeling_slicelm import get_module, split_layer_call
from slicelm.steps.executor import execute
from slicelm.steps.local import layer_counts, local_steps, plan_local, slice_locally

SEARCHED = ("auto", "layers")  # the schedules whose local plan is chosen here
STREAM = "uniform-stream"  # the rotation's uniform plan, a candidate for mixtures of experts that rotate
BUDGET_TOLERANCE = 0.01  # auto's candidates have at least 99% of the uniform MLP plan's parameters


@dataclass
class LocalChoice:
    """What the local run does: its config (the chosen schedule), the layers it removes, and the record.
    rotation: the choice is the rotation's uniform plan (:data:`STREAM`), run on the rotation's path."""

    config: SliceConfig
    drop: tuple[int, ...] = ()
    planning: dict[str, Any] = field(default_factory=dict)
    rotation: bool = False

    def record(self, report: Any) -> Any:
        """``report`` (a :class:`~slicelm.steps.executor.SliceReport`) with this choice's planning record and its
        one-line warning, when the choice was measured."""
        if self.planning:
            report.planning.update(self.planning)
            report.warnings.append(choice_words(report.planning))
        return report


def needs_choice(config: SliceConfig) -> bool:
    return config.target_params is not None and config.schedule in SEARCHED


class HeldOutKL:
    """KL(dense || model) per held-out token; the dense log-probabilities are computed once."""

    def __init__(self, model: nn.Module, held: Sequence[torch.Tensor]) -> None:
        self.held = list(held)
        self.tokens = sum(len(ids) for ids in self.held)
        self.reference = [window_log_probs(model, ids) for ids in self.held]  # (T, V) float32 each

    @torch.no_grad()
    def score(self, model: nn.Module) -> float:
        total = sum(kl_sum(self.reference[i], window_log_probs(model, ids)) for i, ids in enumerate(self.held))
        return total / max(self.tokens, 1)

    @torch.no_grad()
    def layer_skip_sensitivity(self, model: nn.Module, layout: Layout, progress: bool = False) -> list[float]:
        """For each decoder layer alone: the KL when it is skipped (its output is its input)."""
        result = []
        for layer in tqdm(get_module(model, layout.layers), desc="layer sensitivity", disable=not progress):
            handle = layer.register_forward_hook(_skip, with_kwargs=True)
            try:
                result.append(self.score(model))
            finally:
                handle.remove()
        return result


def _skip(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """A forward hook that makes a decoder layer return its own input hidden states."""
    hidden, _ = split_layer_call(module, args, kwargs)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def choose_local(
    model: nn.Module,
    layout: Layout,
    calibration: Sequence[torch.Tensor],
    config: SliceConfig,
    *,
    pad_token_id: int | None = None,
    progress: bool = True,
) -> LocalChoice:
    """The local plan for ``config``'s budget (``auto``: scored candidates; ``layers``: the step alone)."""
    start = time.perf_counter()
    held, search = split_calibration(calibration)
    num_layers = len(get_module(model, layout.layers))
    counts = layer_counts(num_layers)
    before = count_parameters(model)
    layers = replace(config, schedule="layers")
    # Which layers go is measured below, once some layer candidate is feasible (all layers weigh the same).
    candidates: dict[str, tuple[SliceConfig, tuple[int, ...]]] = {}
    if config.schedule == "layers":  # a one-layer model (no count) is refused by plan_local below
        k = counts[0] if counts else 1
        candidates[f"layers-{k}"] = (layers, tuple(range(k)))
    else:
        candidates["uniform-mlp"] = (replace(config, schedule="mlp"), ())
        candidates["heads"] = (replace(config, schedule="heads"), ())
        for k in counts:
            candidates[f"layers-{k}"] = (layers, tuple(range(k)))
    if config.schedule == "auto" and layout.rotation is None:
        candidates[STREAM] = (replace(config, schedule="uniform"), ())
    refused: dict[str, str] = {}
    reference: int | None = None  # the uniform MLP plan's count: the others are compared at it
    rotation = None  # the rotation's uniform plan, planned once and followed on its trial copy
    for name, (candidate, drop) in list(candidates.items()):
        try:  # a budget the candidate cannot meet, heads the family cannot lose: not a candidate
            if name == STREAM:
                rotation = plan_rotation(model, search, candidate, pad_token_id=pad_token_id, progress=False)
                planned = rotation.planning["planned_count"]
            else:
                planned = plan_local(model, layout, candidate, before, drop).planning["planned_count"]
        except SlicelmError as error:
            refused[name] = str(error)
            del candidates[name]
            continue
        reference = planned if reference is None else reference
        short = 1 - planned / reference
        if config.schedule == "auto" and short > BUDGET_TOLERANCE and name != STREAM:  # a uniform plan: always
            # compared at equal size: a candidate whose structure alone removes more is another model
            refused[name] = f"{short:.1%} fewer parameters than the uniform MLP plan (its structure alone removes more)"
            del candidates[name]
    if not candidates:
        raise SlicelmError(next(iter(refused.values())))
    needs_layers = any(drop for _, drop in candidates.values())
    measure = HeldOutKL(model, held) if needs_layers or len(candidates) > 1 else None
    sensitivity: list[float] = []
    if measure is not None and needs_layers:
        sensitivity = measure.layer_skip_sensitivity(model, layout, progress)
        order = sorted(range(num_layers), key=lambda i: sensitivity[i])
        for name, (candidate, drop) in candidates.items():
            if drop:
                candidates[name] = (candidate, tuple(sorted(order[: len(drop)])))
    scores: dict[str, float] = {}
    if measure is not None and len(candidates) > 1:
        for name, (candidate, drop) in tqdm(candidates.items(), desc="scoring candidates", disable=not progress):
            trial = copy.deepcopy(model)
            if name != STREAM:
                slice_locally(trial, layout, search, candidate, pad_token_id=pad_token_id, progress=False, drop=drop)
            else:  # the rotation's plan, as slice_model runs it
                batch = candidate.batch_size
                execute(trial, search, rotation, batch_size=batch, pad_token_id=pad_token_id, progress=False)
            scores[name] = measure.score(trial)
            del trial
    chosen = min(scores, key=scores.get) if scores else next(iter(candidates))
    chosen_config, drop = candidates[chosen]
    planning = {
        "schedule": config.schedule,
        "chosen": chosen,
        "steps": list(local_steps(chosen_config)),
        "candidates": scores,
        "refused_candidates": refused,
        "layer_sensitivity": sensitivity,
        "evaluations": len(scores),
        "search_seconds": time.perf_counter() - start,
        "score_tokens": measure.tokens if measure is not None else 0,
        "search_tokens": sum(len(ids) for ids in search),
    }
    return LocalChoice(chosen_config, drop, planning, rotation=chosen == STREAM)


def choice_words(planning: dict[str, Any]) -> str:
    """One line: what the measured choice took, against what."""
    scores = planning.get("candidates") or {}
    if not scores and planning["schedule"] == "layers":
        dropped = planning.get("dropped_layers", [])
        return f"--schedule layers removed layers {dropped}: the least sensitive alone, by KL on held-out windows"
    if not scores:
        others = "; ".join(f"{name}: {why}" for name, why in planning.get("refused_candidates", {}).items())
        return f"--schedule {planning['schedule']}: only {planning['chosen']} could be planned ({others})"
    ranked = ", ".join(f"{name} {kl:.3f}" for name, kl in sorted(scores.items(), key=lambda item: item[1]))
    return (
        f"--schedule {planning['schedule']} chose {planning['chosen']} by KL per held-out token ({ranked}; "
        f"{planning['score_tokens']:,} held-out calibration tokens)"
    )
