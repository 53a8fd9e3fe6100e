"""MLP-intermediate channel pruning (structured OBS with a least-squares refit) and parameter budgets."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model
from helpers import calibration, logits, padded_batch, relative_error

from slicelm.allocate.budget import build_plan
from slicelm.allocate.context import PlanContext
from slicelm.allocate.counting import ParameterCounter
from slicelm.core.arch import REGISTRY, resolve
from slicelm.errors import SlicelmError
from slicelm.modeling.modeling_slicelm import get_module
from slicelm.slicing import SliceConfig, slice_model
from slicelm.steps.channels import intermediate_width, obs_prune, reconstruction_error, select_channels

PRUNABLE = sorted(t for t, spec in REGISTRY.items() if spec.experts is None)  # experts: tests/test_architectures.py
TOL = 1e-4


def _activations(n: int = 400, width: int = 48, rank: int = 40, seed: int = 0) -> torch.Tensor:
    """Correlated intermediate activations (N, I): some channels are nearly redundant."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, width, generator=gen, dtype=torch.float64)
    return torch.randn(n, rank, generator=gen, dtype=torch.float64) @ basis + 0.05 * torch.randn(
        n, width, generator=gen, dtype=torch.float64
    )


def test_obs_keeping_everything_changes_nothing():
    h = _activations()
    w = torch.randn(48, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = obs_prune(w, h.T @ h, keep=48)
    assert torch.equal(result.keep, torch.arange(48)) and torch.equal(result.weight, w)


def test_refit_beats_dropping_channels_and_greedy_beats_random():
    h = _activations()
    cov = h.T @ h
    w = torch.randn(48, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for keep in (40, 32, 16):
        result = obs_prune(w, cov, keep)
        refit = reconstruction_error(w, cov, result.keep, result.weight)
        dropped = reconstruction_error(w, cov, result.keep, w[result.keep])
        assert refit < dropped  # the refit strictly reduces the calibration reconstruction error
        # ... and is the least-squares optimum for the chosen channels, up to the small ridge
        lstsq = torch.linalg.lstsq(h[:, result.keep], h @ w).solution
        assert refit <= reconstruction_error(w, cov, result.keep, lstsq) * 1.05
        other = torch.randperm(48, generator=torch.Generator().manual_seed(keep))[:keep].sort().values
        best_other = torch.linalg.lstsq(h[:, other], h @ w).solution
        assert refit < reconstruction_error(w, cov, other, best_other)
        assert torch.all(result.removal_cost[1:] >= result.removal_cost[:-1] - 1e-9)  # cumulative


@pytest.mark.parametrize("model_type", PRUNABLE)
def test_keeping_every_channel_is_exact(model_type):
    model = build_tiny_model(model_type)
    ids, mask = padded_batch(96)
    before = logits(model, ids, mask)
    layout = resolve(model)
    for layer in get_module(model, layout.layers):
        width = intermediate_width(layer, layout)
        select_channels(layer, layout, torch.arange(width), None)
    assert relative_error(before, logits(model, ids, mask), mask) <= TOL


@pytest.mark.parametrize("model_type", PRUNABLE)
def test_pruned_mlps_have_the_planned_shapes_and_stay_close(model_type):
    model = build_tiny_model(model_type)
    ids, mask = padded_batch(96)
    before = logits(model, ids, mask)
    report = slice_model(model, calibration(96), SliceConfig(sparsity=0.0, mlp_sparsity=0.25), progress=False)
    layout = resolve_sliced(model)
    for index, layer in enumerate(get_module(model, layout.layers)):
        assert intermediate_width(layer, layout) == report.plan["layers"][index]["mlp"] == 72
    assert set(report.mlp_error) == {"layer0", "layer1", "layer2"}
    assert all(0 <= e < 1 for e in report.mlp_error.values())
    assert relative_error(before, logits(model, ids, mask), mask) < 0.5  # an approximation, not garbage


def resolve_sliced(model):
    from slicelm.core.arch import Layout

    return Layout.from_dict(model.config.slicelm["layout"])


def test_mixture_of_experts_is_refused_for_mlp_pruning():
    """Beside a stream rotation; alone, experts are pruned per expert (tests/test_architectures.py)."""
    model = build_tiny_model("mixtral")
    with pytest.raises(SlicelmError, match="mixture of experts"):
        slice_model(model, calibration(96), SliceConfig(sparsity=0.25, mlp_sparsity=0.25), progress=False)


def test_pruned_mlp_round_trips_through_save_and_load(tmp_path):
    from slicelm.layouts.checkpoint import load_sliced, save_sliced

    ids, mask = padded_batch(96)
    for model_type in ("llama", "phi3", "gpt2"):
        model = build_tiny_model(model_type)
        slice_model(model, calibration(96), SliceConfig(sparsity=0.25, mlp_sparsity=0.25), progress=False)
        save_sliced(model, tmp_path / model_type)
        reloaded = load_sliced(tmp_path / model_type)
        assert relative_error(logits(model, ids, mask), logits(reloaded, ids, mask), mask) <= 1e-5


# --------------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------------
def _context(model, config):
    layout = resolve(model)
    tied = model.config.tie_word_embeddings and not config.untie_head
    return PlanContext(layout, model.config, config.layout, tied, intermediate_width(model.model.layers[0], layout))


@pytest.mark.parametrize("layout", ["slicegpt", "plain"])
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts_are_exact(layout, tied):
    """The meta-device count of a plan equals the parameters of the model slicing builds."""
    for mlp_sparsity in (0.0, 0.25):
        model = build_tiny_model("llama", tie_word_embeddings=tied)
        config = SliceConfig(sparsity=0.25, mlp_sparsity=mlp_sparsity, layout=layout)
        ctx = _context(model, config)
        plan, _ = build_plan(ctx, config, sum(p.numel() for p in model.parameters()))
        predicted = ParameterCounter(ctx).count(plan)
        report = slice_model(model, calibration(96), config, progress=False)
        if layout == "plain":
            from slicelm.layouts.plain import to_stock_model

            assert predicted == sum(p.numel() for p in to_stock_model(model).parameters())
        else:
            assert predicted == report.params_after


@pytest.mark.parametrize("schedule", ["uniform", "mlp", "mlp-global", "proxy", "auto"])
@pytest.mark.parametrize("layout", ["slicegpt", "plain"])
def test_target_params_lands_within_one_percent(schedule, layout):
    model = build_tiny_model("llama", num_hidden_layers=4, intermediate_size=192)
    dense = sum(p.numel() for p in model.parameters())
    config = SliceConfig(target_params=0.8, schedule=schedule, layout=layout, round_to=1)
    report = slice_model(model, calibration(96), config, progress=False)
    from slicelm.layouts.checkpoint import is_stock_shaped

    if is_stock_shaped(model.config.slicelm):
        from slicelm.layouts.plain import to_stock_model

        params = sum(p.numel() for p in to_stock_model(model).parameters())
    elif model.config.slicelm.get("one_basis"):  # per-layer widths, one basis: written as a DeciLM folder
        from slicelm.layouts.plain import to_shaped_model

        assert not any("shortcut" in n for n, _ in model.named_parameters())
        params = sum(p.numel() for p in to_shaped_model(model).parameters())  # no zero padding: MLP widths only
    else:
        params = sum(p.numel() for p in model.parameters())
    assert report.planning["planned_count"] == params
    if layout == "plain" and schedule == "uniform":  # the stream moves in steps of the 4 heads: 6% of 64
        assert params <= 0.8 * dense and "4 attention heads" in report.planning["note"]
        return
    assert 0.79 * dense <= params <= 0.8 * dense, (params / dense, report.planning)
    if schedule in ("mlp", "mlp-global"):
        assert all(w["out"] == 64 for w in report.plan["layers"][:-1])  # the stream keeps its width
    if schedule == "mlp-global":
        widths = {w.get("mlp") for w in report.plan["layers"]}
        assert len(widths) > 1  # non-uniform: calibration put the cuts where they cost least


def test_a_coarse_budget_says_why_it_missed():
    model = build_tiny_model("llama")
    report = slice_model(
        model, calibration(96), SliceConfig(target_params=0.9, schedule="uniform", round_to=32), progress=False
    )
    assert "round-to" in report.planning.get("note", "")


def test_plain_basis_with_per_layer_widths_in_slicelm_format_has_no_shortcuts(tmp_path):
    """One basis but per-layer MLP widths, asked in slicelm's format (auto writes a DeciLM folder,
    tests/test_output_formats.py): no shortcut matrices (the stream has one basis); reloads exactly."""
    import json

    from slicelm.layouts.checkpoint import load_sliced, save_sliced

    model = build_tiny_model("llama", num_hidden_layers=4, intermediate_size=192)
    config = SliceConfig(target_params=0.8, schedule="mlp-global", layout="plain", round_to=1)
    slice_model(model, calibration(96), config, progress=False)
    save_sliced(model, tmp_path / "out", format="slicelm")
    assert (tmp_path / "out" / "modeling_slicelm.py").is_file()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["slicelm"]["one_basis"] is True
    reloaded = load_sliced(tmp_path / "out")
    assert not any("shortcut" in n for n, _ in reloaded.named_parameters())
    ids, mask = padded_batch(96)
    assert relative_error(logits(model, ids, mask), logits(reloaded, ids, mask), mask) <= 1e-5
