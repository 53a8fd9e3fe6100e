"""Architecture-specific behaviour beyond the registry-wide tests: config variants, the weight kinds
each family brings, and structures that are refused with a reason."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, tiny_config
from helpers import calibration, logits, padded_batch, relative_error

from slicelm.arch import REFUSED, REGISTRY, resolve, spec_for
from slicelm.checkpoint import load_sliced, save_sliced
from slicelm.errors import SlicelmError
from slicelm.fuse import fuse_norms
from slicelm.modeling_slicelm import stream_weight
from slicelm.slicing import SliceConfig, slice_model

TOL = 1e-4


def _exact_and_round_trip(tmp_path, model_type: str, **overrides):
    """Sparsity 0 with a random basis is exact; a model sliced at 0.25 reloads to the same logits.

    Returns the sliced model.
    """
    ids, mask = padded_batch(96)
    rotated = build_tiny_model(model_type, **overrides)
    before = logits(rotated, ids, mask)
    slice_model(rotated, calibration(96), SliceConfig(sparsity=0.0, basis="random"), progress=False)
    assert relative_error(before, logits(rotated, ids, mask), mask) <= TOL

    model = build_tiny_model(model_type, **overrides)
    slice_model(model, calibration(96), SliceConfig(sparsity=0.25), progress=False)
    reloaded = load_sliced(save_sliced(model, tmp_path / "sliced"))
    assert relative_error(logits(model, ids, mask), logits(reloaded, ids, mask), mask) <= 1e-5
    return model


# --------------------------------------------------------------------------------------------------
# Variants chosen by config
# --------------------------------------------------------------------------------------------------
def test_gpt_neox_sequential_residual_is_a_normal_pre_ln_block(tmp_path):
    assert not resolve(build_tiny_model("gpt_neox", use_parallel_residual=False)).parallel
    assert resolve(build_tiny_model("gpt_neox")).parallel  # the default: parallel, two LayerNorms
    model = _exact_and_round_trip(tmp_path, "gpt_neox", use_parallel_residual=False)
    plan = model.config.slicelm["plan"]
    assert all(layer["mid"] is not None for layer in plan["layers"])
    assert model.gpt_neox.layers[0].ffn_shortcut.weight.shape == (48, 48)


def test_opt_without_biases_gets_the_layernorm_bias_folded_into_new_biases(tmp_path):
    """enable_bias=False: q/k/v, fc1 and the head have no bias, but their LayerNorms do."""
    layout = resolve(build_tiny_model("opt", enable_bias=False))
    assert set(layout.new_biases) == {*layout.attn_inputs, *layout.mlp_inputs, layout.head}
    model = _exact_and_round_trip(tmp_path, "opt", enable_bias=False)
    assert model.model.decoder.layers[0].self_attn.q_proj.bias is not None


def test_opt_without_elementwise_affine_norms(tmp_path):
    assert resolve(build_tiny_model("opt", layer_norm_elementwise_affine=False)).new_biases == ()
    _exact_and_round_trip(tmp_path, "opt", layer_norm_elementwise_affine=False)


def test_gpt2_stream_ends_as_wide_as_it_starts():
    """GPT2Model views its final stream with the embeddings' width, so the plan keeps them equal."""
    for slice_head, width in ((False, 64), (True, 48)):
        model = build_tiny_model("gpt2")
        config = SliceConfig(sparsity=0.25, slice_head=slice_head)
        report = slice_model(model, calibration(96), config, progress=False)
        assert report.plan["embedding"] == report.plan["layers"][-1]["out"] == width
        assert model.transformer.wte.weight.shape[1] == model.transformer.wpe.weight.shape[1] == width


def test_gpt2_layers_receive_the_mask_positionally():
    """GPT2Model passes (cache, mask, encoder states) positionally; the sliced block must name them."""
    model = build_tiny_model("gpt2")
    ids, mask = padded_batch(96)
    before = logits(model, ids, mask)
    slice_model(model, calibration(96), SliceConfig(sparsity=0.0, basis="random"), progress=False)
    caught = {}
    layer = model.transformer.h[0]
    handle = layer.register_forward_pre_hook(lambda m, a, k: caught.update(n_args=len(a)), with_kwargs=True)
    after = logits(model, ids, mask)
    handle.remove()
    assert caught["n_args"] > 1  # the mask really came in positionally
    assert relative_error(before, after, mask) <= TOL  # and reached attention: padded rows agree


