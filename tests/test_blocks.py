"""Sub-block removal: a removed attention or MLP branch (or whole layer) passes the residual through."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import build_tiny_model
from helpers import calibration, logits, padded_batch, relative_error
from test_heads import layer_inputs

from slicelm.core.arch import REGISTRY, Layout, resolve
from slicelm.errors import SlicelmError
from slicelm.modeling.modeling_slicelm import get_module
from slicelm.slicing import SliceConfig, slice_model
from slicelm.steps.blocks import (
    ZeroBranch,
    attention_removed,
    branch_energy,
    drop_layers,
    mlp_removed,
    prune_attention_block,
    prune_mlp_block,
    remove_attention,
    remove_layer,
    remove_mlp,
)

FAMILIES = sorted(REGISTRY)
CPU = torch.device("cpu")
GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
# Which branch goes in each of the three layers: every kind of removal in one model.
REMOVALS = {0: "attn", 1: "mlp", 2: "layer"}


@torch.no_grad()
def _zero_writers(layer, paths) -> None:
    """Zero a branch's output projections (weights and biases): the branch then adds exactly 0."""
    for path in paths:
        target = get_module(layer, path)
        if isinstance(target, torch.Tensor):
            target.zero_()
            continue
        target.weight.zero_()
        if getattr(target, "bias", None) is not None:
            target.bias.zero_()


def _remove(model, layout, zero: bool) -> None:
    """Apply REMOVALS, by removal (zero=False) or by zeroing the writers (the reference)."""
    for index, kind in REMOVALS.items():
        layer = get_module(model, layout.layers)[index]
        if zero:
            if kind in ("attn", "layer"):
                _zero_writers(layer, layout.attn_outputs)
            if kind in ("mlp", "layer"):
                _zero_writers(layer, layout.mlp_outputs)
        else:
            {"attn": remove_attention, "mlp": remove_mlp, "layer": remove_layer}[kind](layer, layout)


def _stream_layout(model) -> Layout:
    sliced = getattr(model.config, "slicelm", None)
    return Layout.from_dict(sliced["layout"]) if sliced else resolve(model)


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("sliced", [False, True])
def test_removed_branches_pass_the_residual_through_exactly(model_type, sliced):
    """Removal computes what the block computes when the branch adds exactly zero — the residual,
    or in a SliceGPT-sliced block the shortcut — in every family, in the original and the sliced
    layer forward; forward and cached generation keep working."""
    models = []
    for zero in (False, True):
        model = build_tiny_model(model_type)
        if sliced:
            slice_model(model, calibration(96), SliceConfig(sparsity=0.25), progress=False)
        layout = _stream_layout(model)
        _remove(model, layout, zero)
        models.append(model)
    removed, reference = models
    ids, mask = padded_batch(96)
    got, want = logits(removed, ids, mask), logits(reference, ids, mask)
    assert relative_error(want, got, mask) <= 1e-6  # measured 0: the same arithmetic, minus zeros
    layers = get_module(removed, layout.layers)
    assert attention_removed(layers[0], layout) and not mlp_removed(layers[0], layout)
    assert mlp_removed(layers[1], layout) and not attention_removed(layers[1], layout)
    assert attention_removed(layers[2], layout) and mlp_removed(layers[2], layout)
    assert not any(True for _ in layers[2].parameters()) or sliced  # only shortcuts remain in a sliced layer
    prompt = ids[:1, :6]
    cached = removed.generate(prompt, **GREEDY)
    assert torch.equal(cached, removed.generate(prompt, use_cache=False, **GREEDY))
    assert torch.equal(cached, reference.generate(prompt, **GREEDY))


def test_a_removed_layer_is_the_identity():
    model = build_tiny_model("llama")
    layout = resolve(model)
    batches, store = layer_inputs(model, layout, calibration(96), 1)
    layer = get_module(model, layout.layers)[1]
    remove_layer(layer, layout)
    for i, b in enumerate(batches):
        x = store[("x", i)]
        with torch.no_grad():
            y = layer(x, **b.kwargs)
        assert torch.equal(y[0] if isinstance(y, tuple) else y, x)


