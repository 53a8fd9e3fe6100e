"""`slicelm slice` end to end on a tiny model, and every user mistake -> one line, exit 2, no output."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model

from slicelm.cli import main
from slicelm.layouts.checkpoint import load_sliced


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama with SmolLM2's real tokenizer, saved as a normal HF folder."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model = build_tiny_model("llama", vocab_size=len(smollm2_tokenizer), tie_word_embeddings=True, pad_token_id=2)
    model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def run_cli(argv, capsys):
    """(exit code, stdout, the last line of stderr: progress bars of loading may precede an error)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.replace("\r", "\n").splitlines() if line.strip()]
    return code, captured.out, (lines[-1] + "\n") if lines else ""


def test_slice_writes_a_loadable_folder_with_report(tiny_folder, tmp_path, data_dir, capsys):
    out = tmp_path / "sliced"
    argv = [
        "slice",
        tiny_folder,
        "--sparsity",
        0.25,
        "--calib",
        "c4",
        "--calib-samples",
        4,
        "--calib-seqlen",
        32,
        "--batch-size",
        2,
        "--data-dir",
        data_dir,
        "--out",
        out,
        "--quiet",
    ]
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["params_after"] < summary["params_before"]  # the tie is kept by default
    report = json.loads((out / "slicelm_report.json").read_text())
    expected = {"dataset": "c4", "samples": 4, "seqlen": 32, "seed": 42, "batch_size": 2, "max_seqlen": 32}
    assert expected.items() <= report["calibration"].items()
    assert 4 <= report["calibration"]["tokens"] <= 4 * 32
    assert len(report["explained_variance"]) == 1 + 2 * 3
    assert report["plan"]["embedding"] == 64 and report["seconds"]["total"] > 0  # tied, head not sliced
    assert report["peak_memory"]["peak_rss_gib"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["slicelm"]["source_model"] == str(tiny_folder)
    assert config["slicelm"]["calibration"]["dataset"] == "c4"
    model = load_sliced(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, model.config.vocab_size)


BAD_INPUTS = [
    (["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["--sparsity", "-0.5"], "--sparsity must be in [0, 1)"),
    (["--sparsity", "0.2", "--calib", "nonsense"], "unknown calibration set 'nonsense'"),
    (["--sparsity", "0.2", "--calib", "missing.txt"], "calibration file missing.txt does not exist"),
    (["--sparsity", "0.2", "--calib-samples", "0"], "--calib-samples must be a positive integer"),
]


@pytest.mark.parametrize("extra,message", BAD_INPUTS)
def test_bad_flags_fail_before_any_work(extra, message, tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["slice", tiny_folder, *extra, "--out", out], capsys)
    assert code == 2
    assert stderr.startswith("slicelm: error: ") and message in stderr and stderr.count("\n") == 1
    assert not out.exists()


def test_existing_output_without_overwrite(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, _, stderr = run_cli(["slice", tiny_folder, "--sparsity", 0.2, "--out", out], capsys)
    assert code == 2 and "already exists; choose another --out or pass --overwrite" in stderr
    assert list(out.iterdir()) == []


def test_unsupported_model_type(tmp_path, capsys, data_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "bloom"
    config = AutoConfig.for_model("bloom", vocab_size=64, hidden_size=32, n_layer=1, n_head=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    code, _, stderr = run_cli(
        ["slice", folder, "--sparsity", 0.2, "--calib", "missing.txt", "--out", tmp_path / "o"], capsys
    )
    assert code == 2  # the calibration file is checked first, before loading anything
    code, _, stderr = run_cli(
        ["slice", folder, "--sparsity", 0.2, "--out", tmp_path / "o", "--data-dir", data_dir], capsys
    )
    assert code == 2 and "model_type 'bloom' is not supported" in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_fake_gguf_file(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all")
    code, _, stderr = run_cli(["slice", fake, "--sparsity", 0.2, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "is not a GGUF file" in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_missing_offline_data(tiny_folder, tmp_path, capsys):
    empty = tmp_path / "empty-data"
    empty.mkdir()
    code, _, stderr = run_cli(
        [
            "slice",
            tiny_folder,
            "--sparsity",
            0.2,
            "--calib",
            "c4",
            "--data-dir",
            empty,
            "--out",
            tmp_path / "o",
        ],
        capsys,
    )
    assert code == 2 and stderr.startswith("slicelm: error: ") and stderr.count("\n") == 1
    assert "c4" in stderr and str(empty) in stderr
    assert not (tmp_path / "o").exists()


def test_wikitext2_calibration_never_uses_the_test_split(tiny_folder, tmp_path, capsys, data_dir):
    code, _, stderr = run_cli(
        [
            "slice",
            tiny_folder,
            "--sparsity",
            0.2,
            "--calib",
            "wikitext2",
            "--data-dir",
            data_dir,
            "--out",
            tmp_path / "o",
        ],
        capsys,
    )
    assert code == 2 and "train" in stderr and stderr.count("\n") == 1


def test_help_and_import_load_no_torch():
    """`slicelm --help` (every command's parser) and `import slicelm` stay free of torch, transformers and
    the harness: their names come from light modules, the API on first use."""
    import subprocess
    import sys

    code = (
        "import sys, slicelm\n"
        "from slicelm.cli import build_parser\n"
        "build_parser().format_help()\n"
        "heavy = [m for m in ('torch', 'transformers', 'lm_eval', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert slicelm.slice_model.__module__ == 'slicelm.slicing' and 'torch' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_light_names_are_the_registries():
    """The names the parsers show without loading the registries are the registries' own."""
    from slicelm.io import data, models, names
    from slicelm.layouts.checkpoint import FORMATS

    assert names.FORMAT_NAMES == FORMATS
    assert tuple(models.DTYPES) == names.DTYPE_NAMES
    assert data.EVAL_SETS is names.EVAL_SETS and data.CALIBRATION_SETS is names.CALIBRATION_SETS
