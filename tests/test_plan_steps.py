"""Heads and sub-blocks as plan entries: the executor follows them, the counter counts them, folders hold them.

A plan layer may give ``kv_heads``/``q_per_kv`` (attention heads kept; ``kv_heads=0`` removes the
attention sub-block) and ``mlp=0`` (the MLP sub-block removed). The executor applies them on the
inputs each layer really receives; the parameter counter counts exactly the structure that is
written; a saved folder reloads (remote code, or the stock class for uniform heads) with the
in-memory model's logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_model
from helpers import calibration, logits, padded_batch, relative_error

import slicelm
from slicelm.allocate.counting import ParameterCounter
from slicelm.allocate.planning import planning_context
from slicelm.config import SliceConfig
from slicelm.core.arch import resolve
from slicelm.core.plan import LayerWidths, SlicingPlan
from slicelm.errors import SlicelmError
from slicelm.layouts.checkpoint import save_sliced
from slicelm.modeling.modeling_slicelm import ZeroBranch
from slicelm.slicing import slice_model

# Families whose attention has separate q/k/v projections (tests/test_heads.py proves the step on
# each); the plan path is checked on one per head-norm/bias variant.
FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
RELOAD_TOL = 1e-5  # float32 save/load of the same tensors: bitwise in practice


def _base_plan(model, layout: str, sparsity: float = 0.0) -> SlicingPlan:
    config = SliceConfig(sparsity=sparsity, mlp_sparsity=0.25, layout=layout)
    return slicelm.plan(model, calibration(96), config, progress=False)


def _follow(model, plan: SlicingPlan):
    config = SliceConfig(layout=plan.layout, sparsity=0.25 if not plan.keeps_stream else 0.0)
    return slice_model(model, calibration(96), config, plan=plan, progress=False)


def _count(model, plan: SlicingPlan) -> int:
    config = SliceConfig(layout=plan.layout, sparsity=0.25 if not plan.keeps_stream else 0.0)
    return ParameterCounter(planning_context(model, resolve(model), config)).count(plan)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_full_head_counts_and_no_removal_equal_the_plan_without_them(model_type):
    """Exact when nothing is removed: naming every head changes nothing, bit for bit."""
    model = build_tiny_model(model_type, num_hidden_layers=2)
    twin = copy.deepcopy(model)
    plan = _base_plan(model, "plain")
    kv = model.config.num_key_value_heads
    full = plan.with_heads([(kv, model.config.num_attention_heads // kv)] * 2)
    _follow(model, full)
    _follow(twin, plan)
    a, b = model.state_dict(), twin.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layout", ["plain", "slicegpt"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_heads_and_removed_sub_blocks_follow_count_and_round_trip(model_type, layout, tmp_path):
    """Per-layer heads, a removed attention and a removed MLP: the counter equals the saved folder's
    parameters, and the folder reloads (remote code) with the in-memory logits."""
    model = build_tiny_model(model_type, num_hidden_layers=3)
    plan = _base_plan(model, layout, sparsity=0.25 if layout == "slicegpt" else 0.0)
    plan = plan.with_heads([(1, 2), (0, 0), (2, 1)]).with_mlp([48, 0, None])
    expected = _count(model, plan)
    report = _follow(model, plan)
    assert report.params_after == expected
    layer1 = model.model.layers[1]
    assert isinstance(layer1.self_attn, ZeroBranch) and isinstance(layer1.mlp, ZeroBranch)
    assert set(report.head_error) == {"layer0", "layer2"}
    ids, mask = padded_batch(96)
    out = logits(model, ids, mask)
    assert torch.isfinite(out).all()
    folder = save_sliced(model, tmp_path / "out")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    assert sum(p.numel() for p in again.parameters()) == expected
    assert relative_error(out, logits(again, ids, mask), mask) <= RELOAD_TOL
    # The plan travels with the folder and reads back as it was written. One basis and per-layer
    # widths: a DeciLM folder where the family fits one (tests/test_output_formats.py), else slicelm's.
    assert SlicingPlan.load(folder / "slicing_plan.json").layers == plan.layers
    deci = layout == "plain" and model_type in ("llama", "qwen2")  # not qwen3's q/k norms, mistral's window
    assert (type(again).__name__ == "DeciLMForCausalLM") == deci


def test_uniform_heads_in_the_plain_layout_write_the_stock_architecture(tmp_path):
    """The same heads kept in every layer: a stock config (fewer heads, explicit head_dim), no remote code."""
    model = build_tiny_model("llama", num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    plan = _base_plan(model, "plain").with_heads([(1, 2)] * 3)
    assert plan.is_stock_shaped
    expected = _count(model, plan)
    report = _follow(model, plan)
    ids, mask = padded_batch(96)
    out = logits(model, ids, mask)
    folder = save_sliced(model, tmp_path / "out")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # no trust_remote_code
    assert type(again).__module__.startswith("transformers.models.llama")
    assert (again.config.num_attention_heads, again.config.num_key_value_heads) == (2, 1)
    assert again.config.head_dim == 16
    assert sum(p.numel() for p in again.parameters()) == expected == report.params_after
    assert relative_error(out, logits(again, ids, mask), mask) <= RELOAD_TOL


def test_head_refit_beats_no_refit_through_the_plan():
    """The executor's head step refits o_proj: lower output error than keeping the rows as they are."""
    from slicelm.steps.heads import choose_heads, head_statistics

    model = build_tiny_model("llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    plan = _base_plan(model, "plain").with_heads([(1, 2), None])
    twin = copy.deepcopy(model)
    report = _follow(model, plan)
    # The same choice without refit, measured on the same statistics the executor used.
    from slicelm.core.calibration import capture_layer_inputs
    from slicelm.core.fuse import fuse_layer, prepare_ends
    from slicelm.core.offload import ActivationStore
    from slicelm.modeling.modeling_slicelm import block_roles

    layout = resolve(twin)
    fused = prepare_ends(twin, layout, keep_tie=True)
    store = ActivationStore()
    batches = capture_layer_inputs(twin, layout, calibration(96), 8, 0, store, False)
    layer = twin.model.layers[0]
    fuse_layer(layer, layout, twin.config.hidden_size, fused.eps)
    layer.slicelm_roles = block_roles(layout.to_dict()) | {"shortcuts": False}
    stats = head_statistics(layer, layout, batches, store, torch.device("cpu"))
    no_refit = choose_heads(stats, 1, 2, refit=False).relative
    assert report.head_error["layer0"] < no_refit


def test_impossible_head_plans_are_refused_in_one_line():
    model = build_tiny_model("llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    plan = _base_plan(model, "plain")
    with pytest.raises(SlicelmError, match="this model has 2 of 2"):
        _follow(copy.deepcopy(model), plan.with_heads([(3, 2), None]))
    with pytest.raises(SlicelmError, match="kv_heads and q_per_kv together"):
        SlicingPlan(64, 64, (LayerWidths(64, 64, None, 2, None),), layout="plain")
    fused = build_tiny_model("phi3", num_hidden_layers=2)
    with pytest.raises(SlicelmError, match="fused"):
        _follow(fused, _base_plan(fused, "plain").with_heads([(1, 2), None]))


def test_plan_with_heads_and_removals_round_trips_through_json():
    plan = SlicingPlan(
        64,
        64,
        (LayerWidths(64, 64, 48, 1, 2), LayerWidths(64, 64, 0, 0, 0), LayerWidths(64, 64)),
        layout="plain",
    )
    again = SlicingPlan.from_dict(plan.to_dict())
    assert again == plan
    assert again.prunes_heads and again.removes_blocks and not again.is_uniform
    assert again.layers[1].removed and again.removed_layers == [1]
    assert "kv_heads" not in plan.to_dict()["layers"][2]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_removed_whole_layers_write_the_stock_architecture_with_fewer_layers(model_type, tmp_path):
    """Both sub-blocks of a layer removed, the rest uniform: a stock config with fewer
    ``num_hidden_layers`` (and ``layer_types``), renumbered tensors, the same logits and tokens."""
    model = build_tiny_model(model_type, num_hidden_layers=4)
    plan = _base_plan(model, "plain").with_heads([None, (0, 0), None, None])
    plan = plan.with_mlp([lw.mlp if i != 1 else 0 for i, lw in enumerate(plan.layers)])
    assert plan.is_stock_shaped and plan.removed_layers == [1]
    expected = _count(model, plan)
    report = _follow(model, plan)
    ids, mask = padded_batch(96)
    out = logits(model, ids, mask)
    tokens = model.generate(ids[:1, :6], max_new_tokens=5, do_sample=False, pad_token_id=0)
    folder = save_sliced(model, tmp_path / "out")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # no trust_remote_code
    assert again.config.num_hidden_layers == 3 and len(again.model.layers) == 3
    layer_types = getattr(again.config, "layer_types", None)
    assert layer_types is None or len(layer_types) == 3
    assert sum(p.numel() for p in again.parameters()) == expected == report.params_after
    assert relative_error(out, logits(again, ids, mask), mask) <= RELOAD_TOL
    assert torch.equal(again.generate(ids[:1, :6], max_new_tokens=5, do_sample=False, pad_token_id=0), tokens)


@pytest.mark.parametrize("schedule", ["heads", "attn-blocks"])
def test_each_new_step_alone_is_a_schedule_that_lands_on_the_budget(schedule):
    model = build_tiny_model("llama", num_hidden_layers=4, intermediate_size=128)
    config = SliceConfig(target_params=0.85, schedule=schedule, round_to=1)
    plan = slicelm.plan(model, calibration(96), config, progress=False)
    dense = sum(p.numel() for p in model.parameters())
    assert 0.84 * dense <= plan.planning["planned_count"] <= 0.85 * dense
    if schedule == "heads":
        assert plan.prunes_heads and not plan.removes_blocks and plan.is_stock_shaped
    else:
        assert [lw.attention_removed for lw in plan.layers].count(True) == 1 and not plan.prunes_heads
    report = slice_model(model, calibration(96), config, plan=plan, progress=False)
    assert report.params_after == plan.planning["planned_count"]
