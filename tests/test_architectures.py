"""Architecture-specific behaviour beyond the registry-wide tests: config variants, the weight kinds
each family brings, and structures that are refused with a reason."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import build_tiny_model
from helpers import calibration, logits, padded_batch, relative_error
from transformers import AutoModelForCausalLM

from slicelm.core.arch import LOCAL_ONLY, REFUSED, REGISTRY, resolve, spec_for
from slicelm.core.fuse import fuse_norms
from slicelm.errors import SlicelmError
from slicelm.layouts.checkpoint import load_sliced, save_sliced
from slicelm.modeling.modeling_slicelm import stream_weight
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


def test_gemma3_multimodal_wrapper_is_refused_with_a_reason():
    from transformers import AutoConfig

    with pytest.raises(SlicelmError, match=r"cannot slice gemma3 models: .*multimodal wrapper.*gemma3_text"):
        spec_for(AutoConfig.for_model("gemma3"))


@pytest.mark.parametrize("model_type", sorted(LOCAL_ONLY))
def test_stream_sparsity_without_the_rotation_is_refused_before_any_work(model_type):
    """The rotation's refusal is one line saying why, and what does work; nothing is changed."""
    model = build_tiny_model(model_type)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlicelmError, match=rf"cannot slice the stream of {model_type} models: .*--mlp-sparsity") as e:
        slice_model(model, calibration(96), SliceConfig(sparsity=0.25), progress=False)
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())


def test_gemma2_sandwich_norms_are_named_in_the_refusal():
    with pytest.raises(SlicelmError, match="post_feedforward_layernorm"):
        slice_model(build_tiny_model("gemma2"), calibration(96), SliceConfig(), progress=False)


def test_refused_local_and_rotation_families_do_not_overlap():
    assert not set(REFUSED) & set(REGISTRY)
    assert not set(LOCAL_ONLY) & set(REGISTRY)
    assert all(spec.rotation for spec in LOCAL_ONLY.values())
    assert all(spec.rotation is None for spec in REGISTRY.values())


def test_missing_role_names_the_path():
    model = build_tiny_model("phi3")
    del model.model.layers[0].self_attn.qkv_proj
    with pytest.raises(SlicelmError, match=r"phi3 model has no attention input at 'self_attn.qkv_proj'"):
        resolve(model)


# --------------------------------------------------------------------------------------------------
# Families new in the two tiers: the rotation where invariance holds, structure-local steps everywhere
# --------------------------------------------------------------------------------------------------
NEW_FAMILIES = [
    "gemma2",
    "gemma3_text",
    "olmo2",
    "granite",
    "smollm3",
    "starcoder2",
    "qwen2_moe",
    "qwen3_moe",
    "mixtral",
]
CALIB = ["--calib", "c4", "--calib-samples", "4", "--calib-seqlen", "32", "--calib-batch-size", "2", "--quiet"]
WIDTH_FIELDS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")
EXPERT_FIELDS = ("num_experts", "num_local_experts")
HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads", "head_dim")
MOE_CALIBRATION = dict(vocab=96, lengths=(64,) * 16)  # ~500 routed tokens per expert: enough to refit


def _stock_reloads(folders: dict[str, str], ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Load every folder with stock transformers in a process where ``import slicelm`` fails."""
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["slicelm"] = None
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(1)
        ids, mask = torch.tensor({ids.tolist()}), torch.tensor({mask.tolist()})
        results = {{}}
        for case, folder in {folders!r}.items():
            try:
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # no remote code
                with torch.no_grad():
                    out = model(input_ids=ids, attention_mask=mask).logits
                    tokens = model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
                config = model.config.to_dict()
                # through the config's attribute map (num_local_experts / num_experts)
                widths = {{k: getattr(model.config, k, None) for k in {WIDTH_FIELDS + EXPERT_FIELDS + HEAD_FIELDS!r}}}
                results[case] = {{
                    "logits": out.tolist(),
                    "new_tokens": tokens.shape[1] - 6,
                    "config": widths,
                    "shapes": {{n: list(p.shape) for n, p in model.named_parameters()}},
                    "remote": "slicelm" in config or bool(config.get("auto_map")),
                }}
            except Exception as error:
                results[case] = repr(error)
        print(json.dumps(results))
        """
    )
    env = {**os.environ, "PYTHONPATH": ""}  # transformers only
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _budget_reloads_in_stock(tmp_path, families, config, overrides=lambda model_type: {}):
    """Each family from a checkpoint on disk, sliced with ``config``, saved to ``tmp_path/<family>-out``
    and reloaded where ``import slicelm`` fails: checks the reload is stock, generates and gives the
    in-memory logits; returns (reload results, slicing reports, dense configs as dicts) by family."""
    ids, mask = padded_batch(96)
    expected, folders, reports, configs = {}, {}, {}, {}
    for model_type in families:
        build_tiny_model(model_type, **overrides(model_type)).save_pretrained(tmp_path / model_type)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / model_type, dtype=torch.float32).eval()
        configs[model_type] = model.config.to_dict()
        reports[model_type] = slice_model(model, calibration(**MOE_CALIBRATION), config, progress=False)
        expected[model_type] = logits(model, ids, mask)
        save_sliced(model, tmp_path / f"{model_type}-out")
        folders[model_type] = str(tmp_path / f"{model_type}-out")
    results = _stock_reloads(folders, ids, mask)
    for model_type, result in results.items():
        assert isinstance(result, dict), f"{model_type}: {result}"
        assert not result["remote"] and result["new_tokens"] >= 1, model_type  # generates (eos may end it)
        assert relative_error(expected[model_type], torch.tensor(result["logits"]), mask) <= TOL, model_type
    return results, reports, configs


