"""Decide, then do: plans are saveable, followed exactly, checked against the model; allocators."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import build_tiny_model
from helpers import calibration
from test_cli_slice import run_cli, tiny_folder  # noqa: F401  (the fixture)

import slicelm
from slicelm.allocate.budget import ALLOCATORS, PlanRequest
from slicelm.allocate.counting import ParameterCounter
from slicelm.allocate.measured import measured_allocator, split_calibration
from slicelm.allocate.planning import planning_context
from slicelm.config import LOCAL_SCHEDULES, SCHEDULES, SliceConfig
from slicelm.core.plan import LayerWidths, SlicingPlan
from slicelm.errors import SlicelmError
from slicelm.slicing import slice_model

CASES = [
    {"sparsity": 0.25},
    {"sparsity": 0.25, "layout": "plain"},
    {"target_params": 0.8, "schedule": "proxy", "layout": "plain", "round_to": 4},
    {"target_params": 0.8, "schedule": "mlp-global", "round_to": 4},
    {"target_params": 0.8, "schedule": "auto", "round_to": 4},
]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_every_schedule_is_a_registered_allocator():
    assert set(SCHEDULES) == set(ALLOCATORS) | set(LOCAL_SCHEDULES)
    assert not set(LOCAL_SCHEDULES) & set(ALLOCATORS)


def test_every_plan_basis_is_a_registered_basis():
    from typing import get_args

    from slicelm.config import Basis
    from slicelm.core.bases import BASES
    from slicelm.core.plan import BASES as PLAN_BASES

    assert set(PLAN_BASES) == set(BASES) == set(get_args(Basis))


def test_every_layout_is_a_registered_stream_layout():
    from typing import get_args

    from slicelm.config import LayoutKind
    from slicelm.core.plan import LAYOUTS, STREAM_LAYOUTS

    assert set(LAYOUTS) == set(STREAM_LAYOUTS) == set(get_args(LayoutKind))
    for name, layout in STREAM_LAYOUTS.items():
        assert layout.name == name and layout.shortcuts is not layout.one_basis


@pytest.mark.parametrize("layout", ["slicegpt", "plain"])
def test_the_executor_writes_what_the_stream_layout_says(layout):
    """Shortcut matrices exactly where the layout has them; the config records a one-basis layout."""
    from slicelm.core.plan import STREAM_LAYOUTS
    from slicelm.modeling.modeling_slicelm import SLICELM_KEY

    model = build_tiny_model("llama")
    report = slice_model(model, calibration(96), SliceConfig(sparsity=0.25, layout=layout), progress=False)
    stream = STREAM_LAYOUTS[layout]
    shortcuts = [n for n, _ in model.named_parameters() if "shortcut" in n]
    assert bool(shortcuts) is stream.shortcuts
    info = getattr(model.config, SLICELM_KEY)
    assert {k: info.get(k) for k in stream.config_info()} == stream.config_info()
    assert report.layout == layout


def test_plan_round_trips_through_json():
    plan = SlicingPlan(
        64,
        48,
        (LayerWidths(48, 40, 96), LayerWidths(40, 64, None)),
        layout="slicegpt",
        basis="random",
        tied=True,
        seed=3,
        model={"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128},
        planning={"schedule": "auto"},
    )
    again = SlicingPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and again.model == plan.model and again.planning == plan.planning
    old = {"hidden_size": 64, "embedding": 48, "layers": [{"mid": 48, "out": 40}]}  # saved before this release
    assert SlicingPlan.from_dict(old).layout == "slicegpt" and SlicingPlan.from_dict(old).basis == "pca"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_planning_leaves_the_model_unchanged_and_following_the_plan_equals_one_shot(case):
    """plan() is pure; a plan written to JSON and followed gives the one-shot model bit for bit."""
    config = SliceConfig(**case)
    model = build_tiny_model("llama", num_hidden_layers=3, intermediate_size=128)
    twin = copy.deepcopy(model)
    before = _state(model)
    plan = slicelm.plan(model, calibration(96), config, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not getattr(model, "_slicelm_model", False)

    saved = SlicingPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    followed = slice_model(model, calibration(96), config, plan=saved, progress=False)
    one_shot = slice_model(twin, calibration(96), config, progress=False)
    assert SlicingPlan.from_dict(followed.plan) == SlicingPlan.from_dict(one_shot.plan)
    a, b = model.state_dict(), twin.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_plan_for_another_model_is_refused():
    model = build_tiny_model("llama", num_hidden_layers=3)
    plan = slicelm.plan(model, calibration(96), SliceConfig(sparsity=0.25), progress=False)
    other = build_tiny_model("llama", num_hidden_layers=2)
    with pytest.raises(SlicelmError, match="num_hidden_layers 3, this one has 2"):
        slice_model(other, calibration(96), plan=plan, progress=False)
    wide = plan.with_mlp([10_000, None, None])
    with pytest.raises(SlicelmError, match="wider than the model's"):
        slice_model(build_tiny_model("llama", num_hidden_layers=3), calibration(96), plan=wide, progress=False)


def _request(model, target: float = 0.8, layout: str = "slicegpt") -> PlanRequest:
    from slicelm.core.arch import resolve

    config = SliceConfig(target_params=target, schedule="auto", layout=layout, round_to=1)
    ctx = planning_context(model, resolve(model), config)
    params = sum(p.numel() for p in model.parameters())
    return PlanRequest(ctx, config, params, ParameterCounter(ctx), model=model, calibration=calibration(96))


@pytest.mark.parametrize(
    "favourite",
    ["uniform-mlp", "uniform-stream", "stream+mlp", "mlp-shaped-1", "heads-2x1+mlp", "no-attn-1+mlp"],
)
def test_the_measured_allocator_keeps_the_best_scored_candidate(favourite):
    """With a deterministic scorer the chosen plan is the best scored, and the uniform plans are
    always among the candidates, so the choice never scores worse than any of them."""
    model = build_tiny_model("llama", num_hidden_layers=4, intermediate_size=128)
    seen: dict[str, float] = {}

    def scorer(name: str, plan: SlicingPlan) -> float:
        seen[name] = 0.0 if name == favourite else 1.0 + len(name) / 100
        return seen[name]

    request = _request(model)
    plan, report = measured_allocator(request, scorer=scorer)
    assert {"uniform-mlp", "uniform-stream", "stream+mlp"} <= set(seen)
    assert {"heads-2x1+mlp", "heads-1x2+mlp", "no-attn-1+mlp"} <= set(seen)  # heads and sub-blocks compete
    assert report["chosen"] == favourite
    assert min(c["score"] for c in report["candidates"]) == seen[favourite]
    for candidate in report["candidates"]:
        assert 0.79 * request.params_before <= candidate["params"] <= request.target, candidate


@pytest.mark.parametrize("heads_win", [True, False])
def test_the_second_round_shapes_the_mlps_of_the_winning_structure(heads_win):
    """When a head removal and a shaped MLP plan each beat the uniform MLP plan, the head removal is
    scored again with shaped MLP widths (and can be chosen); when no structure wins, nothing is added."""
    model = build_tiny_model("llama", num_hidden_layers=4, intermediate_size=128)
    ranks = {"uniform-mlp": 1.0, "heads-2x1+mlp": 0.9 if heads_win else 1.2, "mlp-shaped-1": 0.8}

    def scorer(name: str, plan: SlicingPlan) -> float:
        return 0.5 if name.endswith("+shaped-1") else ranks.get(name, 2.0)

    request = _request(model)
    plan, report = measured_allocator(request, scorer=scorer)
    names = [c["name"] for c in report["candidates"]]
    if not heads_win:
        assert not any(n.endswith("+shaped-1") for n in names) and report["chosen"] == "mlp-shaped-1"
        return
    assert names[-1] == report["chosen"] == "heads-2x1+mlp+shaped-1"
    assert all((lw.kv_heads, lw.q_per_kv) == (2, 1) for lw in plan.layers)
    widths = [lw.mlp for lw in plan.layers]
    assert len(set(widths)) > 1, widths  # shaped: the deterministic sensitivities differ by layer
    assert 0.79 * request.params_before <= report["candidates"][-1]["params"] <= request.target


def test_removal_curves_are_convex_and_levels_spend_where_kl_grows_least():
    """Each layer's curve is the lower convex hull of its measured points from (0, 0); the levels plan
    takes channels from the layer whose KL grows least per channel, and lands on the budget."""
    from slicelm.allocate.budget import counter_for
    from slicelm.allocate.context import stream_plan
    from slicelm.allocate.measured import levels_plan, removal_curves

    # layer 0: KL 0.1 at 32 removed, 1.0 at 64 (steep); layer 1: a point above the chord (dropped)
    curves = removal_curves(128, {96: [0.1, 0.5, 0.2, 0.2], 64: [1.0, 0.6, 0.4, 0.4], 112: [0.04, 0.4, 0.1, 0.1]})
    assert curves[0] == [(0, 0.0), (16, 0.04), (32, 0.1), (64, 1.0)]
    assert curves[1] == [(0, 0.0), (64, 0.6)]  # (16, 0.4) and (32, 0.5) lie above the chord
    slopes = [[(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(c, c[1:], strict=False)] for c in curves]
    assert all(x <= y + 1e-12 for s in slopes for x, y in zip(s, s[1:], strict=False))

    model = build_tiny_model("llama", num_hidden_layers=4, intermediate_size=128)
    request = _request(model, target=0.9)
    base = stream_plan(request.ctx, request.ctx.hidden, request.config)  # the whole stream, MLPs whole
    cheap = [[(0, 0.0), (64, 0.01)], [(0, 0.0), (64, 10.0)], [(0, 0.0), (64, 10.0)], [(0, 0.0), (64, 10.0)]]
    plan = levels_plan(request, base, cheap)
    widths = [lw.mlp for lw in plan.layers]
    assert widths[0] == 64, widths  # the cheap layer gives everything its curve reaches first
    count = counter_for(request, plan).count(plan)
    assert count <= request.target and count >= 0.89 * request.params_before
    assert levels_plan(request, base, [[(0, 0.0), (1, 1.0)]] * 4) is None  # the curves cannot reach the budget


def test_mlp_levels_schedule_measures_curves_and_lands_on_the_budget():
    """``--schedule mlp-levels`` (auto's former candidate, now a named option): each layer's KL curve
    from measurements at three removals, per-layer widths along them, within 1% under the budget; the
    plain layout's stock architecture holds one MLP width, so it is refused there in one line."""
    model = build_tiny_model("llama", num_hidden_layers=4, intermediate_size=128)
    plan = slicelm.plan(model, calibration(96), SliceConfig(target_params=0.8, schedule="mlp-levels", round_to=1))
    report = plan.planning
    assert report["chosen"] == "mlp-levels" and report["evaluations"] == 3 * 4
    curves = report["removal_curves"]
    assert len(curves) == 4 and all(tuple(c[0]) == (0, 0.0) for c in curves)
    dense = sum(p.numel() for p in model.parameters())
    assert 0.79 * dense <= report["planned_count"] <= 0.8 * dense
    with pytest.raises(SlicelmError, match="one MLP width|per-layer widths"):
        slicelm.plan(model, calibration(96), SliceConfig(target_params=0.8, schedule="mlp-levels", layout="plain"))


def test_the_measured_allocator_measures_kl_and_lands_on_the_budget():
    model = build_tiny_model("llama", num_hidden_layers=4, intermediate_size=128)
    config = SliceConfig(target_params=0.8, schedule="auto", round_to=1)
    plan = slicelm.plan(model, calibration(96), config, progress=False)
    report = plan.planning
    scores = {c["name"]: c["score"] for c in report["candidates"]}
    assert report["chosen"] == min(scores, key=scores.get)
    assert all(s >= -1e-6 and s == s for s in scores.values())  # KL: finite, non-negative (float32 rounding)
    assert len(report["layer_sensitivity"]) == 4 and min(report["layer_sensitivity"]) > 0
    assert len(report["attention_sensitivity"]) == 4 and min(report["attention_sensitivity"]) > 0
    assert {"heads-2x1+mlp", "heads-1x2+mlp", "no-attn-1+mlp"} <= set(scores)
    assert "mlp-levels" not in scores  # a named option now (measured to lose), not a candidate
    dense = sum(p.numel() for p in model.parameters())
    assert 0.79 * dense <= report["planned_count"] <= 0.8 * dense
    # The held-out scoring windows are disjoint from the refit samples.
    held, search = split_calibration(calibration(96))
    assert len(held) + len(search) <= len(calibration(96)) and held and search


def test_plan_only_then_plan_equals_one_shot_through_the_cli(tiny_folder, tmp_path, data_dir, capsys):  # noqa: F811
    common = ["--calib-samples", 4, "--calib-seqlen", 32, "--batch-size", 2, "--data-dir", data_dir, "--quiet"]
    plan_file = tmp_path / "plan.json"
    code, _, err = run_cli(["slice", tiny_folder, "--target-params", 0.99, "--round-to", 4, "--plan-only",
                            "--out", plan_file, *common], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads(plan_file.read_text())["planning"]["schedule"] == "auto"
    code, _, err = run_cli(["slice", tiny_folder, "--plan", plan_file, "--out", tmp_path / "followed", *common], capsys)
    assert code == 0, err
    code, _, err = run_cli(
        ["slice", tiny_folder, "--target-params", 0.99, "--round-to", 4, "--out", tmp_path / "direct", *common], capsys
    )
    assert code == 0, err
    from safetensors.torch import load_file

    def weights(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out |= load_file(f)
        return out

    a, b = weights(tmp_path / "followed"), weights(tmp_path / "direct")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_plans_are_one_line_and_write_nothing(tiny_folder, tmp_path, data_dir, capsys):  # noqa: F811
    common = ["--calib-samples", 2, "--calib-seqlen", 16, "--data-dir", data_dir, "--quiet"]
    good = tmp_path / "plan.json"
    code, _, err = run_cli(["slice", tiny_folder, "--sparsity", 0.25, "--plan-only", "--out", good, *common], capsys)
    assert code == 0, err
    data = json.loads(good.read_text())
    cases = {
        "not-json.json": ("{", "is not JSON"),
        "list.json": ("[]", "not a slicing plan"),
        "layers.json": (json.dumps(data | {"layers": data["layers"][:-1]}), "layers, the model 3"),
        "width.json": (json.dumps(data | {"embedding": 10_000}), "widths outside"),
        "layout.json": (json.dumps(data | {"layout": "fancy"}), "layout must be one of"),
        "hidden.json": (json.dumps(data | {"model": data["model"] | {"hidden_size": 7}}), "hidden_size 7, this one"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        out = tmp_path / f"out-{name}"
        code, _, err = run_cli(["slice", tiny_folder, "--plan", tmp_path / name, "--out", out, *common], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (name, err)
        assert not out.exists()
    code, _, err = run_cli(
        ["slice", tiny_folder, "--plan", good, "--sparsity", 0.1, "--out", tmp_path / "x", *common], capsys
    )
    assert code == 2 and "the plan decides every width" in err
    code, _, err = run_cli(["slice", tiny_folder, "--sparsity", 0.2, "--plan-only", "--out", good, *common], capsys)
    assert code == 2 and "exists" in err  # a plan file is never overwritten without --overwrite


def test_auto_with_the_plain_layout_keeps_the_stock_architecture():
    """--layout plain asks for the stock architecture (one MLP width): auto scores only uniform plans."""
    model = build_tiny_model("llama", num_hidden_layers=4, intermediate_size=128)
    plan = slicelm.plan(
        model, calibration(96), SliceConfig(target_params=0.8, layout="plain", round_to=1), progress=False
    )
    names = {c["name"] for c in plan.planning["candidates"]}
    stock = {"uniform-mlp", "uniform-stream", "stream+mlp", "heads-2x1+mlp", "heads-1x2+mlp"}
    assert names <= stock and "uniform-mlp" in names
    assert plan.is_stock_shaped
