"""Reliability of what users give slicelm: data files, flags, environment (issue 23).

Each test reproduces one attack and asserts the refusal: one line ``slicelm: error: ...``, exit code 2,
and nothing written. docs/reliability.md lists the same attacks in prose.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from cli_checks import CALIB, assert_one_line_error, run_cli, save_model_folder

from slicelm.errors import SlicelmError
from slicelm.io import data
from slicelm.io.fingerprint import FINGERPRINT_FILE, MIN_MATCHES, check_not_eval_text, fingerprint_of, load_fingerprint


@pytest.fixture(scope="module")
def wiki_test(data_dir) -> str:
    return (data_dir / data.WIKITEXT2_TEST).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def ptb_train(data_dir) -> str:
    return (data_dir / data.PTB_TRAIN).read_text(encoding="utf-8")


def detokenised(text: str) -> str:
    """WikiText's tokenisation undone, as a user cleaning the file would: ``@-@`` -> ``-``, `` , `` -> ``, ``."""
    for marked, plain in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        text = text.replace(marked, plain)
    text = re.sub(r" ([,.;:!?)]|'s|n't)", r"\1", text)
    return re.sub(r"\( ", "(", text)


def normalised(text: str) -> str:
    """Whitespace collapsed, punctuation removed or changed, case changed: the words alone survive."""
    text = re.sub(r"[\"'`]", "", text.replace(" - ", " — ").replace(";", ","))
    return " ".join(text.split()).upper()


def disguises(wiki: str, ptb: str) -> dict[str, str]:
    return {
        "appended to PTB train": ptb + "\n" + wiki,
        "detokenised": detokenised(wiki),
        "normalised": normalised(wiki),
    }


# --------------------------------------------------------------------------------------------------
# S1. The test-text guard: no data root needed, counts matches, survives normalisation
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def disguise_files(tmp_path_factory, wiki_test, ptb_train, data_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("disguised")
    files = {}
    for name, text in disguises(wiki_test, ptb_train).items():
        files[name] = root / f"{name.replace(' ', '-')}.txt"
        files[name].write_text(text, encoding="utf-8")
    # And as documents: the test text split into a .jsonl of its paragraphs, among C4 documents.
    docs = data.c4_sample_documents(data_dir / data.C4_SAMPLE)[data.C4_SAMPLE_EVAL_DOCS :][:200]
    docs += [row for row in wiki_test.split("\n") if row.strip()]
    files["jsonl among C4 documents"] = root / "mixed.jsonl"
    files["jsonl among C4 documents"].write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    return files


def test_s1_each_disguise_of_the_test_text_is_found_without_a_data_root(disguise_files, smollm2_tokenizer, hub_only):
    """The fingerprint ships with the package: no data dir is consulted (hub_only removes every one)."""
    assert data.resolve_data_dir(None) is None
    for name, path in disguise_files.items():
        with pytest.raises(SlicelmError, match="contains WikiText-2 test text") as refused:
            data.load_calibration(str(path), smollm2_tokenizer, n_samples=1, seqlen=8)
        assert "never calibrate or train on evaluation text" in str(refused.value), name


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory, smollm2_tokenizer, data_dir) -> tuple[Path, Path]:
    """(dense, sliced) tiny Llamas with a real tokenizer."""
    root = tmp_path_factory.mktemp("s1")
    dense = save_model_folder(root / "dense", smollm2_tokenizer, tie_word_embeddings=True)
    sliced = root / "sliced"
    argv = ["slice", dense, "--sparsity", 0.25, *CALIB, "--data-dir", data_dir, "--out", sliced]
    from slicelm.cli import main

    assert main([str(a) for a in argv]) == 0
    return dense, sliced


FT = ["--tokens", "256", "--seqlen", "32", "--batch-size", "2", "--eval-windows", "1", "--quiet"]