def test_new_families_zero_removal_and_quarter_mlp_removal_reload_in_stock_transformers(
    tmp_path, smollm2_tokenizer, data_dir
):
    """Per family, from a checkpoint on disk (random norms and biases): ``--sparsity 0 --layout plain``
    through the CLI reproduces it exactly in stock transformers; 25% of the MLP channels removed
    (``slice_model``) reloads there with the planned widths, the same logits, and generates."""
    from transformers import AutoModelForCausalLM

    from slicelm.cli import main

    ids, mask = padded_batch(96)
    expected, folders, planned = {}, {}, {}
    for model_type in NEW_FAMILIES:
        source = tmp_path / model_type
        model = build_tiny_model(model_type, vocab_size=len(smollm2_tokenizer))
        model.save_pretrained(source)
        smollm2_tokenizer.save_pretrained(source)
        reloaded = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        expected[f"{model_type}-0"] = logits(reloaded, ids, mask)
        out = tmp_path / f"{model_type}-0"
        argv = ["slice", source, "--sparsity", 0, "--layout", "plain", *CALIB, "--out", out, "--data-dir", data_dir]
        assert main([str(a) for a in argv]) == 0, model_type
        folders[f"{model_type}-0"] = str(out)

        calib = calibration(**MOE_CALIBRATION)
        report = slice_model(
            reloaded, calib, SliceConfig(sparsity=0.0, mlp_sparsity=0.25, layout="plain"), progress=False
        )
        expected[f"{model_type}-0.25"] = logits(reloaded, ids, mask)
        save_sliced(reloaded, tmp_path / f"{model_type}-0.25")
        folders[f"{model_type}-0.25"] = str(tmp_path / f"{model_type}-0.25")
        widths = report.plan.get("mlp_widths") or {"intermediate_size": report.plan["layers"][0]["mlp"]}
        planned[model_type] = (widths, model.config)
    results = _stock_reloads(folders, ids, mask)
    for case, result in results.items():
        assert isinstance(result, dict), f"{case}: {result}"
        assert not result["remote"] and result["new_tokens"] == 4, case
        error = relative_error(expected[case], torch.tensor(result["logits"]), mask)
        assert error <= (TOL if case.endswith("-0") else 1e-5), (case, error)
    for model_type, (widths, config) in planned.items():
        stock = results[f"{model_type}-0.25"]
        for name, width in widths.items():
            assert width == (getattr(config, name) * 3 // 4) // 8 * 8, (model_type, name)
            assert stock["config"][name] == width, (model_type, name)
        for name in EXPERT_FIELDS:  # the expert count is preserved
            assert stock["config"][name] == getattr(config, name, None), (model_type, name)
        experts = {n: s for n, s in stock["shapes"].items() if n.endswith("experts.gate_up_proj")}
        for shape in experts.values():  # (E, 2I, D)
            assert shape[0] == config.num_local_experts if model_type == "mixtral" else config.num_experts
            assert shape[1] == 2 * widths.get("moe_intermediate_size", widths.get("intermediate_size"))


def folder_with_tokenizer(tmp_path, model_type: str, tokenizer):
    """A tiny model of ``model_type`` saved with the real tokenizer (its vocabulary sizes the embeddings)."""
    source = tmp_path / model_type
    build_tiny_model(model_type, vocab_size=len(tokenizer)).save_pretrained(source)
    tokenizer.save_pretrained(source)
    return source


def test_new_families_cli_budget_plans_local_steps_only(tmp_path, smollm2_tokenizer, data_dir, capsys):
    """A budget on a family without the rotation spends the structure-local steps only (auto: the
    measured best of MLP channels, heads and whole layers) and says so
    (the real tokenizer's 49k-token embeddings hold almost every parameter, hence the budget);
    an explicit --sparsity there is a one-line refusal that writes nothing."""
    from slicelm.cli import main

    source = folder_with_tokenizer(tmp_path, "gemma2", smollm2_tokenizer)
    capsys.readouterr()
    argv = ["slice", source, "--sparsity", 0.25, *CALIB, "--out", tmp_path / "refused", "--data-dir", data_dir]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot slice the stream of gemma2 models" in err
    assert not (tmp_path / "refused").exists()
    argv = ["slice", source, "--target-params", 0.996, *CALIB, "--out", tmp_path / "budget", "--data-dir", data_dir]
    assert main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert "warning: gemma2 has no rotation" in err and "the budget is spent on" in err
    assert "--schedule auto chose " in err and "uniform-mlp" in err  # the measured choice, in one line
    report = json.loads((tmp_path / "budget" / "slicelm_report.json").read_text())
    assert report["planning"]["planned_count"] == report["params_after"] <= 0.996 * report["params_before"]
    config = json.loads((tmp_path / "budget" / "config.json").read_text())
    dropped = report["planning"].get("dropped_layers", [])
    assert config["intermediate_size"] == report["planning"]["widths"]["intermediate_size"] <= 96
    assert config["num_hidden_layers"] == 3 - len(dropped)
    assert config["intermediate_size"] < 96 or dropped
    assert "slicelm" not in config and "auto_map" not in config


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral"])
def test_budget_counts_every_expert(model_type):
    from slicelm.steps.local import stock_count

    model = build_tiny_model(model_type)
    config = model.config
    report = slice_model(
        model, calibration(**MOE_CALIBRATION), SliceConfig(target_params=0.85, schedule="mlp"), progress=False
    )
    assert report.params_after == sum(p.numel() for p in model.parameters()) == report.planning["planned_count"]
    assert report.params_after <= 0.85 * report.params_before
    widths = report.planning["widths"]
    wider = {name: width + 8 for name, width in widths.items()}  # one step wider no longer fits the budget
    assert stock_count(config, wider) > 0.85 * report.params_before
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape[0] == (config.num_experts if model_type == "qwen2_moe" else 4)


# --------------------------------------------------------------------------------------------------
# --schedule heads on the structure-local path
# --------------------------------------------------------------------------------------------------
LOCAL_HEAD_FAMILIES = ["gemma2", "gemma3_text", "qwen2_moe"]


def _layer_inputs(model):
    """(layout, batches, per-layer call kwargs, store holding layer 0's inputs) of the local walk."""
    from slicelm.core.offload import ActivationStore
    from slicelm.steps.local import capture_all_layer_inputs

    layout, store = resolve(model), ActivationStore()
    batches, kwargs = capture_all_layer_inputs(model, layout, calibration(**MOE_CALIBRATION), 4, 0, store)
    return layout, batches, kwargs, store


@pytest.mark.parametrize("model_type", LOCAL_HEAD_FAMILIES)
def test_local_head_step_keeping_every_head_is_exact(model_type):
    """Statistics, grouped OBS and the o_proj refit with every head kept, in every layer on the inputs
    it receives, leave the logits unchanged."""
    from slicelm.steps.heads import head_geometry
    from slicelm.steps.local import prune_layer_heads

    model = build_tiny_model(model_type)
    ids, mask = padded_batch(96)
    before = logits(model, ids, mask)
    layout, batches, kwargs, store = _layer_inputs(model)
    for index, layer in enumerate(model.model.layers):
        assert prune_layer_heads(layer, layout, head_geometry(layer, layout), batches, kwargs[index], store) == 0.0
        for i in range(len(batches)):
            out = layer(store[("x", i)], **kwargs[index][i])
            store[("x", i)] = out[0] if isinstance(out, tuple) else out
    assert relative_error(before, logits(model, ids, mask), mask) <= TOL


def test_local_head_refit_beats_no_refit_on_the_layer_inputs():
    """On gemma2's layer 0 (its real inputs, sandwich norms and soft-capping as written), the o_proj
    refit's output error is below keeping o_proj's rows as they are."""
    from slicelm.steps.heads import choose_heads, head_statistics

    model = build_tiny_model("gemma2")
    layout, batches, kwargs, store = _layer_inputs(model)
    layer = model.model.layers[0]
    stats = head_statistics(
        layer, layout, batches, store, torch.device("cpu"), forward=lambda i, x: layer(x, **kwargs[0][i])
    )
    refit, plain = choose_heads(stats, 2, 1), choose_heads(stats, 2, 1, refit=False)
    assert torch.equal(refit.q_keep, plain.q_keep)
    assert 0 < refit.error < plain.error


def test_local_heads_schedule_reloads_in_stock_transformers(tmp_path):
    """``--schedule heads`` on families without the rotation: one query head fewer per KV group in every
    layer and MLP channels for the rest of the budget; the saved folder is the stock architecture with
    the new head counts and head_dim as before, reloading in a process where ``import slicelm`` fails
    to the in-memory logits. The count is exact and lands within 1% of the budget (or says why)."""
    config = SliceConfig(target_params=0.85, schedule="heads")
    results, reports, configs = _budget_reloads_in_stock(tmp_path, LOCAL_HEAD_FAMILIES, config)
    for model_type, result in results.items():
        dense, report = configs[model_type], reports[model_type]
        heads = report.planning["heads"]
        assert (heads["kv_heads"], heads["q_per_kv"]) == (2, 1)  # 4 query heads over 2 KV heads: one fewer each
        assert result["config"]["num_attention_heads"] == 2 and result["config"]["num_key_value_heads"] == 2
        head_dim = dense.get("head_dim") or dense["hidden_size"] // dense["num_attention_heads"]
        assert result["config"]["head_dim"] == heads["head_dim"] == head_dim == 16  # as before, now explicit
        assert result["shapes"]["model.layers.0.self_attn.q_proj.weight"] == [2 * 16, 64]
        assert result["shapes"]["model.layers.0.self_attn.o_proj.weight"] == [64, 2 * 16]
        assert set(report.head_error) == {"layer0", "layer1", "layer2"}
        written = sum(math.prod(shape) for shape in result["shapes"].values())
        assert written == report.params_after == report.planning["planned_count"] <= report.planning["target_count"]
        widths = report.planning["widths"]
        assert any(result["config"][f] == w < dense[f] for f, w in widths.items())  # the MLPs gave the rest
        assert report.planning["planned_ratio"] >= 0.85 - 0.01 or "note" in report.planning, model_type


def test_local_heads_take_the_mildest_count_the_stock_config_accepts():
    """Gemma 3 270M's shape: 4 query heads on 1 KV head, hidden 640. One head fewer (3) is what the
    executor would take, but stock Gemma3TextConfig wants hidden_size a multiple of the heads even with
    an explicit head_dim: 2 heads are kept, said in a warning; the count is exact for that structure."""
    from slicelm.steps.local import head_fields, plan_local, stock_count

    model = build_tiny_model("gemma3_text", hidden_size=80, num_key_value_heads=1)
    layout, before = resolve(model), sum(p.numel() for p in model.parameters())
    plan = plan_local(model, layout, SliceConfig(target_params=0.85, schedule="heads"), before)
    assert (plan.heads.kv_heads, plan.heads.q_per_kv, plan.heads.head_dim) == (1, 2, 16)
    assert any("refuses a milder removal" in w and "(3)" in w for w in plan.warnings)
    assert plan.planning["planned_count"] == stock_count(model.config, plan.widths | head_fields(plan.heads))


def test_local_heads_schedule_through_the_cli(tmp_path, smollm2_tokenizer, data_dir, capsys):
    """gemma3_text: the heads and the MLPs share the budget, said in one warning; the folder is stock.
    olmo2's q_norm/k_norm normalise all heads together, so removing one would change the others: the
    CLI refuses in one line (exit 2) before loading, writing nothing."""
    from slicelm.cli import main

    for model_type in ("gemma3_text", "olmo2"):
        source = tmp_path / model_type
        build_tiny_model(model_type, vocab_size=len(smollm2_tokenizer)).save_pretrained(source)
        smollm2_tokenizer.save_pretrained(source)
    capsys.readouterr()
    out = tmp_path / "gemma3-heads"
    argv = ["slice", tmp_path / "gemma3_text", "--target-params", 0.996, "--schedule", "heads", *CALIB, "--out", out]
    assert main([str(a) for a in [*argv, "--data-dir", data_dir]]) == 0
    err = capsys.readouterr().err
    assert (
        "one query head fewer per KV group in every layer (4 -> 2 query heads, 2 -> 2 KV, o_proj refit) and MLP" in err
    )
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 2, 16)
    assert "slicelm" not in config and "auto_map" not in config
    report = json.loads((out / "slicelm_report.json").read_text())
    assert report["planning"]["planned_count"] == report["params_after"] <= 0.996 * report["params_before"]

    out = tmp_path / "refused"
    argv = ["slice", tmp_path / "olmo2", "--target-params", 0.996, "--schedule", "heads", *CALIB, "--out", out]
    assert main([str(a) for a in [*argv, "--data-dir", data_dir]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "self_attn.q_norm" in err and "all query heads together" in err
    assert not out.exists()


def _never_pick(router: torch.nn.Module, expert: int):
    """A forward hook that makes ``router`` (a top-k router) never choose ``expert``."""

    def hook(module, args, output):
        router_logits = output[0].clone()
        router_logits[:, expert] = float("-inf")
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, index = torch.topk(probs, module.top_k, dim=-1)
        return router_logits, (weights / weights.sum(-1, keepdim=True)).to(output[1].dtype), index

    return router.register_forward_hook(hook)


def test_moe_refit_uses_only_the_tokens_the_router_sends(tmp_path):
    """A router that never picks expert 1: its refit uses no tokens (channels by weight norms, rows
    unchanged, a note); every other expert is refit on its routed tokens only, weighted by routing."""
    from slicelm.steps.channels import obs_prune
    from slicelm.steps.local import expert_activations, weight_norm_channels

    model = build_tiny_model("qwen3_moe", norm_topk_prob=True)
    for layer in model.model.layers:
        _never_pick(layer.mlp.gate, 1)
    experts = model.model.layers[0].mlp.experts
    dense_gate_up, dense_down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    # Layer 0's inputs are the dense model's: what the experts of layer 0 receive, as the model routes it.
    calib = calibration(**MOE_CALIBRATION)
    caught = {}
    handle = experts.register_forward_pre_hook(lambda m, args: caught.update(args=args))
    with torch.no_grad():
        model(input_ids=torch.stack(calib))
    handle.remove()
    x, index, weights = caught["args"]  # (N, D), (N, k), (N, k)

    report = slice_model(model, calib, SliceConfig(sparsity=0.0, mlp_sparsity=0.25, batch_size=16), progress=False)
    routed = report.calibration["routed"]["layer0"]["experts"]
    assert routed[1] == 0 and sum(routed) == index.numel()  # every (token, slot) pair, none to expert 1
    assert any("layer 0 experts: experts [1] had fewer than" in w and "without a refit" in w for w in report.warnings)
    keep = 24
    kept = weight_norm_channels(dense_gate_up[1], dense_down[1].T, keep)
    assert torch.equal(experts.down_proj[1], dense_down[1][:, kept])  # no refit: the kept columns as they were
    assert torch.equal(experts.gate_up_proj[1], dense_gate_up[1][torch.cat([kept, kept + 32])])
    for expert in (0, 2, 3):
        tokens, slots = torch.nonzero(index == expert, as_tuple=True)
        assert routed[expert] == tokens.numel() > 4 * 32
        dense = SimpleNamespace(gate_up_proj=dense_gate_up, act_fn=experts.act_fn)  # the experts before pruning
        with torch.no_grad():
            h = expert_activations(dense, x[tokens], expert) * weights[tokens, slots, None].float()
        h = h.double()
        result = obs_prune(dense_down[expert].T, h.T @ h / h.shape[0], keep)
        assert torch.equal(
            experts.gate_up_proj[expert], dense_gate_up[expert][torch.cat([result.keep, result.keep + 32])]
        )
        refit = result.weight.T.to(torch.float32)
        assert (experts.down_proj[expert] - refit).abs().max() <= 1e-5 * refit.abs().max()
    assert model.model.layers[0].mlp.gate.weight.shape == (4, 64)  # the router is untouched


def test_qwen2_moe_shared_expert_keeps_its_gate_and_is_pruned():
    model = build_tiny_model("qwen2_moe")
    gate = model.model.layers[0].mlp.shared_expert_gate.weight.detach().clone()
    report = slice_model(
        model, calibration(**MOE_CALIBRATION), SliceConfig(sparsity=0.0, mlp_sparsity=0.25), progress=False
    )
    moe = model.model.layers[0].mlp
    assert torch.equal(moe.shared_expert_gate.weight, gate)
    assert moe.shared_expert.down_proj.weight.shape == (64, 32) and moe.experts.down_proj.shape == (4, 64, 24)
    assert model.model.layers[1].mlp.down_proj.weight.shape == (64, 72)  # the dense layer (mlp_only_layers)
    assert report.plan["mlp_widths"] == {
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 32,
        "intermediate_size": 72,
    }
    assert set(report.mlp_error) == {"layer0", "layer1", "layer2"} and all(e < 0.5 for e in report.mlp_error.values())


def test_local_steps_equal_the_rotation_path_where_both_apply():
    """On Llama, MLP channels pruned without fusing anything equal the plain rotation path's (identity basis)."""
    from slicelm.core.arch import resolve
    from slicelm.steps.local import slice_locally

    ids, mask = padded_batch(96)
    config = SliceConfig(sparsity=0.0, mlp_sparsity=0.25, layout="plain")
    rotated, local = build_tiny_model("llama"), build_tiny_model("llama")
    # Enough tokens for a well-determined refit (4 per channel): the norms' float32 arithmetic differs
    # (folded or not), and an under-determined refit amplifies that (measured 1.4e-4 with 202 tokens).
    slice_model(rotated, calibration(**MOE_CALIBRATION), config, progress=False)
    slice_locally(local, resolve(local), calibration(**MOE_CALIBRATION), config, progress=False)
    assert relative_error(logits(rotated, ids, mask), logits(local, ids, mask), mask) <= 1e-5  # measured 4e-7
    assert type(local).__name__ == "LlamaForCausalLM" and local.config.intermediate_size == 72


def test_unknown_family_with_the_usual_roles_gets_the_local_steps_with_a_note():
    model = build_tiny_model("llama")
    model.config.model_type = "mystery"
    report = slice_model(model, calibration(96), SliceConfig(sparsity=0.0, mlp_sparsity=0.25), progress=False)
    notes = [w for w in report.warnings if "recognised by its roles" in w]
    assert len(notes) == 1 and "the rotation needs a registry entry" in notes[0] and "\n" not in notes[0]
    assert model.model.layers[0].mlp.down_proj.weight.shape == (64, 72)
    other = build_tiny_model("llama")
    other.config.model_type = "mystery"
    with pytest.raises(SlicelmError, match=r"model_type 'mystery' is not supported by the rotation"):
        slice_model(other, calibration(96), SliceConfig(sparsity=0.25), progress=False)


def test_unknown_family_without_the_roles_is_refused_naming_the_missing_role():
    model = build_tiny_model("llama")
    model.config.model_type = "mystery"
    for layer in model.model.layers:
        layer.mlp.w2 = layer.mlp.down_proj
        del layer.mlp.down_proj
    with pytest.raises(
        SlicelmError, match=r"model_type 'mystery' is not supported: .*no MLP output at 'mlp.down_proj'"
    ) as e:
        slice_model(model, calibration(96), SliceConfig(sparsity=0.0, mlp_sparsity=0.25), progress=False)
    assert "\n" not in str(e.value)


def test_granite_residual_multiplier_is_folded_into_the_writers(tmp_path):
    model = _exact_and_round_trip(tmp_path, "granite")
    assert model.config.residual_multiplier == 1.0
    assert model.config.embedding_multiplier == 3.0 and model.config.logits_scaling == 4.0  # these commute


@pytest.mark.parametrize("model_type", ["smollm3", "starcoder2", "qwen3_moe"])
def test_new_rotation_families_are_exact_and_round_trip(tmp_path, model_type):
    _exact_and_round_trip(tmp_path, model_type)


def test_post_layernorm_opt_is_refused_the_rotation_but_gets_the_local_steps(tmp_path):
    """A configuration-level refusal (opt-350m's post-LayerNorm, no final norm module) is the rotation's only."""
    from transformers import AutoModelForCausalLM

    ids, mask = padded_batch(96)
    model = build_tiny_model("opt", do_layer_norm_before=False)
    report = slice_model(
        model, calibration(**MOE_CALIBRATION), SliceConfig(sparsity=0.0, mlp_sparsity=0.25), progress=False
    )
    assert report.plan["mlp_widths"] == {"ffn_dim": 72} and model.config.ffn_dim == 72
    reloaded = AutoModelForCausalLM.from_pretrained(save_sliced(model, tmp_path / "opt"), dtype=torch.float32)
    assert relative_error(logits(model, ids, mask), logits(reloaded.eval(), ids, mask), mask) <= 1e-5


# --------------------------------------------------------------------------------------------------
# Whole layers on the structure-local path (--schedule layers, and auto's candidates there)
# --------------------------------------------------------------------------------------------------
# Families whose layers are all alike (qwen2_moe's tiny config has a dense layer among expert layers);
# llama and smollm3 have the rotation, but whole layers go without it, from the stock config.
LAYER_FAMILIES = ["gemma2", "gemma3_text", "olmo2", "granite", "smollm3", "starcoder2", "qwen3_moe", "mixtral", "llama"]


def test_local_layers_schedule_reloads_in_stock_transformers(tmp_path):
    """``--schedule layers``: the least sensitive layer (by held-out KL, measured with that layer
    skipped) is removed whole and the rest of the budget comes from every MLP; the folder is the stock
    architecture with one layer fewer and its per-layer lists (Gemma's sliding/full layer_types,
    SmolLM3's RoPE/NoPE layers) trimmed to match, reloading where ``import slicelm`` fails to the
    in-memory logits. The count is exact and never above the budget."""
    overrides = {"layer_types": ["full_attention", "sliding_attention", "full_attention"]}
    config = SliceConfig(target_params=0.6, schedule="layers")
    results, reports, dense = _budget_reloads_in_stock(
        tmp_path, LAYER_FAMILIES, config, lambda model_type: overrides if model_type.startswith("gemma") else {}
    )
    for model_type, result in results.items():
        report, before = reports[model_type], dense[model_type]
        sensitivity = report.planning["layer_sensitivity"]
        assert len(sensitivity) == 3 and min(sensitivity) > 0
        dropped = report.planning["dropped_layers"]
        assert dropped == [min(range(3), key=sensitivity.__getitem__)], model_type
        assert not any(name.startswith("model.layers.2.") for name in result["shapes"]), model_type
        for name in ("layer_types", "no_rope_layers"):
            if isinstance(before.get(name), list):
                folder_config = json.loads((tmp_path / f"{model_type}-out" / "config.json").read_text())
                assert folder_config[name] == [v for i, v in enumerate(before[name]) if i not in dropped]
        written = sum(math.prod(shape) for shape in result["shapes"].values())
        assert written == report.params_after == report.planning["planned_count"] <= report.planning["target_count"]


def test_layer_sensitivity_is_the_kl_of_the_model_without_that_layer():
    """The skip hook measures exactly what removing the layer from the model gives."""
    from slicelm.allocate.local import HeldOutKL
    from slicelm.steps.blocks import drop_layers

    model = build_tiny_model("gemma3_text")
    layout = resolve(model)
    measure = HeldOutKL(model, calibration(96, lengths=(40, 24)))
    sensitivity = measure.layer_skip_sensitivity(model, layout)
    for index in range(3):
        without = copy.deepcopy(model)
        drop_layers(without, layout, [index])
        assert measure.score(without) == pytest.approx(sensitivity[index], rel=1e-5, abs=1e-9)
    assert measure.score(model) == pytest.approx(0.0, abs=1e-6)


def test_local_auto_scores_layers_heads_and_mlps_and_keeps_the_lowest(tmp_path):
    """auto on a family without the rotation scores the uniform MLP plan, the mildest heads and the
    least sensitive 1/16, 1/8 and 1/4 of the layers (each with MLPs for the rest of the budget), each
    run on a copy and measured by held-out KL; the lowest is planned, so never worse than uniform MLP.
    Every candidate lands within 1% below the budget; the folder reloads in stock transformers."""
    types = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"] * 4
    model = build_tiny_model("gemma3_text", num_hidden_layers=16, intermediate_size=160, layer_types=types)
    model.save_pretrained(tmp_path / "dense")
    report = slice_model(
        model, calibration(**MOE_CALIBRATION), SliceConfig(target_params=0.8, round_to=1), progress=False
    )
    planning = report.planning
    scores = planning["candidates"]
    assert {"uniform-mlp", "layers-1", "layers-2", "layers-4"} <= set(scores) | set(planning["refused_candidates"])
    assert "uniform-mlp" in scores and len(scores) >= 3 and planning["evaluations"] == len(scores)
    assert planning["chosen"] == min(scores, key=scores.get)
    assert scores[planning["chosen"]] <= scores["uniform-mlp"]
    assert 0.8 * (1 - 0.01) <= planning["planned_ratio"] <= 0.8
    assert any(w.startswith("--schedule auto chose ") for w in report.warnings)
    assert len(planning["layer_sensitivity"]) == 16
    save_sliced(model, tmp_path / "auto")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "auto", dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 16 - len(planning.get("dropped_layers", []))
    ids, mask = padded_batch(96)
    assert relative_error(logits(model, ids, mask), logits(reloaded, ids, mask), mask) <= TOL


def test_layers_schedule_refusals_are_one_line_before_loading(tmp_path, smollm2_tokenizer, data_dir, capsys):
    """qwen2_moe with a dense layer among its expert layers: a stock config with fewer layers would
    rebuild them differently, so --schedule layers is refused in one line (exit 2), nothing written.
    A one-layer model has nothing to remove. --plan-only is refused there too (nothing to plan apart)."""
    from slicelm.cli import main

    for model_type, overrides in (("qwen2_moe", {}), ("gemma2", {"num_hidden_layers": 1})):
        source = tmp_path / model_type
        build_tiny_model(model_type, vocab_size=len(smollm2_tokenizer), **overrides).save_pretrained(source)
        smollm2_tokenizer.save_pretrained(source)
        capsys.readouterr()
        out = tmp_path / f"{model_type}-out"
        argv = ["slice", source, "--target-params", 0.9, "--schedule", "layers", *CALIB, "--out", out]
        assert main([str(a) for a in [*argv, "--data-dir", data_dir]]) == 2, model_type
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "layer" in err, err
        assert not out.exists()
    # The structure-local steps choose and prune in one pass: no separate plan
    out = tmp_path / "plan.json"
    argv = ["slice", tmp_path / "qwen2_moe", "--target-params", 0.99, "--plan-only", *CALIB, "--out", out]
    assert main([str(a) for a in [*argv, "--data-dir", data_dir]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--plan-only" in err and "drop --plan-only" in err
    assert not out.exists()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_moe_auto_scores_the_rotation_beside_the_local_steps(model_type, monkeypatch):
    """The default budget on a mixture of experts that rotates: its experts lose channels only on the local
    tier, so auto is measured there, with the rotation's uniform plan (SliceGPT at the budget) one more scored
    candidate. The lowest KL is kept; when the rotation's plan scores lowest, it is run on the rotation's path
    and gives the model `--schedule uniform` gives (here forced by a stand-in scorer)."""
    from slicelm.allocate import local
    from slicelm.core.resources import count_parameters

    model = build_tiny_model(model_type)
    samples = calibration(**MOE_CALIBRATION)
    measured = copy.deepcopy(model)
    report = slice_model(measured, samples, SliceConfig(target_params=0.85, round_to=4), progress=False)
    scores = report.planning["candidates"]
    assert {"uniform-mlp", "uniform-stream"} <= set(scores) and report.planning["chosen"] == min(scores, key=scores.get)
    assert any(w.startswith("--schedule auto chose ") for w in report.warnings)

    hidden = model.config.hidden_size

    def rotated_scores_lowest(self, candidate):  # a stand-in scorer: 0 for a rotated (narrower) stream
        return 0.0 if candidate.get_input_embeddings().weight.shape[1] < hidden else 1.0

    monkeypatch.setattr(local.HeldOutKL, "score", rotated_scores_lowest)
    chosen = copy.deepcopy(model)
    report = slice_model(chosen, samples, SliceConfig(target_params=0.85, round_to=4), progress=False)
    assert report.planning["chosen"] == "uniform-stream" and report.planning["schedule"] == "auto"
    assert any(w.startswith("--schedule auto chose uniform-stream") for w in report.warnings)
    uniform = copy.deepcopy(model)
    slice_model(uniform, samples, SliceConfig(target_params=0.85, round_to=4, schedule="uniform"), progress=False)
    ids, mask = padded_batch(96)
    assert count_parameters(chosen) == count_parameters(uniform) < count_parameters(model)
    torch.testing.assert_close(logits(chosen, ids, mask), logits(uniform, ids, mask), rtol=0, atol=0)


def test_moe_default_budget_only_the_rotation_meets_runs_through_the_cli(tmp_path, smollm2_tokenizer, data_dir, capsys):
    """The real tokenizer's embeddings hold most of a tiny Qwen3-MoE's parameters: MLP channels, heads and
    whole layers cannot reach 0.85, the rotation can. The default command checks that before loading (the
    rotation's uniform plan is one of auto's candidates there), runs, and writes a folder that reloads."""
    from slicelm.cli import main

    source = folder_with_tokenizer(tmp_path, "qwen3_moe", smollm2_tokenizer)
    capsys.readouterr()
    argv = ["slice", source, "--target-params", 0.85, *CALIB, "--out", tmp_path / "out", "--data-dir", data_dir]
    assert main([str(a) for a in argv]) == 0
    assert "--schedule auto: only uniform-stream could be planned" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "slicelm_report.json").read_text())
    assert report["planning"]["chosen"] == "uniform-stream"
    assert report["params_after"] <= 0.85 * report["params_before"]
    reloaded = load_sliced(tmp_path / "out")
    assert sum(p.numel() for p in reloaded.parameters()) == report["params_after"]