def test_removed_branches_hold_no_parameters_and_removal_is_idempotent():
    model = build_tiny_model("llama")
    layout = resolve(model)
    layer = get_module(model, layout.layers)[0]
    attn = sum(p.numel() for p in get_module(layer, layout.attn).parameters())
    norm = sum(p.numel() for p in get_module(layer, layout.attn_norm).parameters())
    before = sum(p.numel() for p in model.parameters())
    remove_attention(layer, layout)
    remove_attention(layer, layout)
    assert sum(p.numel() for p in model.parameters()) == before - attn - norm
    assert isinstance(get_module(layer, layout.attn), ZeroBranch) and get_module(layer, layout.attn).width == 64
    assert not any(k.startswith(f"{layout.layers}.0.self_attn") for k in model.state_dict())


def test_shared_norm_of_a_parallel_block_stays():
    model = build_tiny_model("phi")  # one LayerNorm feeds attention and MLP
    layout = resolve(model)
    layer = get_module(model, layout.layers)[0]
    remove_attention(layer, layout)
    assert isinstance(get_module(layer, layout.attn_norm), torch.nn.LayerNorm)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt_neox"])
def test_removal_error_is_the_measured_branch_energy(model_type):
    model = build_tiny_model(model_type)
    layout = resolve(model)
    batches, store = layer_inputs(model, layout, calibration(96), 1)
    layer = get_module(model, layout.layers)[1]
    attn, stream = branch_energy(layer, layout, batches, store, CPU, "attn")
    mlp, mlp_input = branch_energy(layer, layout, batches, store, CPU, "mlp")
    assert attn > 0 and mlp > 0 and stream > 0
    # Removing the MLP changes the block's output by exactly the MLP branch.
    dense = [layer(store[("x", i)], **b.kwargs) for i, b in enumerate(batches)]
    error = prune_mlp_block(layer, layout, batches, store, CPU)
    sq = tokens = 0.0
    with torch.no_grad():
        for i, b in enumerate(batches):
            y = layer(store[("x", i)], **b.kwargs)
            y, d = (y[0], dense[i][0]) if isinstance(y, tuple) else (y, dense[i])
            sq += (y - d)[b.mask].double().pow(2).sum().item()
            tokens += int(b.mask.sum())
    assert sq / tokens == pytest.approx(mlp, rel=1e-4)
    assert error == pytest.approx(mlp / mlp_input)
    assert (mlp_input == pytest.approx(stream)) == layout.parallel  # sequential: the MLP reads x + attn
    assert 0 < prune_attention_block(layer, layout, batches, store, CPU) == pytest.approx(attn / stream)


def test_dropping_layers_gives_a_stock_model_that_reloads_without_slicelm(tmp_path):
    model = build_tiny_model("qwen2")  # qwen2's config has layer_types: they must shrink too
    reference = build_tiny_model("qwen2")
    layout = resolve(model)
    remove_layer(get_module(reference, layout.layers)[1], layout)
    drop_layers(model, layout, [1])
    assert len(get_module(model, layout.layers)) == model.config.num_hidden_layers == 2
    assert [get_module(layer, layout.attn).layer_idx for layer in get_module(model, layout.layers)] == [0, 1]
    ids, mask = padded_batch(96)
    want = logits(reference, ids, mask)
    assert relative_error(want, logits(model, ids, mask), mask) <= 1e-6
    prompt = ids[:1, :6]
    tokens = model.generate(prompt, **GREEDY)
    assert torch.equal(tokens, reference.generate(prompt, **GREEDY))
    model.save_pretrained(tmp_path)
    script = f"""
import sys, json, torch
sys.modules["slicelm"] = None  # importing slicelm fails: the folder is a stock checkpoint
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, dtype=torch.float32).eval()
ids = torch.tensor({ids.tolist()}); mask = torch.tensor({mask.tolist()})
with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask).logits
print(json.dumps({{"layers": model.config.num_hidden_layers, "logits": out.tolist()}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["layers"] == 2
    assert relative_error(want, torch.tensor(result["logits"]), mask) <= 1e-5


def test_dropping_layers_is_refused_where_it_cannot_be_exact():
    model = build_tiny_model("llama")
    layout = resolve(model)
    with pytest.raises(SlicelmError, match="keep at least one"):
        drop_layers(model, layout, [0, 1, 2])
    with pytest.raises(SlicelmError, match="cannot drop"):
        drop_layers(model, layout, [3])
    slice_model(model, calibration(96), SliceConfig(sparsity=0.25), progress=False)
    with pytest.raises(SlicelmError, match="shortcut"):
        drop_layers(model, _stream_layout(model), [1])