def test_s1_slice_calib_and_finetune_data_refuse_every_disguise(
    tiny_folders, disguise_files, tmp_path, capsys, hub_only
):
    dense, sliced = tiny_folders
    for name, path in disguise_files.items():
        out = tmp_path / "out"
        calib = ["--calib", path, "--calib-samples", 4, "--calib-seqlen", 32, "--quiet"]
        code, _, lines = run_cli(["slice", dense, "--sparsity", 0.25, *calib, "--out", out], capsys)
        assert_one_line_error(code, lines, f"{path} contains WikiText-2 test text")
        assert not out.exists(), name
        code, _, lines = run_cli(["finetune", sliced, "--data", path, *FT, "--out", out], capsys)
        assert_one_line_error(code, lines, f"{path} contains WikiText-2 test text")
        assert not out.exists() and not Path(f"{out}.slicelm-work").exists(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "lock or temporary files left behind"


def test_s1_other_evaluation_texts_are_fingerprinted_too(data_dir):
    for name, fragment in (("ptb", "PTB test text"), ("c4", "C4 test documents")):
        with pytest.raises(SlicelmError, match=fragment):
            check_not_eval_text(data.eval_text(name, data_dir), "file.txt")


def test_s1_real_training_text_passes(data_dir, ptb_train):
    """Non-test text of every kind in the data folder matches (almost) nothing: the false-positive check.

    Measured: 0 for PTB train, C4's calibration half, Alpaca and the task files; 7 for PTB valid (WSJ
    text like the test split), against a threshold of MIN_MATCHES = 32.
    """
    from slicelm.io.fingerprint import matches

    texts = {
        "ptb train": ptb_train,
        "ptb valid": (data_dir / "ptb" / "ptb.valid.txt").read_text(encoding="utf-8"),
        "c4 calibration half": "\n\n".join(data.c4_sample_documents(data_dir / data.C4_SAMPLE)[1000:]),
        "alpaca": "\n\n".join(data.alpaca_texts(data_dir / data.ALPACA)),
        "lambada": (data_dir / "lambada" / "lambada_openai.jsonl").read_text(encoding="utf-8"),
    }
    for label, text in texts.items():
        found = {m.name: m.matches for m in matches(text)}
        assert max(found.values()) <= MIN_MATCHES // 4, (label, found)
        check_not_eval_text(text, label)  # does not raise


def test_s1_a_file_of_real_training_text_calibrates(tiny_folders, data_dir, tmp_path, capsys, hub_only):
    dense, _ = tiny_folders
    calib = tmp_path / "mine.txt"
    calib.write_text((data_dir / data.PTB_TRAIN).read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    argv = ["slice", dense, "--sparsity", 0.25, "--calib", calib, "--calib-samples", 4, "--calib-seqlen", 32]
    code, _, lines = run_cli([*argv, "--quiet", "--out", tmp_path / "out"], capsys)
    assert code == 0, lines
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_s1_fingerprint_is_small_holds_only_hashes_and_is_reproducible(data_dir):
    """Well under 1 MB; only uint64 arrays (no text); the WikiText-2 set is what the script computes."""
    assert FINGERPRINT_FILE.stat().st_size < 500_000
    with np.load(FINGERPRINT_FILE, allow_pickle=False) as raw:
        assert {raw[k].dtype.kind for k in raw.files} <= {"u", "i"}
    shipped = load_fingerprint()
    assert set(shipped) == set(data.EVAL_SETS)
    np.testing.assert_array_equal(shipped["wikitext2"], fingerprint_of(data.eval_text("wikitext2", data_dir)))
    assert len(shipped["wikitext2"]) > 300 * MIN_MATCHES  # the whole test set is far above the threshold


# --------------------------------------------------------------------------------------------------
# Rough edges: one line instead of a traceback or argparse's riddle
# --------------------------------------------------------------------------------------------------
def test_rough_6_a_bad_available_memory_override_is_one_line(tiny_folders, tmp_path, capsys, data_dir, monkeypatch):
    dense, _ = tiny_folders
    monkeypatch.setenv("SLICELM_AVAILABLE_MEMORY", "lots")
    out = tmp_path / "out"
    code, _, lines = run_cli(["slice", dense, "--sparsity", 0.25, *CALIB, "--data-dir", data_dir, "--out", out], capsys)
    assert_one_line_error(code, lines, "$SLICELM_AVAILABLE_MEMORY='lots'", "give a size such as 8GiB")
    assert not out.exists()


@pytest.mark.parametrize("value", ["-0.1,0.2", "-1"])
def test_rough_15_negative_values_reach_the_flags_own_check(value, tmp_path, capsys):
    out = tmp_path / "sweep"
    code, _, lines = run_cli(["sweep", "smollm2-135m", "--sparsities", value, "--out", out], capsys)
    assert_one_line_error(code, lines, "argument --sparsities: sparsities must be in [0, 1), got -")
    assert not out.exists()
    code, _, lines = run_cli(["slice", "smollm2-135m", "--sparsity", value.split(",")[0], "--out", out], capsys)
    assert_one_line_error(code, lines, "--sparsity must be in [0, 1), got -")
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# Rough 14. Refusals that say what is wrong; rough 19. flags without effect are refused
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    """Every refusal below is known from the flags and the config: loading weights fails the test."""
    import slicelm.io.models

    def refuse(*_args, **_kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(slicelm.io.models, "load_model", refuse)


@pytest.mark.parametrize(
    "extra,fragments",
    [
        (["--mlp-sparsity", "0"], ["--mlp-sparsity 0 removes no MLP channels", "nothing would be sliced"]),
        (["--sparsity", "0.999"], ["--sparsity 0.999 keeps 0.1 of the model's 64 stream channels", "at most"]),
        (["--sparsity", "0.95", "--round-to", "4"], ["--sparsity 0.95 keeps 3.2", "use at most --sparsity 0.9375"]),
    ],
)
def test_rough_14_refusals_name_the_real_problem(extra, fragments, tiny_folders, tmp_path, capsys, no_loading):
    dense, _ = tiny_folders
    out = tmp_path / "out"
    code, _, lines = run_cli(["slice", dense, *extra, "--out", out, "--quiet"], capsys)
    assert_one_line_error(code, lines, *fragments)
    assert "the step must be" not in lines[-1] and "give --sparsity (stream)" not in lines[-1]
    assert sorted(tmp_path.iterdir()) == []


def test_rough_14_the_largest_sparsity_named_is_accepted(tiny_folders, tmp_path, capsys, data_dir):
    """The limit the refusal names is real: --sparsity 0.9375 with --round-to 4 keeps one step (4 channels)."""
    dense, _ = tiny_folders
    out = tmp_path / "out"
    argv = ["slice", dense, "--sparsity", "0.9375", "--round-to", "4", *CALIB, "--data-dir", data_dir, "--out", out]
    code, _, lines = run_cli(argv, capsys)
    assert code == 0, lines
    report = json.loads((out / "slicelm_report.json").read_text())
    assert {layer["mid"] for layer in report["plan"]["layers"]} == {4}  # (the last "out" is the unsliced head's)


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--sparsity", "0.25", "--schedule", "mlp-global"], "--schedule mlp-global chooses how --target-params"),
        (["--mlp-sparsity", "0.25", "--schedule", "uniform"], "with --sparsity/--mlp-sparsity the widths are given"),
        (["--sparsity", "0.25", "--ppl-seqlen", "32"], "--ppl-seqlen is the window of --ppl-windows"),
        (["--sparsity", "0.25", "--untie-head"], "has no tied head"),
    ],
)
def test_rough_19_slice_flags_without_effect_are_refused(
    extra, fragment, tiny_folders, smollm2_tokenizer, tmp_path, capsys, no_loading
):
    dense, _ = tiny_folders
    source = dense
    if "--untie-head" in extra:  # a model whose head is its own weight already
        source = save_model_folder(tmp_path / "untied", smollm2_tokenizer)
    out = tmp_path / "out"
    code, _, lines = run_cli(["slice", source, *extra, "--out", out, "--quiet"], capsys)
    assert_one_line_error(code, lines, fragment)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--recover-full"], "--recover-full configures recovery, and no --recover is given"),
        (["--recover-tokens", "4096"], "--recover-tokens configures recovery"),
        (["--sparsities", "0.2,0.999"], "--sparsities 0.999 keeps 0.1 of the model's 64 stream channels"),
        (["--mlp-sparsity", "1.5"], "--mlp-sparsity must be in [0, 1)"),
    ],
)
def test_rough_19_sweep_flags_without_effect_are_refused(extra, fragment, tiny_folders, tmp_path, capsys, no_loading):
    dense, _ = tiny_folders
    out = tmp_path / "sweep"
    code, _, lines = run_cli(["sweep", dense, "--tasks", "none", *extra, "--out", out], capsys)
    assert_one_line_error(code, lines, fragment)
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# Rough 2. A sharded folder missing a shard: one line when streaming, as in memory
# --------------------------------------------------------------------------------------------------
def test_rough_2_a_missing_shard_while_streaming_is_one_line(smollm2_tokenizer, tmp_path, capsys, data_dir):
    from conftest import build_tiny_model

    source = tmp_path / "sharded"
    build_tiny_model("llama", vocab_size=len(smollm2_tokenizer)).save_pretrained(source, max_shard_size="2MB")
    smollm2_tokenizer.save_pretrained(source)
    shards = sorted(source.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    before = sorted(p.name for p in source.iterdir())
    out = tmp_path / "out"
    for extra in (["--stream"], []):
        argv = ["slice", source, "--sparsity", 0.25, *CALIB, "--data-dir", data_dir, "--out", out, *extra]
        code, _, lines = run_cli(argv, capsys)
        assert_one_line_error(code, lines)
        if extra:
            assert f"lists weight files that are missing ({shards[-1].name})" in lines[-1], lines[-1]
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]
    assert sorted(p.name for p in source.iterdir()) == before