def test_mixtral_experts_and_router_are_rotated_as_stacked_weights(tmp_path):
    model = build_tiny_model("mixtral")
    slice_model(model, calibration(96), SliceConfig(sparsity=0.25), progress=False)
    moe = model.model.layers[0].mlp
    assert moe.experts.gate_up_proj.shape == (4, 2 * 96, 48)  # (E, 2I, D) read in the sliced basis
    assert moe.experts.down_proj.shape == (4, 48, 96)  # (E, D, I) write it
    assert moe.gate.weight.shape == (4, 48) and moe.gate.hidden_dim == 48  # router reshapes with hidden_dim
    plan = model.config.slicelm["plan"]
    assert all(layer["mid"] == layer["out"] for layer in plan["layers"])  # experts write as wide as they read
    reloaded = load_sliced(save_sliced(model, tmp_path / "sliced"))
    assert reloaded.model.layers[0].mlp.gate.hidden_dim == 48
    last = reloaded.model.layers[-1].mlp
    assert stream_weight(last.experts.gate_up_proj, "reader").shape[-1] == 64  # last layer keeps full width


def test_qwen3_head_norms_are_left_alone():
    model = build_tiny_model("qwen3")
    attn = model.model.layers[0].self_attn
    q_norm, k_norm = attn.q_norm.weight.clone(), attn.k_norm.weight.clone()
    fuse_norms(model, resolve(model))
    assert type(attn.q_norm).__name__ == "Qwen3RMSNorm" and torch.equal(attn.q_norm.weight, q_norm)
    assert torch.equal(attn.k_norm.weight, k_norm)
    assert not torch.allclose(q_norm, torch.ones_like(q_norm))  # randomised, so a fold would show


def test_phi_shares_one_norm_between_branches():
    layout = resolve(build_tiny_model("phi"))
    assert layout.parallel and layout.mlp_norm is None and layout.norms == ("input_layernorm",)


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model_type,overrides,reason",
    [
        ("opt", {"do_layer_norm_before": False}, r"post-LayerNorm.*do_layer_norm_before=False"),
        ("opt", {"word_embed_proj_dim": 32}, r"project_in/project_out"),
        ("opt", {"_remove_final_layer_norm": True}, r"no final LayerNorm"),
        ("gpt2", {"add_cross_attention": True}, r"cross-attention"),
    ],
)
def test_unsupported_configurations_are_refused_with_a_reason(model_type, overrides, reason):
    model = build_tiny_model(model_type, **overrides)
    with pytest.raises(SlicelmError, match=rf"cannot slice this {model_type} model: .*{reason}"):
        slice_model(model, calibration(96), SliceConfig(), progress=False)


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_sandwich_norm_families_are_refused_with_a_reason(model_type):
    config = tiny_config(model_type, head_dim=16) if model_type != "gemma3" else None
    if config is None:  # the multimodal wrapper: its config alone is enough to refuse
        from transformers import AutoConfig

        config = AutoConfig.for_model("gemma3")
    reason = "normalise each branch's output"
    with pytest.raises(SlicelmError, match=rf"cannot slice {model_type} models: .*{reason}"):
        spec_for(config)


def test_gemma2_model_is_refused_before_any_work():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("gemma2", head_dim=16)).eval()
    original = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(SlicelmError, match="post_feedforward_layernorm"):
        slice_model(model, calibration(96), SliceConfig(), progress=False)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, original)


def test_refused_and_supported_families_do_not_overlap():
    assert not set(REFUSED) & set(REGISTRY)


def test_missing_role_names_the_path():
    model = build_tiny_model("phi3")
    del model.model.layers[0].self_attn.qkv_proj
    with pytest.raises(SlicelmError, match=r"phi3 model has no attention input at 'self_attn.qkv_proj'"):
        resolve(model)
