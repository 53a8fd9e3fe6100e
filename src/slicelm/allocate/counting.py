"""Exact parameter counts of plans.

``target_params`` asks for a fraction of the dense model's **true** parameter count (shortcuts, a
kept or untied head, everything that is stored). Counts are exact: each candidate's structure is
built on the meta device, *in the architecture it will be written in*, and counted.
"""

from __future__ import annotations

from dataclasses import replace

from slicelm.allocate.context import PlanContext
from slicelm.core.meta import meta_model
from slicelm.core.plan import LayerWidths, SlicingPlan
from slicelm.layouts.checkpoint import choose_format
from slicelm.layouts.decilm import decilm_structure
from slicelm.layouts.plain import plain_config
from slicelm.modeling.modeling_slicelm import apply_sliced_structure, get_module, stream_bias, stream_weight


def written_format(ctx: PlanContext, plan: SlicingPlan) -> str:
    """The output format ``plan`` is written in, which is what is counted: ``stock``, ``decilm`` or
    ``slicelm`` (checkpoint.OUTPUT_FORMATS, as ``auto`` picks it)."""
    return choose_format(replace(plan, layout=ctx.kind), ctx.model_config).name


class ParameterCounter:
    """True parameter counts of plans, from structures built on the meta device (no memory)."""

    def __init__(self, ctx: PlanContext) -> None:
        self.ctx = ctx
        self._cache: dict[tuple, tuple[int, list[int]]] = {}

    def _structure(self, plan: SlicingPlan, written: str):
        ctx = self.ctx
        if written == "stock":  # the original architecture
            return meta_model(plain_config(ctx.model_config, ctx.layout, plan))
        model = meta_model(ctx.model_config)
        info = {"layout": ctx.layout.to_dict(), "plan": plan.to_dict(), "norm_eps": 1e-6}
        info |= ctx.stream.config_info()  # one basis, but widths a stock config cannot hold: no shortcuts
        if ctx.tied:
            info["tied_head"] = {"bias": False}
        apply_sliced_structure(model, info)  # new tensors follow the meta ones (not init_empty_weights: it unties)
        if written == "decilm":  # the folder save_decilm writes for it: per-layer blocks, zero-padded heads
            stream = replace(plan, layers=tuple(LayerWidths(lw.mid, lw.out) for lw in plan.layers))
            return decilm_structure(model, plain_config(ctx.model_config, ctx.layout, stream))
        return model

    def stream_counts(self, plan: SlicingPlan, written: str | None = None) -> tuple[int, list[int]]:
        """(parameters of ``plan`` with full MLPs, parameters per MLP channel of each layer).

        written: the output format to count in (default: the one ``plan`` itself is written in).
        """
        written = written_format(self.ctx, plan) if written is None else written
        shape = tuple((lw.mid, lw.out, lw.heads, lw.mlp_removed) for lw in plan.layers)
        key = (plan.embedding, shape, written)
        if key not in self._cache:
            # MLP channels are counted per channel below; heads and removed sub-blocks in the structure.
            model = self._structure(plan.with_mlp([0 if lw.mlp_removed else None for lw in plan.layers]), written)
            total = sum(p.numel() for p in model.parameters())
            per_channel = []
            layout = self.ctx.layout
            built = iter(get_module(model, layout.layers))  # a stock structure leaves removed layers out
            for lw in plan.layers:
                layer = None if written == "stock" and lw.removed else next(built)
                cost = 0
                if lw.mlp_removed:
                    per_channel.append(0)
                    continue
                for path in layout.mlp_inputs:
                    reader = get_module(layer, path)
                    bias = stream_bias(reader)
                    cost += stream_weight(reader, "reader").numel() + (bias.numel() if bias is not None else 0)
                cost += stream_weight(get_module(layer, layout.mlp_outputs[0]), "writer").numel()
                per_channel.append(cost // self.ctx.intermediate)
            self._cache[key] = (total, per_channel)
        return self._cache[key]

    def count(self, plan: SlicingPlan) -> int:
        total, per_channel = self.stream_counts(plan, written_format(self.ctx, plan))
        removed = [(self.ctx.intermediate - lw.mlp) if lw.mlp else 0 for lw in plan.layers]
        return total - sum(r * c for r, c in zip(removed, per_channel, strict=True))
