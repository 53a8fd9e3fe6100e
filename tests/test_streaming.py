"""Layer streaming gives exactly the weights of in-memory slicing, in bounded memory."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model
from helpers import calibration, logits, padded_batch, relative_error
from safetensors.torch import load_file

from slicelm.core.offload import ActivationStore, parse_bytes
from slicelm.layouts.checkpoint import load_sliced
from slicelm.slicing import SliceConfig, slice_model
from slicelm.streaming import slice_streaming


def _saved_tensors(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(folder / shard))
    return out


@pytest.mark.parametrize(
    "model_type,tied,max_memory",
    [
        ("llama", True, None),
        ("llama", False, 4096),
        ("qwen2", False, None),
        ("opt", True, None),
        ("gpt2", True, 0),
    ],
)
def test_streamed_equals_in_memory(model_type, tied, max_memory, tmp_path):
    source = tmp_path / "source"
    build_tiny_model(model_type, tie_word_embeddings=tied).save_pretrained(source)
    samples = calibration(96)
    config = SliceConfig(sparsity=0.25, batch_size=3)

    in_memory = build_tiny_model(model_type, tie_word_embeddings=tied)
    slice_model(in_memory, samples, config, progress=False)
    expected = in_memory.state_dict()

    out = tmp_path / "streamed"
    report = slice_streaming(
        source, out, samples, config, max_memory=max_memory, offload_dir=tmp_path / "off", progress=False
    )
    if max_memory is not None:
        assert report.calibration["activations_spilled_to_disk"] > 0
    assert not list((tmp_path / "off").glob("*/*")) if (tmp_path / "off").exists() else True
    streamed = _saved_tensors(out)
    tied_head = getattr(in_memory.config, "tie_word_embeddings", False)
    expected_keys = {k for k in expected if not (tied_head and k == "lm_head.weight")}
    assert set(streamed) == expected_keys
    for key in expected_keys:
        scale = expected[key].abs().max().clamp_min(1e-12)
        assert ((streamed[key] - expected[key]).abs().max() / scale).item() <= 1e-6, key

    reloaded = load_sliced(out)
    ids, mask = padded_batch(96)
    assert relative_error(logits(in_memory, ids, mask), logits(reloaded, ids, mask), mask) <= 1e-5
    assert json.loads((out / "slicelm_report.json").read_text())["streamed"] is True


@pytest.mark.parametrize(
    "model_type,tied,extra",
    [
        ("llama", True, {"layout": "plain", "mlp_sparsity": 0.25}),
        ("gemma", True, {"layout": "plain"}),
        ("qwen2", False, {"layout": "plain"}),
        ("llama", False, {"mlp_sparsity": 0.25}),
        ("llama", False, {"target_params": 0.8, "schedule": "proxy", "round_to": 4}),
    ],
)
def test_new_steps_stream_too(model_type, tied, extra, tmp_path):
    """Plain layout, MLP pruning and budgets (with their statistics pass) give the same model streamed."""
    from transformers import AutoModelForCausalLM

    from slicelm.layouts.checkpoint import save_sliced

    source = tmp_path / "source"
    build_tiny_model(model_type, tie_word_embeddings=tied).save_pretrained(source)
    samples = calibration(96)
    config = SliceConfig(sparsity=0.25 if "target_params" not in extra else 0.0, batch_size=3, **extra)
    in_memory = build_tiny_model(model_type, tie_word_embeddings=tied)
    report = slice_model(in_memory, samples, config, progress=False)
    save_sliced(in_memory, tmp_path / "memory")
    streamed_report = slice_streaming(source, tmp_path / "streamed", samples, config, max_memory=2048, progress=False)
    assert streamed_report.plan == report.plan and streamed_report.params_after == report.params_after
    ids, mask = padded_batch(96)
    load = AutoModelForCausalLM.from_pretrained if extra.get("layout") == "plain" else load_sliced
    expected = logits(load(tmp_path / "memory"), ids, mask)
    assert relative_error(expected, logits(load(tmp_path / "streamed"), ids, mask), mask) <= 1e-5


def test_activation_store_spills_and_reads_back(tmp_path):
    store = ActivationStore(max_bytes=100, offload_dir=tmp_path)
    small, big = torch.randn(4), torch.randn(8, 16)
    store["a"], store["b"] = small, big
    assert store.spilled == 1 and store.ram_bytes == 16
    torch.testing.assert_close(store["b"], big)
    store["b"] = big * 2  # overwrite a spilled entry
    torch.testing.assert_close(store["b"], big * 2)
    del store["b"]
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("512MB") == 512 * 10**6 and parse_bytes("100") == 100
    with pytest.raises(ValueError):
        parse_bytes("lots")
