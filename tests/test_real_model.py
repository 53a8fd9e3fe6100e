"""SmolLM2-135M (the real GGUF, dequantised to float32): exactness, slicing, save/load, perplexity band."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from conftest import cores_per_worker
from helpers import relative_error

import slicelm
from slicelm.core.arch import resolve
from slicelm.core.fuse import fuse_norms
from slicelm.layouts.checkpoint import load_sliced, save_sliced
from slicelm.slicing import SliceConfig, slice_model

pytestmark = pytest.mark.real_model


@pytest.fixture(autouse=True, scope="module")
def all_threads():
    """A 135M model is worth this process's share of the cores (conftest keeps tiny models on one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(cores_per_worker())
    yield
    torch.set_num_threads(before)


SENTENCES = [
    "The capital of France is Paris, and the capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Once upon a time",
]


@pytest.fixture(scope="module")
def batch(smollm2):
    _, tokenizer = smollm2
    enc = tokenizer(SENTENCES, return_tensors="pt", padding=True)  # a padded batch
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def reference(smollm2, batch):
    model, _ = smollm2
    with torch.no_grad():
        return model(input_ids=batch[0], attention_mask=batch[1]).logits


@pytest.fixture(scope="module")
def calibration(smollm2, data_dir):
    from slicelm.io.data import load_calibration

    return load_calibration("c4", smollm2[1], n_samples=8, seqlen=128, seed=0, data_dir=data_dir)


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch[0], attention_mask=batch[1]).logits


def test_fused_smollm2_is_exact(smollm2, batch, reference):
    model = copy.deepcopy(smollm2[0])
    fuse_norms(model, resolve(model))  # folds every scale, the final one into an untied head
    assert relative_error(reference, _logits(model, batch), batch[1]) <= 1e-4


@pytest.fixture(scope="module")
def rotated(smollm2, calibration):
    """SmolLM2 PCA-rotated at sparsity 0 (head kept tied), in the slicegpt layout (a basis per point,
    shortcuts): at full width a config plans the stock architecture, so the layout is followed as a plan."""
    model = copy.deepcopy(smollm2[0])
    config = SliceConfig(sparsity=0.0, batch_size=4)
    plan = replace(slicelm.plan(model, calibration, config, progress=False), layout="slicegpt")
    slice_model(model, calibration, config, plan=plan, progress=False)
    return model


def test_rotated_smollm2_is_exact(rotated, batch, reference):
    assert relative_error(reference, _logits(rotated, batch), batch[1]) <= 1e-4


def test_rotated_smollm2_reloads_exactly(rotated, batch, reference, tmp_path):
    save_sliced(rotated, tmp_path / "rotated")
    reloaded = load_sliced(tmp_path / "rotated")
    assert relative_error(reference, _logits(reloaded, batch), batch[1]) <= 1e-4
    assert relative_error(_logits(rotated, batch), _logits(reloaded, batch), batch[1]) <= 1e-5


@pytest.fixture(scope="module")
def sliced(smollm2, calibration, tmp_path_factory):
    """SmolLM2 sliced at 25% and saved with its tokenizer: (model, folder)."""
    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    report = slice_model(model, calibration, SliceConfig(sparsity=0.25, batch_size=4), progress=False)
    out = tmp_path_factory.mktemp("real") / "smollm2-sliced"
    save_sliced(model, out, tokenizer, report=report.to_dict())
    return model, out


def test_sliced_smollm2_is_smaller_and_differs(sliced, smollm2, batch, reference):
    model, _ = sliced
    assert model.model.embed_tokens.weight.shape == (
        49152,
        576,
    )  # tied head not sliced: shared matrix full width
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (576, 576)
    assert model.model.layers[1].self_attn.q_proj.weight.shape == (576, 432)
    assert sum(p.numel() for p in model.parameters()) < 0.9 * sum(p.numel() for p in smollm2[0].parameters())
    assert relative_error(reference, _logits(model, batch), batch[1]) > 1e-3


def test_sliced_smollm2_generates_the_same_after_reload(sliced, batch):
    model, out = sliced
    prompt = batch[0][:1, : int(batch[1][0].sum())]
    greedy = dict(max_new_tokens=12, do_sample=False)
    expected = model.generate(prompt, **greedy)
    assert torch.equal(load_sliced(out).generate(prompt, **greedy), expected)
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["slicelm"] = None
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
        prompt = tokenizer({SENTENCES[0]!r}, return_tensors="pt").input_ids
        print(json.dumps(model.generate(prompt, max_new_tokens=12, do_sample=False).tolist()))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected.tolist()


def test_sliced_smollm2_perplexity_band(sliced, smollm2, data_dir):
    """Dense WikiText-2 ppl on 2 x 512 windows is ~28; 25% slicing with tiny calibration hurts a lot."""
    from slicelm.io.data import load_eval_ids
    from slicelm.measure.perplexity import perplexity

    ids = load_eval_ids("wikitext2", smollm2[1], data_dir=data_dir)
    dense = perplexity(smollm2[0], ids, seqlen=512, max_windows=2, progress=False).ppl
    sliced = perplexity(sliced[0], ids, seqlen=512, max_windows=2, progress=False).ppl
    assert 20 < dense < 40
    assert 1.5 * dense < sliced < 50 * dense


@pytest.fixture(scope="module")
def plain_pruned(smollm2, data_dir, tmp_path_factory):
    """SmolLM2 with 25% of its MLP channels pruned, in the plain layout, saved stock: (model, folder).

    The refit needs several times more calibration tokens than MLP channels (1,536): 16 x 512.
    """
    from slicelm.io.data import load_calibration

    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    samples = load_calibration("c4", tokenizer, n_samples=16, seqlen=512, seed=0, data_dir=data_dir)
    config = SliceConfig(sparsity=0.0, mlp_sparsity=0.25, layout="plain", batch_size=4)
    report = slice_model(model, samples, config, progress=False)
    out = tmp_path_factory.mktemp("real") / "smollm2-plain"
    save_sliced(model, out, tokenizer, report=report.to_dict())
    return model, out


def test_plain_pruned_smollm2_loads_in_stock_transformers_and_keeps_quality(plain_pruned, smollm2, data_dir):
    """The deployable product: the stock Llama class, tied head kept, 0.85x parameters, and (even with
    8k calibration tokens) far less damage than 25% stream slicing."""
    from transformers import AutoModelForCausalLM

    from slicelm.io.data import load_eval_ids
    from slicelm.measure.perplexity import perplexity

    model, out = plain_pruned
    stock = AutoModelForCausalLM.from_pretrained(out)
    assert type(stock).__name__ == "LlamaForCausalLM" and not (out / "modeling_slicelm.py").exists()
    assert stock.lm_head.weight is stock.model.embed_tokens.weight
    assert stock.config.intermediate_size == 1152 and stock.config.hidden_size == 576
    params = sum(p.numel() for p in stock.parameters())
    assert 0.84 < params / sum(p.numel() for p in smollm2[0].parameters()) < 0.86
    ids = load_eval_ids("wikitext2", smollm2[1], data_dir=data_dir)
    dense = perplexity(smollm2[0], ids, seqlen=512, max_windows=2, progress=False).ppl
    pruned = perplexity(stock, ids, seqlen=512, max_windows=2, progress=False).ppl
    assert pruned == pytest.approx(perplexity(model, ids, seqlen=512, max_windows=2, progress=False).ppl, rel=1e-4)
    assert dense < pruned < 2.5 * dense
