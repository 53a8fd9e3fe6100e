"""Reliability of the numbers: a damaged model must be refused, never measured (issue 23).

Each test damages a sliced (slicegpt-layout) folder and asserts that every command that loads it, and
the folder's own modeling file under plain transformers, refuses it in one line instead of reporting
a perplexity of ``null`` or an accuracy of NaN logits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_checks import CALIB, assert_one_line_error, run_cli, save_model_folder

from slicelm.cli import main

SHORTCUT = "model.layers.1.attn_shortcut.weight"


@pytest.fixture(scope="module")
def slicegpt_folder(tmp_path_factory, smollm2_tokenizer, data_dir) -> Path:
    root = tmp_path_factory.mktemp("numerics")
    dense = save_model_folder(root / "dense", smollm2_tokenizer, tie_word_embeddings=True)
    out = root / "sliced"
    argv = ["slice", dense, "--sparsity", 0.25, *CALIB, "--data-dir", data_dir, "--out", out]
    assert main([str(a) for a in argv]) == 0
    return out


def damaged(folder: Path, tmp_path: Path, how: str) -> Path:
    """A copy of ``folder`` whose safetensors file has a NaN in a shortcut, or is truncated."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / how
    shutil.copytree(folder, copy)
    weights = copy / "model.safetensors"
    if how == "nan":
        tensors = load_file(weights)
        tensors[SHORTCUT][0, 0] = float("nan")
        save_file(tensors, weights, metadata={"format": "pt"})
    elif how == "inf-bits":  # a flipped exponent: the bytes of one float become inf
        tensors = load_file(weights)
        tensors[SHORTCUT][1, 2] = float("inf")
        save_file(tensors, weights, metadata={"format": "pt"})
    else:  # truncated
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    return copy


FT = ["--tokens", "256", "--seqlen", "32", "--batch-size", "2", "--eval-windows", "1", "--quiet"]


@pytest.mark.parametrize("how", ["nan", "inf-bits", "truncated"])
def test_s4_and_rough_1_damaged_slicegpt_folders_are_refused_by_every_command(
    how, slicegpt_folder, tmp_path, capsys, data_dir
):
    folder = damaged(slicegpt_folder, tmp_path, how)
    fragment = "holds non-finite values" if how != "truncated" else "cannot read the weights"
    out = tmp_path / "out"
    commands = {
        "ppl": ["ppl", folder, "--seqlen", 32, "--max-windows", 2, "--data-dir", data_dir, "--quiet"],
        "eval": ["eval", folder, "--tasks", "piqa", "--limit", 2, "--data-dir", data_dir, "--output", out / "e.json"],
        "finetune": ["finetune", folder, "--data", "c4", *FT, "--data-dir", data_dir, "--out", out],
    }
    for name, argv in commands.items():
        code, stdout, lines = run_cli(argv, capsys)
        assert_one_line_error(code, lines, fragment)
        assert stdout == "", name
        assert not out.exists() and not Path(f"{out}.slicelm-work").exists(), name


def test_s4_the_folders_own_modeling_file_refuses_non_finite_weights(slicegpt_folder, tmp_path):
    folder = damaged(slicegpt_folder, tmp_path, "nan")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["slicelm"] = None
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
            print("loaded")
        except Exception as error:
            print(str(error).splitlines()[0])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert f"tensor {SHORTCUT} holds non-finite values" in last, last


def test_rough_3_pickled_checkpoints_are_refused_with_the_reason(tmp_path, smollm2_tokenizer, capsys, data_dir):
    """A folder of ``pytorch_model.bin`` only: slicelm loads safetensors only (a pickle can run code)."""
    import torch
    from safetensors.torch import load_file

    folder = save_model_folder(tmp_path / "pickled", smollm2_tokenizer)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    before = sorted(p.name for p in folder.iterdir())
    for argv in (
        ["ppl", folder, "--seqlen", 32, "--max-windows", 1, "--data-dir", data_dir, "--quiet"],
        ["slice", folder, "--sparsity", 0.25, *CALIB, "--data-dir", data_dir, "--out", tmp_path / "out"],
    ):
        code, _, lines = run_cli(argv, capsys)
        assert_one_line_error(code, lines, "slicelm loads safetensors weights only", "pytorch_model.bin")
    assert sorted(p.name for p in folder.iterdir()) == before and not (tmp_path / "out").exists()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
