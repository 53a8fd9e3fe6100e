"""Slicing proper: shapes follow the plan, error grows with sparsity, bad configs are refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import build_tiny_model
from helpers import calibration, logits, padded_batch, relative_error

import slicelm
from slicelm.core.arch import REGISTRY, resolve
from slicelm.core.plan import SlicingPlan
from slicelm.errors import SlicelmError
from slicelm.modeling.modeling_slicelm import get_module, stream_weight
from slicelm.slicing import SliceConfig, slice_model


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
@pytest.mark.parametrize("slice_head", [False, True])
def test_weight_shapes_equal_the_plan(model_type, slice_head):
    model = build_tiny_model(model_type)
    layout = resolve(model)
    report = slice_model(
        model, calibration(96), SliceConfig(sparsity=0.25, slice_head=slice_head, round_to=8), progress=False
    )
    plan = SlicingPlan.from_dict(report.plan)
    assert plan.head == (48 if slice_head else 64)
    assert plan.embedding == (plan.head if layout.ends_same_width else 48)  # 64 * 0.75; GPT-2: as it ends

    def width(root, path, side):  # the stream-side width of a reader or writer
        return stream_weight(get_module(root, path), side).shape[-1]

    for path in layout.embeddings:
        assert width(model, path, "writer") == plan.embedding
    for index, layer in enumerate(get_module(model, layout.layers)):
        d_in, d_mid, d_out = plan.layer(index)
        assert (d_mid is None) == layout.parallel
        if layout.mlp_same_width:
            assert d_mid == d_out
        after_attn = d_out if layout.parallel else d_mid  # parallel: both branches write the block output
        mlp_in = d_in if layout.parallel else d_mid
        assert all(width(layer, p, "reader") == d_in for p in layout.attn_inputs)
        assert all(width(layer, p, "writer") == after_attn for p in layout.attn_outputs)
        assert all(width(layer, p, "reader") == mlp_in for p in layout.mlp_inputs)
        assert all(width(layer, p, "writer") == d_out for p in layout.mlp_outputs)
        assert layer.attn_shortcut.weight.shape == (after_attn, d_in)
        if layout.parallel:
            assert not hasattr(layer, "ffn_shortcut")
        else:
            assert layer.ffn_shortcut.weight.shape == (d_out, d_mid)
    assert stream_weight(get_module(model, layout.head), "reader").shape == (96, plan.head)
    assert model.config.slicelm["plan"] == plan.to_dict()


def test_error_grows_with_sparsity():
    reference = build_tiny_model("llama")
    ids, mask = padded_batch(96)
    base = logits(reference, ids, mask)
    errors = []
    for sparsity in (0.0, 0.125, 0.25, 0.5, 0.75):
        model = build_tiny_model("llama")
        slice_model(model, calibration(96), SliceConfig(sparsity=sparsity, slice_head=True), progress=False)
        errors.append(relative_error(base, logits(model, ids, mask), mask))
    assert errors[0] < 1e-4
    assert all(a < b for a, b in zip(errors, errors[1:], strict=False)), errors


def test_pca_beats_plain_truncation():
    """PCA keeps more of the function than dropping original coordinates at the same width."""
    reference = build_tiny_model("llama")
    ids, mask = padded_batch(96)
    base = logits(reference, ids, mask)
    errors = {}
    for basis in ("pca", "identity"):
        model = build_tiny_model("llama")
        report = slice_model(model, calibration(96), SliceConfig(sparsity=0.25, basis=basis), progress=False)
        errors[basis] = relative_error(base, logits(model, ids, mask), mask)
        assert 0 < min(report.explained_variance.values()) <= max(report.explained_variance.values()) <= 1 + 1e-9
    assert errors["pca"] < errors["identity"]


def test_explained_variance_is_reported_for_every_point():
    model = build_tiny_model("llama", num_hidden_layers=2)
    report = slice_model(model, calibration(96), SliceConfig(sparsity=0.5), progress=False)
    assert list(report.explained_variance) == [
        "embedding",
        "layer0.attn",
        "layer0.mlp",
        "layer1.attn",
        "layer1.mlp",
    ]
    assert report.params_after < report.params_before


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_outside_range_is_refused(sparsity):
    with pytest.raises(SlicelmError, match=r"sparsity must be in \[0, 1\)"):
        SliceConfig(sparsity=sparsity)


def test_unsupported_model_type_is_refused():
    model = build_tiny_model("llama")
    model.config.model_type = "not-a-model"
    with pytest.raises(SlicelmError, match="model_type 'not-a-model' is not supported"):
        slice_model(model, calibration(96), SliceConfig(), progress=False)


def test_slicing_twice_is_refused():
    model = build_tiny_model("llama")
    slice_model(model, calibration(96), SliceConfig(sparsity=0.1), progress=False)
    with pytest.raises(SlicelmError, match="already sliced"):
        slice_model(model, calibration(96), SliceConfig(sparsity=0.1), progress=False)


def test_uniform_plan_rounding():
    plan = SlicingPlan.uniform(576, 30, 0.25, round_to=8)
    assert plan.embedding == 432 and plan.head == 576 and plan.layers[0].mid == 432
    assert SlicingPlan.uniform(576, 2, 0.3, round_to=64).embedding == 384  # 403.2 -> 384
    assert SlicingPlan.uniform(100, 2, 0.0, round_to=8).embedding == 100  # sparsity 0 keeps all


def test_plan_round_trip(tmp_path):
    plan = SlicingPlan.uniform(64, 3, 0.25, slice_head=True)
    plan.save(tmp_path / "plan.json")
    assert SlicingPlan.load(tmp_path / "plan.json") == plan


def test_covariance_ignores_masked_rows_and_pca_sorts():
    from slicelm.core.pca import CovarianceAccumulator, pca

    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    acc = CovarianceAccumulator(4)
    acc.add(x, mask)
    rows = x[mask].double()
    torch.testing.assert_close(acc.covariance(), rows.T @ rows / 8)
    values, q = pca(acc.covariance())
    assert torch.all(values[:-1] >= values[1:])
    torch.testing.assert_close(q.T @ q, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(q @ torch.diag(values) @ q.T, acc.covariance())


def test_tied_head_stays_tied_and_untie_is_exact():
    """Default keeps a tied head tied (vocab matrix stored once); untie_head gives the paper's layout."""
    ids, mask = padded_batch(96)
    base = logits(build_tiny_model("llama", tie_word_embeddings=True), ids, mask)
    for untie in (False, True):
        model = build_tiny_model("llama", tie_word_embeddings=True)
        config = SliceConfig(sparsity=0.0, untie_head=untie)
        # At full width a config plans the stock architecture; the slicegpt layout is followed as a plan.
        plan = replace(slicelm.plan(model, calibration(96), config, progress=False), layout="slicegpt")
        report = slice_model(model, calibration(96), config, plan=plan, progress=False)
        assert relative_error(base, logits(model, ids, mask), mask) <= 1e-4
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        assert tied == (not untie)
        assert model.config.tie_word_embeddings == (not untie)
        extra_vocab_matrix = 96 * 64 if untie else 0
        shortcuts_and_proj = 3 * 2 * 64 * 64 + (0 if untie else 64 * 64)
        norms = 3 * 2 * 64 + 64
        assert report.params_after == report.params_before + extra_vocab_matrix + shortcuts_and_proj - norms


def test_tied_sliced_head_reads_the_embedding_width():
    """A kept tie shares one matrix: slice_head decides its width (and with it the embedding's)."""
    for slice_head, width in ((False, 64), (True, 48)):
        model = build_tiny_model("llama", tie_word_embeddings=True)
        report = slice_model(model, calibration(96), SliceConfig(sparsity=0.25, slice_head=slice_head), progress=False)
        assert report.plan["embedding"] == width
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.lm_head.weight.shape == (96, width)
        assert model.model.norm.proj.weight.shape == (width, report.plan["layers"][-1]["out"])
        assert model.model.layers[0].attn_shortcut.weight.shape == (48, width)
