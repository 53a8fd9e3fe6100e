"""The plain layout: one basis, no shortcuts, the original architecture with smaller widths."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build_tiny_model
from helpers import calibration, logits, padded_batch, relative_error

from slicelm.arch import REGISTRY
from slicelm.checkpoint import save_sliced
from slicelm.errors import SlicelmError
from slicelm.plain import calibrated_diagonal, diagonal_error, to_stock_model
from slicelm.slicing import SliceConfig, slice_model

RMS_FAMILIES = sorted(t for t, spec in REGISTRY.items() if spec.norm == "rms")
LAYERNORM_FAMILIES = sorted(t for t, spec in REGISTRY.items() if spec.norm == "layer")
TOL = 1e-4
GREEDY = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


def plain_slice(model_type, sparsity, tied=False, **config):
    model = build_tiny_model(model_type, tie_word_embeddings=tied)
    report = slice_model(model, calibration(96), SliceConfig(sparsity=sparsity, layout="plain", **config), progress=False)
    return model, report


@pytest.mark.parametrize("model_type", RMS_FAMILIES)
def test_plain_at_sparsity_zero_is_exact_untied(model_type):
    ids, mask = padded_batch(96)
    before = logits(build_tiny_model(model_type), ids, mask)
    model, _ = plain_slice(model_type, 0.0)
    stock = to_stock_model(model)
    assert type(stock).__name__ == type(build_tiny_model(model_type)).__name__  # the original class
    assert relative_error(before, logits(stock, ids, mask), mask) <= TOL


@pytest.mark.parametrize("model_type", RMS_FAMILIES)
def test_plain_at_sparsity_zero_is_exact_tied_with_channel_selection(model_type):
    """A tied head with a rotation needs the diagonal approximation (see below); selecting channels
    (a permutation) commutes with the final norm, so the tied plain layout is exact."""
    ids, mask = padded_batch(96)
    before = logits(build_tiny_model(model_type, tie_word_embeddings=True), ids, mask)
    model, report = plain_slice(model_type, 0.0, tied=True, basis="channels")
    stock = to_stock_model(model)
    assert stock.lm_head.weight is stock.get_input_embeddings().weight
    assert relative_error(before, logits(stock, ids, mask), mask) <= TOL
    assert report.tied_final_norm_error < 1e-6


@pytest.mark.parametrize("model_type", RMS_FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_stock_export_equals_the_sliced_model(model_type, tied):
    """At 25% the conversion to the stock architecture is exact: norms, epsilon, head_dim, scales."""
    ids, mask = padded_batch(96)
    model, report = plain_slice(model_type, 0.25, tied=tied)
    stock = to_stock_model(model)
    assert stock.config.hidden_size == report.plan["embedding"] == 48
    assert not hasattr(stock.config, "slicelm") and not getattr(stock.config, "auto_map", None)
    assert relative_error(logits(model, ids, mask), logits(stock, ids, mask), mask) <= 2e-5
    assert sum(p.numel() for p in stock.parameters()) == report.params_after  # what is saved


def test_calibrated_diagonal_is_the_best_diagonal():
    gen = torch.Generator().manual_seed(0)
    k = 12
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    w = 1.0 + 0.4 * torch.randn(k, generator=gen, dtype=torch.float64)
    m = q.T @ torch.diag(w) @ q
    e = torch.randn(50, k, generator=gen, dtype=torch.float64)
    y = torch.randn(300, k, generator=gen, dtype=torch.float64) * torch.linspace(2, 0.2, k, dtype=torch.float64)
    gram, moment = e.T @ e, y.T @ y
    best = calibrated_diagonal(m, gram, moment)
    error = diagonal_error(m, best, gram, moment)
    assert error < diagonal_error(m, torch.diagonal(m), gram, moment)  # better than the naive diagonal
    for _ in range(20):  # and than any nearby diagonal
        other = best + 0.05 * torch.randn(k, generator=gen, dtype=torch.float64)
        assert error <= diagonal_error(m, other, gram, moment)
    d = torch.diag(w)
    assert torch.allclose(calibrated_diagonal(d, gram, moment), w)  # a diagonal is kept as it is


def test_tied_pca_error_comes_only_from_the_final_norm():
    """With a uniform final-norm scale the rotated tied plain model is exact too."""
    ids, mask = padded_batch(96)
    model = build_tiny_model("llama", tie_word_embeddings=True)
    with torch.no_grad():
        model.model.norm.weight.fill_(1.7)
    before = logits(model, ids, mask)
    report = slice_model(model, calibration(96), SliceConfig(sparsity=0.0, layout="plain"), progress=False)
    assert report.tied_final_norm_error < 1e-6
    assert relative_error(before, logits(to_stock_model(model), ids, mask), mask) <= TOL


@pytest.mark.parametrize("model_type", LAYERNORM_FAMILIES)
def test_layernorm_families_are_refused(model_type):
    with pytest.raises(SlicelmError, match="--layout plain needs an RMSNorm model"):
        plain_slice(model_type, 0.25)


@pytest.fixture(scope="module")
def saved_plain(tmp_path_factory):
    """{case: (logits, greedy tokens, folder)} of plain folders, tied and untied, with pruned MLPs."""
    ids, mask = padded_batch(96)
    root = tmp_path_factory.mktemp("plain")
    saved = {}
    for model_type, tied in (("llama", True), ("llama", False), ("qwen3", False), ("gemma", True), ("phi3", False)):
        model, _ = plain_slice(model_type, 0.25, tied=tied, mlp_sparsity=0.25)
        out = save_sliced(model, root / f"{model_type}-{tied}")
        saved[f"{model_type}-{tied}"] = (logits(model, ids, mask), model.generate(ids[:1, :6], **GREEDY), out)
    return saved


def test_plain_folder_holds_no_remote_code_and_a_stock_config(saved_plain):
    from transformers import AutoConfig

    for _, _, folder in saved_plain.values():
        names = {p.name for p in folder.iterdir()}
        assert "model.safetensors" in names and "config.json" in names
        assert not [n for n in names if n.endswith((".py", ".bin", ".pt", ".pth", ".pkl"))]
        raw = json.loads((folder / "config.json").read_text())
        assert "auto_map" not in raw and "slicelm" not in raw
        config = AutoConfig.from_pretrained(folder)  # validates as the stock config class
        assert config.hidden_size == 48 and config.intermediate_size == 72
        assert config.head_dim == 16


def test_plain_folder_loads_in_stock_transformers_without_slicelm(saved_plain):
    ids, mask = padded_batch(96)
    folders = {case: str(entry[2]) for case, entry in saved_plain.items()}
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["slicelm"] = None
        import torch
        from transformers import AutoModelForCausalLM
        ids, mask = torch.tensor({ids.tolist()}), torch.tensor({mask.tolist()})
        results = {{}}
        for case, folder in {folders!r}.items():
            model = AutoModelForCausalLM.from_pretrained(folder)  # no trust_remote_code
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask).logits
            tokens = model.generate(ids[:1, :6], **{GREEDY!r})
            results[case] = {{"logits": out.tolist(), "tokens": tokens.tolist(), "cls": type(model).__module__}}
        print(json.dumps(results))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for case, (expected, tokens, _) in saved_plain.items():
        assert got[case]["cls"].startswith("transformers.models.")
        assert relative_error(expected, torch.tensor(got[case]["logits"]), mask) <= 2e-5, case
        assert got[case]["tokens"] == tokens.tolist(), case
