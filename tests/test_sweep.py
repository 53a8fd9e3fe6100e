"""slicelm sweep: every point measured once, stored, resumed after an interruption, tabulated, plotted."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import build_tiny_model

from slicelm.cli import main
from slicelm.config import SliceConfig
from slicelm.errors import SlicelmError
from slicelm.measure.sweep import SweepConfig, run_sweep

TASKS = ("piqa", "winogrande")


@pytest.fixture(autouse=True)
def _quiet_lm_eval():
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2_tokenizer):
    folder = tmp_path_factory.mktemp("tiny_dense")
    model = build_tiny_model(
        "llama",
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        max_position_embeddings=512,
    )
    model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def tiny_config(folder, data_dir, **overrides) -> SweepConfig:
    base = dict(
        model=str(folder),
        sparsities=(0.25, 0.5),
        tasks=TASKS,
        limit=3,
        eval_batch_size=2,
        data_dir=str(data_dir),
        device="cpu",
        calib="c4",
        calib_samples=4,
        calib_seqlen=64,
        slicing=SliceConfig(batch_size=2, seed=42),
        ppl_dataset="wikitext2",
        ppl_seqlen=64,
        ppl_windows=2,
    )
    return SweepConfig(**(base | overrides))


def test_sweep_resumes_after_interruption_and_replots_without_model(tiny_folder, data_dir, tmp_path, monkeypatch):
    import slicelm.io.models
    import slicelm.measure.evaluation

    calls: list[str] = []
    real_evaluate = slicelm.measure.evaluation.evaluate_zeroshot

    def interrupted(model, tokenizer, tasks, **kwargs):
        calls.append(f"{kwargs['model_name']}:{tasks[0]}")
        if len(calls) == 4:  # the second task of the first sliced point
            raise KeyboardInterrupt
        return real_evaluate(model, tokenizer, tasks, **kwargs)

    monkeypatch.setattr(slicelm.measure.evaluation, "evaluate_zeroshot", interrupted)
    config = tiny_config(tiny_folder, data_dir)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, tmp_path, log=lambda _: None)
    stored = json.loads((tmp_path / "points" / "sparsity_0.25.json").read_text())
    assert set(stored["tasks"]) == {"piqa"} and "ppl" in stored

    calls.clear()
    summary = run_sweep(config, tmp_path, log=lambda _: None)
    model = str(tiny_folder)
    # Only what was missing: winogrande at 0.25, then all of 0.5.
    assert calls == [
        f"{model} (sparsity_0.25):winogrande",
        f"{model} (sparsity_0.5):piqa",
        f"{model} (sparsity_0.5):winogrande",
    ]

    rows = summary["points"]
    assert [r["sparsity"] for r in rows] == [0.0, 0.25, 0.5]
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"]
    assert rows[0]["params_ratio"] == 1.0
    for row in rows:
        assert set(row["tasks"]) == set(TASKS) and all(t["samples"] == 3 for t in row["tasks"].values())
        assert row["ppl"] > 1 and 0 <= row["average"] <= 1

    # Finished sweep: the same call only rewrites the outputs, never loading a model.
    def no_model(*_args, **_kwargs):
        raise AssertionError("a finished sweep must not load the model")

    monkeypatch.setattr(slicelm.io.models, "load_model", no_model)
    for name in ("sweep.md", "sweep_ppl.png"):
        (tmp_path / name).unlink()
    again = run_sweep(config, tmp_path, log=lambda _: None)
    assert again == summary
    assert json.loads((tmp_path / "sweep.json").read_text()) == summary
    expected = [
        "sweep_ppl.png",
        "sweep_piqa.png",
        "sweep_winogrande.png",
        "sweep_average.png",
        "sweep_overview.png",
    ]
    for name in expected:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = (tmp_path / "sweep.md").read_text()
    assert "| dense |" in table and "| 25% |" in table and "piqa (acc_norm)" in table


def test_changed_settings_invalidate_only_what_they_affect(tiny_folder, data_dir, tmp_path, monkeypatch):
    import slicelm.measure.evaluation

    base = tiny_config(tiny_folder, data_dir, sparsities=(0.25,), tasks=("winogrande",), ppl_dataset=None)
    run_sweep(base, tmp_path, log=lambda _: None)
    calls: list[str] = []
    real_evaluate = slicelm.measure.evaluation.evaluate_zeroshot

    def counting(model, tokenizer, tasks, **kwargs):
        calls.append(tasks[0])
        return real_evaluate(model, tokenizer, tasks, **kwargs)

    monkeypatch.setattr(slicelm.measure.evaluation, "evaluate_zeroshot", counting)
    # A new task is added; the stored winogrande scores are kept.
    run_sweep(
        tiny_config(tiny_folder, data_dir, sparsities=(0.25,), tasks=("winogrande", "boolq"), ppl_dataset=None),
        tmp_path,
        log=lambda _: None,
    )
    assert calls == ["boolq", "boolq"]
    # A different --limit re-measures every task.
    calls.clear()
    run_sweep(
        tiny_config(tiny_folder, data_dir, sparsities=(0.25,), tasks=("winogrande",), ppl_dataset=None, limit=2),
        tmp_path,
        log=lambda _: None,
    )
    assert calls == ["winogrande", "winogrande"]
    # Other calibration settings re-slice and re-measure the sliced point only: the dense model is the same.
    calls.clear()
    changed = dict(sparsities=(0.25,), tasks=("winogrande",), ppl_dataset=None, limit=2, calib_samples=2)
    run_sweep(tiny_config(tiny_folder, data_dir, **changed), tmp_path, log=lambda _: None)
    assert calls == ["winogrande"]


def test_sweep_cli(tiny_folder, data_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", str(tiny_folder), "--sparsities", "0,0.25", "--tasks", "arc_easy", "--limit", "2"]
    argv += ["--eval-batch-size", "2", "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu"]
    argv += ["--calib", "c4", "--calib-samples", "2", "--calib-seqlen", "32", "--calib-batch-size", "2"]
    argv += ["--ppl-dataset", "none"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [p["sparsity"] for p in printed["points"]] == [0.25]
    assert printed["dense"]["tasks"]["arc_easy"]["metric"] == "acc_norm"
    assert (out / "sweep_arc_easy.png").is_file() and (out / "sweep.md").is_file()


def test_sweep_rejects_bad_input(tiny_folder, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse rejects it before anything runs
        main(["sweep", str(tiny_folder), "--sparsities", "0.2,1.5"])
    assert "sparsities must be in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SlicelmError, match="nothing to measure"):
        SweepConfig(model="x", tasks=(), ppl_dataset=None)
    argv = [
        "sweep",
        str(tiny_folder),
        "--tasks",
        "piqa",
        "--data-dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    assert "piqa/valid.jsonl" in capsys.readouterr().err


def test_sweep_with_recovery_measures_and_resumes(tiny_folder, data_dir, tmp_path, capsys):
    """--recover adds a recovered row per slice (same parameters), stored and reused on resume."""
    out = tmp_path / "sweep"
    argv = ["sweep", str(tiny_folder), "--sparsities", "0.25", "--tasks", "none", "--ppl-windows", "1"]
    argv += ["--ppl-seqlen", "32", "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu"]
    argv += ["--calib", "c4", "--calib-samples", "2", "--calib-seqlen", "32", "--calib-batch-size", "2"]
    argv += ["--recover", "kd", "--recover-tokens", "128", "--recover-seqlen", "32"]
    assert main(argv) == 0
    capsys.readouterr()
    summary = json.loads((out / "sweep.json").read_text())
    row = summary["points"][1]
    assert row["recovered"]["ppl"] > 0 and row["recovered"]["ppl"] != row["ppl"]
    assert "25% recovered" in (out / "sweep.md").read_text()
    stored = json.loads((out / "points" / "sparsity_0.25.json").read_text())
    assert stored["recovered"]["finetune"]["steps"] == 1
    before = (out / "points" / "sparsity_0.25.json").stat().st_mtime_ns
    assert main(argv) == 0  # resuming: everything is stored, nothing is re-measured
    assert (out / "points" / "sparsity_0.25.json").stat().st_mtime_ns == before
