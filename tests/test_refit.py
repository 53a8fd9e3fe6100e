"""What the MLP refit matches: its own branch (``refit="branch"``) or the dense model (``"dense"``).

The dense refit fits each MLP writer so that the block's output matches the *dense* model's stream
after that block, on the inputs the compressed block really receives: it takes back the error of
the compressed layers upstream as well as this MLP's own. These tests prove that it is exact where
nothing changes, that it lowers the end-to-end error where something does, and that plans carry it.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from conftest import build_tiny_model
from helpers import calibration, logits, padded_batch, relative_error

import slicelm
from slicelm.config import SliceConfig
from slicelm.core.arch import resolve
from slicelm.core.plan import SlicingPlan
from slicelm.errors import SlicelmError
from slicelm.modeling.modeling_slicelm import get_module
from slicelm.slicing import slice_model

# Sequential RMS families (llama), with biases (qwen2), with a head norm (qwen3), a LayerNorm
# family with a parallel block (phi) and one sequential LayerNorm family (opt).
FAMILIES = ["llama", "qwen2", "qwen3", "phi", "opt"]
# Where nothing changes upstream each MLP's target is what it already writes, and the dense refit
# (a ridge towards the writer as it is) gives the writer back up to float rounding: measured at
# most 7e-6 on these models' logits in float32, against the 1e-4 bound of the other exact tests.
EXACT_TOL = 1e-4


def _plan(model, layout: str, sparsity: float, mlp_sparsity: float, refit: str) -> SlicingPlan:
    config = SliceConfig(sparsity=sparsity, mlp_sparsity=mlp_sparsity, layout=layout)
    return replace(slicelm.plan(model, calibration(96), config, progress=False), refit=refit)


def _follow(model, plan: SlicingPlan):
    config = SliceConfig(layout=plan.layout, sparsity=0.0 if plan.keeps_stream else 0.25)
    return slice_model(model, calibration(96), config, plan=plan, progress=False)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_dense_refit_without_removal_is_exact(model_type):
    """Nothing removed anywhere: every MLP's target is its own output, and the refit gives it back."""
    model = build_tiny_model(model_type)
    dense = copy.deepcopy(model)
    layout = "plain" if resolve(model).norm == "rms" else "slicegpt"
    plan = _plan(model, layout, 0.0, 0.0, "dense")
    report = _follow(model, plan)
    assert set(report.mlp_error) == {f"layer{i}" for i in range(3)}  # every MLP was refit
    ids, mask = padded_batch(96)
    assert relative_error(logits(dense, ids, mask), logits(model, ids, mask), mask) < EXACT_TOL


def _logit_error(dense, model, samples) -> float:
    """Summed squared distance of the logits from the dense model's, over ``samples`` (the hidden
    states are not comparable: a sliced model's stream is in another basis, its final norm folded)."""
    total = 0.0
    for ids in samples:
        a = dense(input_ids=ids[None]).logits
        b = model(input_ids=ids[None]).logits
        total += (a - b).double().pow(2).sum().item()
    return total


@pytest.mark.parametrize(("layout", "sparsity"), [("plain", 0.0), ("slicegpt", 0.25)])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@torch.no_grad()
def test_dense_refit_lowers_the_end_to_end_error(model_type, layout, sparsity):
    """Same widths, two refits: the dense one ends closer to the dense model's logits on the
    calibration data (each MLP also takes back what the layers before it changed)."""
    model = build_tiny_model(model_type, num_hidden_layers=4)
    dense = copy.deepcopy(model)
    runs = {}
    for refit in ("branch", "dense"):
        twin = copy.deepcopy(model)
        _follow(twin, _plan(twin, layout, sparsity, 0.4, refit))
        runs[refit] = _logit_error(dense, twin, calibration(96))
    # Each layer's refit is optimal for its target given the inputs it receives. Measured ratios on
    # these models: 0.31-0.78 over three seeds, 0.70 at most at seed 0 (this test); rounding on
    # another machine moves them by ~1e-6.
    assert runs["dense"] < 0.9 * runs["branch"], runs


def test_dense_refit_widths_and_counts_equal_the_branch_refit():
    """The refit changes weights, never shapes: same parameter count and same widths."""
    model = build_tiny_model("llama")
    twin = copy.deepcopy(model)
    a = _follow(model, _plan(model, "plain", 0.0, 0.25, "branch"))
    b = _follow(twin, _plan(twin, "plain", 0.0, 0.25, "dense"))
    assert a.params_after == b.params_after
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in twin.state_dict().items()}
    layout = resolve(twin)
    assert all(
        torch.isfinite(get_module(layer, layout.mlp_outputs[0]).weight).all()
        for layer in get_module(twin, layout.layers)
    )


def test_refit_round_trips_through_json_and_old_plans_read_as_branch(tmp_path):
    model = build_tiny_model("llama")
    plan = _plan(model, "plain", 0.0, 0.25, "dense")
    path = tmp_path / "plan.json"
    plan.save(path)
    assert SlicingPlan.load(path).refit == "dense"
    data = json.loads(path.read_text())
    data.pop("refit")
    path.write_text(json.dumps(data))
    assert SlicingPlan.load(path).refit == "branch"
    data["refit"] = "teacher"
    path.write_text(json.dumps(data))
    with pytest.raises(SlicelmError, match="refit must be one of"):
        SlicingPlan.load(path)


def test_dense_refit_is_refused_where_mlp_channels_cannot_be_refit():
    """A mixture of experts beside the rotation cannot take the dense refit: one line."""
    model = build_tiny_model("mixtral", num_hidden_layers=2)
    config = SliceConfig(sparsity=0.25)
    plan = replace(slicelm.plan(model, calibration(96), config, progress=False), refit="dense")
    with pytest.raises(SlicelmError, match="mixture of experts"):
        slice_model(model, calibration(96), config, plan=plan, progress=False)