# --------------------------------------------------------------------------------------------------
# Rough 22. ppl and eval: the memory preflight of slice, before the weights are loaded
# --------------------------------------------------------------------------------------------------
def _largest_batch(folder: Path, seqlen: int, available: int) -> int:
    import torch

    from slicelm.io.memory import estimate_forward_bytes
    from slicelm.io.models import load_config, resolve_source

    config = load_config(resolve_source(str(folder)))
    return max(b for b in range(1, 200) if estimate_forward_bytes(config, torch.float32, b, seqlen) <= 0.9 * available)


@pytest.mark.parametrize("command", ["ppl", "eval"])
def test_rough_22_a_batch_that_would_not_fit_is_refused_before_loading(
    command, tiny_folders, tmp_path, capsys, data_dir, monkeypatch, no_loading
):
    dense, _ = tiny_folders
    available = int(1.5 * 2**30)  # the runtime's 1 GiB and room for a few windows of a 49k vocabulary
    monkeypatch.setenv("SLICELM_AVAILABLE_MEMORY", str(available))
    seqlen = 32 if command == "ppl" else 128  # eval: requests up to the tiny model's 128 positions
    largest = _largest_batch(dense, seqlen, available)
    assert 1 <= largest < 64
    base = {
        "ppl": ["ppl", dense, "--seqlen", seqlen, "--max-windows", 2, "--data-dir", data_dir, "--quiet"],
        "eval": ["eval", dense, "--tasks", "piqa", "--limit", 2, "--data-dir", data_dir, "--output", tmp_path / "e"],
    }[command]
    code, stdout, lines = run_cli([*base, "--batch-size", 64], capsys)
    assert_one_line_error(code, lines, f"--batch-size 64 of {seqlen}-token windows needs about", f"{largest} or less")
    assert stdout == "" and sorted(tmp_path.iterdir()) == []
    monkeypatch.setenv("SLICELM_AVAILABLE_MEMORY", "1GiB")  # not even one window beside the runtime
    code, _, lines = run_cli(base, capsys)
    assert_one_line_error(code, lines, f"one window of {seqlen} tokens needs about", "1.0 GiB are available")


