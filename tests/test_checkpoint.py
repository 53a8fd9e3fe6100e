"""Sliced folders are ordinary Hugging Face checkpoints: safetensors, remote code, same outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build_tiny_model
from helpers import calibration, logits, padded_batch, relative_error

from slicelm.core.arch import REGISTRY
from slicelm.errors import SlicelmError
from slicelm.layouts.checkpoint import load_sliced, save_sliced
from slicelm.slicing import SliceConfig, slice_model


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def saved(request, tmp_path_factory):
    """(sliced in-memory model, folder it was saved to)."""
    model = build_tiny_model("llama", tie_word_embeddings=request.param)
    report = slice_model(model, calibration(96), SliceConfig(sparsity=0.25), progress=False)
    out = tmp_path_factory.mktemp("ckpt") / "sliced"
    save_sliced(model, out, metadata={"source_model": "tiny-llama"}, report=report.to_dict())
    return model, out


def test_folder_contents(saved):
    model, out = saved
    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "modeling_slicelm.py",
        "slicing_plan.json",
        "slicelm_report.json",
    } <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_slicelm.SlicedLlamaForCausalLM"
    info = config["slicelm"]
    assert info["source_model"] == "tiny-llama" and info["version"]
    assert info["plan"]["embedding"] == (64 if model.config.tie_word_embeddings else 48)  # kept tie: full width
    assert json.loads((out / "slicing_plan.json").read_text()) == info["plan"]
    assert not list(out.parent.glob(".sliced*")), "temporary folder left behind"


def test_reload_through_slicelm_gives_same_logits_and_generation(saved):
    model, out = saved
    ids, mask = padded_batch(96)
    reloaded = load_sliced(out)
    assert type(reloaded).__name__ == "SlicedLlamaForCausalLM"
    assert relative_error(logits(model, ids, mask), logits(reloaded, ids, mask), mask) <= 1e-5
    prompt = ids[:1, :6]
    greedy = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **greedy), reloaded.generate(prompt, **greedy))


def test_plain_transformers_loads_it_without_slicelm(saved):
    """A fresh interpreter where `import slicelm` fails must still load and run the folder."""
    model, out = saved
    ids, mask = padded_batch(96)
    prompt = ids[:1, :6]
    expected_logits = logits(model, ids, mask)
    expected_tokens = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["slicelm"] = None  # make sure the checkpoint does not need slicelm
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        ids, mask = torch.tensor({ids.tolist()}), torch.tensor({mask.tolist()})
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(torch.tensor({prompt.tolist()}), max_new_tokens=10, do_sample=False, pad_token_id=0)
        print(json.dumps({{"logits": out.tolist(), "tokens": tokens.tolist(), "cls": type(model).__name__}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=out.parent, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["cls"] == "SlicedLlamaForCausalLM"
    assert relative_error(expected_logits, torch.tensor(got["logits"]), mask) <= 1e-5
    assert got["tokens"] == expected_tokens.tolist()


def test_existing_output_needs_overwrite(saved, tmp_path):
    model, _ = saved
    out = tmp_path / "out"
    save_sliced(model, out)
    first = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(SlicelmError, match="already exists.*--overwrite"):
        save_sliced(model, out)
    save_sliced(model, out, overwrite=True)  # a slicelm output may be replaced
    assert (out / "model.safetensors").stat().st_mtime_ns >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temporary or lock files left behind"


def test_overwrite_never_replaces_a_folder_slicelm_did_not_write(saved, tmp_path):
    model, _ = saved
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SlicelmError, match="only replaces folders slicelm wrote"):
        save_sliced(model, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"


def test_unsliced_model_cannot_be_saved_as_sliced(tmp_path):
    with pytest.raises(SlicelmError, match="not sliced"):
        save_sliced(build_tiny_model("llama"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------
# Every registered architecture round-trips, through slicelm and through plain transformers
# --------------------------------------------------------------------------------------------------
FAMILY_CASES = [(t, tied) for t in sorted(REGISTRY) for tied in (False, True)]
GREEDY = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


def _case_id(model_type: str, tied: bool) -> str:
    return f"{model_type}-{'tied' if tied else 'untied'}"


@pytest.fixture(scope="module")
def saved_families(tmp_path_factory):
    """{(model_type, tied): (logits, greedy tokens, class name, folder)} of a sliced model per case."""
    root = tmp_path_factory.mktemp("families")
    ids, mask = padded_batch(96)
    saved = {}
    for model_type, tied in FAMILY_CASES:
        model = build_tiny_model(model_type, tie_word_embeddings=tied)
        slice_model(model, calibration(96), SliceConfig(sparsity=0.25), progress=False)
        out = save_sliced(model, root / _case_id(model_type, tied))
        tokens = model.generate(ids[:1, :6], **GREEDY)
        saved[(model_type, tied)] = (logits(model, ids, mask), tokens, type(model).__name__, out)
    return saved


@pytest.mark.parametrize("model_type,tied", FAMILY_CASES, ids=[_case_id(*c) for c in FAMILY_CASES])
def test_every_family_reloads_through_slicelm(saved_families, model_type, tied):
    expected_logits, expected_tokens, cls, out = saved_families[(model_type, tied)]
    ids, mask = padded_batch(96)
    reloaded = load_sliced(out)
    assert type(reloaded).__name__ == cls
    assert relative_error(expected_logits, logits(reloaded, ids, mask), mask) <= 1e-5
    assert torch.equal(reloaded.generate(ids[:1, :6], **GREEDY), expected_tokens)


def test_plain_transformers_loads_every_family(saved_families):
    """One fresh interpreter without slicelm loads every family's folder with remote code."""
    ids, mask = padded_batch(96)
    folders = {_case_id(*case): str(entry[3]) for case, entry in saved_families.items()}
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["slicelm"] = None  # make sure the checkpoints do not need slicelm
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(1)  # tiny models: threads only add overhead
        ids, mask = torch.tensor({ids.tolist()}), torch.tensor({mask.tolist()})
        results = {{}}
        for case, folder in {folders!r}.items():
            try:
                model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
                with torch.no_grad():
                    out = model(input_ids=ids, attention_mask=mask).logits
                tokens = model.generate(ids[:1, :6], **{GREEDY!r})
                cls = type(model).__name__
                results[case] = {{"logits": out.tolist(), "tokens": tokens.tolist(), "cls": cls}}
            except Exception as error:  # report every family, not just the first failure
                results[case] = {{"error": repr(error)}}
        print(json.dumps(results))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    problems = []
    for case, (expected_logits, expected_tokens, cls, _) in saved_families.items():
        name = _case_id(*case)
        entry = got[name]
        if "error" in entry:
            problems.append(f"{name}: {entry['error']}")
            continue
        error = relative_error(expected_logits, torch.tensor(entry["logits"]), mask)
        if entry["cls"] != cls or error > 1e-5 or entry["tokens"] != expected_tokens.tolist():
            problems.append(f"{name}: {entry['cls']}, logit error {error:.2e}, tokens {entry['tokens']}")
    assert not problems, "\n".join(problems)


def test_checkpoint_with_missing_tensor_is_refused(saved, tmp_path):
    """A tensor missing from the file must fail loudly, not be silently initialised at random."""
    import shutil

    from safetensors.torch import load_file, save_file

    _, out = saved
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.attn_shortcut.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SlicelmError, match="does not match its slicing plan: 1 missing keys"):
        load_sliced(broken)


def test_missing_parent_folders_are_created(saved, tmp_path):
    model, _ = saved
    out = tmp_path / "new" / "nested" / "sliced"
    save_sliced(model, out)
    assert (out / "model.safetensors").is_file()