def test_rough_22_the_default_batch_fits_and_runs(tiny_folders, tmp_path, capsys, data_dir, monkeypatch):
    """ppl's default (1 window) runs in the tight budget; eval's default 8 is lowered to what fits."""
    import slicelm.measure.evaluation

    dense, _ = tiny_folders
    available = int(1.5 * 2**30)
    monkeypatch.setenv("SLICELM_AVAILABLE_MEMORY", str(available))
    code, stdout, lines = run_cli(["ppl", dense, "--seqlen", 32, "--max-windows", 2, "--data-dir", data_dir], capsys)
    assert code == 0, lines
    assert json.loads(stdout)["windows"] == 2
    seen = {}
    original = slicelm.measure.evaluation.evaluate_zeroshot

    def spy(*args, **kwargs):
        seen["batch_size"] = kwargs["batch_size"]
        return original(*args, **kwargs)

    monkeypatch.setattr(slicelm.measure.evaluation, "evaluate_zeroshot", spy)
    argv = ["eval", dense, "--tasks", "piqa", "--limit", 2, "--data-dir", data_dir, "--device", "cpu"]
    code, _, lines = run_cli(argv, capsys)
    assert code == 0, lines
    assert seen["batch_size"] == min(8, _largest_batch(dense, 128, available))


# --------------------------------------------------------------------------------------------------
# Rough 11. A tied LayerNorm model grows when sliced: the cause named is the forced untie of its head
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tied_gpt2(tmp_path_factory, smollm2_tokenizer) -> Path:
    return save_model_folder(
        tmp_path_factory.mktemp("gpt2") / "gpt2", smollm2_tokenizer, "gpt2", tie_word_embeddings=True
    )


def test_rough_11_the_growth_of_a_tied_layernorm_model_is_blamed_on_the_untied_head(
    tied_gpt2, tmp_path, capfd, data_dir
):
    from slicelm.cli import main

    out = tmp_path / "out"
    argv = ["slice", tied_gpt2, "--sparsity", 0.25, *CALIB, "--data-dir", data_dir, "--out", out]
    assert main([str(a) for a in argv]) == 0
    note = next(line for line in capfd.readouterr().err.splitlines() if "the sliced model is larger" in line)
    assert "gpt2 normalises with LayerNorm, so slicing unties its tied head" in note, note
    assert "49,152 x 64 weight, 3,145,728 parameters" in note and "shortcut" not in note, note
    report = json.loads((out / "slicelm_report.json").read_text())
    assert report["params_after"] > report["params_before"] and report["plan"]["tied"] is False


def test_rough_11_a_budget_a_tied_layernorm_model_cannot_meet_names_the_untie(tied_gpt2, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    code, _, lines = run_cli(["slice", tied_gpt2, "--target-params", "0.99999", "--out", out, "--quiet"], capsys)
    assert_one_line_error(code, lines, "--target-params 0.99999", "The cause: gpt2 normalises with LayerNorm")
    assert sorted(tmp_path.iterdir()) == []
