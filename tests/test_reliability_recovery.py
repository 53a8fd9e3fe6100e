"""Reliability of recovery fine-tuning: what ``finetune --resume`` continues, damaged checkpoints,
diverged runs, damaged folders, lost teachers and flags without effect (issue 23).

Each test reproduces one attack and asserts the refusal: one line ``slicelm: error: ...``, exit code
2, no output folder, and the work folder's checkpoint exactly as it was (nothing lost).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_checks import assert_one_line_error, run_cli, save_model_folder, tree

FT = ["--tokens", "256", "--seqlen", "32", "--batch-size", "2", "--eval-windows", "1", "--quiet", "--lr", "1e-3"]
SLICE = ["--sparsity", 0.25, "--calib-samples", 4, "--calib-seqlen", 32, "--quiet"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_tokenizer, data_dir) -> dict[str, Path]:
    """dense: a tiny tied Llama; other: another one of the same shapes (another seed); sliced and
    resliced: ``dense`` sliced with two calibration seeds (one shape, other weights)."""
    from slicelm.cli import main

    root = tmp_path_factory.mktemp("recovery")
    found = {
        "dense": save_model_folder(root / "dense", smollm2_tokenizer, tie_word_embeddings=True),
        "other": root / "other",
    }
    from conftest import build_tiny_model

    build_tiny_model("llama", seed=5, vocab_size=len(smollm2_tokenizer), tie_word_embeddings=True).save_pretrained(
        found["other"]
    )
    smollm2_tokenizer.save_pretrained(found["other"])
    for name, seed in (("sliced", 42), ("resliced", 7)):
        found[name] = root / name
        argv = ["slice", found["dense"], *SLICE, "--seed", seed, "--out", found[name], "--data-dir", data_dir]
        assert main([str(a) for a in argv]) == 0
    return found


def finetune_args(model, out, data_dir, *extra) -> list:
    return ["finetune", model, "--out", out, "--data-dir", data_dir, *FT, *extra]


def interrupt(argv, capsys, monkeypatch) -> None:
    """Run ``argv`` and stop it after two steps, as Ctrl-C would: a checkpoint stays in the work folder."""
    from slicelm.recover import recovery

    original = recovery.train
    monkeypatch.setattr(recovery, "train", lambda *a, **k: original(*a, **k, stop_after=2))
    code, _, lines = run_cli(argv, capsys)
    monkeypatch.setattr(recovery, "train", original)
    assert code == 130 and "continue with --resume" in lines[-1], lines


def assert_refused_and_kept(argv, capsys, out: Path, *fragments) -> None:
    """``argv`` is refused in one line; no output appears and the work folder is unchanged."""
    work = Path(f"{out}.slicelm-work")
    before = tree(work)
    code, stdout, lines = run_cli(argv, capsys)
    assert_one_line_error(code, lines, *fragments)
    assert stdout == "" and not out.exists()
    assert tree(work) == before, "the checkpoint changed"
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")) == [], "lock left"


# --------------------------------------------------------------------------------------------------
# S2. --resume continues only the run it was interrupted in: same student, data and teacher
# --------------------------------------------------------------------------------------------------
def test_s2_resume_with_another_student_at_the_same_path_is_refused(models, tmp_path, data_dir, capsys, monkeypatch):
    """The folder at the student's path is replaced by the same model re-sliced with another seed."""
    student, out = tmp_path / "student", tmp_path / "out"
    shutil.copytree(models["sliced"], student)
    argv = finetune_args(student, out, data_dir, "--loss", "lm")
    interrupt(argv, capsys, monkeypatch)
    shutil.rmtree(student)
    shutil.copytree(models["resliced"], student)  # same shapes, other weights
    assert_refused_and_kept([*argv, "--resume"], capsys, out, "--resume: the checkpoint was taken with another student")


def test_s2_resume_with_other_data_is_refused(models, tmp_path, data_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = finetune_args(models["sliced"], out, data_dir, "--loss", "lm")
    interrupt([*argv, "--data", "c4"], capsys, monkeypatch)
    assert_refused_and_kept(
        [*argv, "--data", "alpaca", "--resume"], capsys, out, "taken with other training data", "--restart"
    )


def test_s2_resume_with_another_teacher_at_the_same_path_is_refused(models, tmp_path, data_dir, capsys, monkeypatch):
    """The teacher is identified by its weights, not its path: a folder replaced there is refused."""
    teacher, out = tmp_path / "teacher", tmp_path / "out"
    shutil.copytree(models["dense"], teacher)
    argv = finetune_args(models["sliced"], out, data_dir, "--loss", "kd", "--teacher", teacher)
    interrupt(argv, capsys, monkeypatch)
    shutil.rmtree(teacher)
    shutil.copytree(models["other"], teacher)
    assert_refused_and_kept([*argv, "--resume"], capsys, out, "the checkpoint was taken with another teacher")


def test_s2_resume_of_the_same_run_still_completes(models, tmp_path, data_dir, capsys, monkeypatch):
    """The refusals above are not a broken --resume: the same run resumes and publishes."""
    out = tmp_path / "out"
    argv = finetune_args(models["sliced"], out, data_dir, "--loss", "lm")
    interrupt(argv, capsys, monkeypatch)
    code, stdout, lines = run_cli([*argv, "--resume"], capsys)
    assert code == 0, lines
    assert json.loads(stdout.splitlines()[-1])["steps"] == 4
    report = json.loads((out / "slicelm_report.json").read_text())["finetune"]
    assert report["resumed_from"] == 2 and report["tokens"] == 4 * 2 * 32
    assert not Path(f"{out}.slicelm-work").exists()


# --------------------------------------------------------------------------------------------------
# Rough 7 and 20. A damaged or hand-edited checkpoint is one line that offers --restart
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(models, tmp_path_factory, data_dir) -> Path:
    """A pristine work folder of an interrupted --loss lm run (two of four steps done)."""
    from slicelm.cli import main
    from slicelm.recover import recovery

    root = tmp_path_factory.mktemp("checkpoint")
    original = recovery.train
    recovery.train = lambda *a, **k: original(*a, **k, stop_after=2)
    try:
        argv = finetune_args(models["sliced"], root / "out", data_dir, "--loss", "lm")
        assert main([str(a) for a in argv]) == 130
    finally:
        recovery.train = original
    return root / "out.slicelm-work"


def _edit_state(change):
    def edit(folder: Path) -> None:
        meta = json.loads((folder / "state.json").read_text())
        change(meta)
        (folder / "state.json").write_text(json.dumps(meta))

    return edit


def _truncate(folder: Path) -> None:
    data = (folder / "state.safetensors").read_bytes()
    (folder / "state.safetensors").write_bytes(data[: len(data) // 2])


def _other_widths(folder: Path) -> None:
    """One adapter of the checkpoint narrower than the model's (a checkpoint of another slicing)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "state.safetensors")
    name = next(k for k in sorted(tensors) if k.startswith("param.") and k.endswith("lora_A.default.weight"))
    tensors[name] = tensors[name][:, :-8].contiguous()
    save_file(tensors, folder / "state.safetensors")


DAMAGE = {
    "truncated state": (_truncate, "state.safetensors:"),
    "missing state": (lambda f: (f / "state.safetensors").unlink(), "state.safetensors:"),
    "missing state.json": (lambda f: (f / "state.json").unlink(), "state.json is missing"),
    "bad JSON": (lambda f: (f / "state.json").write_text('{"step": 2, "report": {'), "state.json: JSONDecodeError"),
    "negative step": (_edit_state(lambda m: m.__setitem__("step", -1)), "step -1 outside this run's 0..4"),
    "other widths": (_other_widths, "the model's is"),
    # rough 20: a step beyond the run's end, and one at its end that the schedule contradicts
    "step beyond the end": (_edit_state(lambda m: m.__setitem__("step", 9)), "step 9 outside this run's 0..4"),
    "step at the end": (_edit_state(lambda m: m.__setitem__("step", 4)), "schedule is at step 2"),
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_rough_7_and_20_a_damaged_checkpoint_is_one_line_and_kept(how, checkpoint, models, tmp_path, data_dir, capsys):
    out = tmp_path / "out"
    work = Path(f"{out}.slicelm-work")
    shutil.copytree(checkpoint, work)
    edit, fragment = DAMAGE[how]
    edit(work / "checkpoint")
    argv = finetune_args(models["sliced"], out, data_dir, "--loss", "lm", "--resume")
    assert_refused_and_kept(argv, capsys, out, "--resume: the checkpoint in", "is damaged", fragment, "--restart")


def test_rough_7_restart_replaces_a_damaged_checkpoint(checkpoint, models, tmp_path, data_dir, capsys):
    out = tmp_path / "out"
    work = Path(f"{out}.slicelm-work")
    shutil.copytree(checkpoint, work)
    _truncate(work / "checkpoint")
    code, _, lines = run_cli(finetune_args(models["sliced"], out, data_dir, "--loss", "lm", "--restart"), capsys)
    assert code == 0, lines
    assert (out / "model.safetensors").is_file() and not work.exists()
    assert json.loads((out / "slicelm_report.json").read_text())["finetune"]["resumed_from"] is None


# --------------------------------------------------------------------------------------------------
# Rough 9. A folder holding NaN is blamed on the folder, not on the learning rate
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["model", "teacher"])
def test_rough_9_a_nan_folder_is_blamed_on_the_folder(role, models, tmp_path, data_dir, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(models["dense"], broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    before = tree(broken)
    out = tmp_path / "out"
    if role == "model":
        argv = finetune_args(broken, out, data_dir, "--loss", "lm")
    else:
        argv = finetune_args(models["sliced"], out, data_dir, "--loss", "kd", "--teacher", broken)
    code, _, lines = run_cli(argv, capsys)
    assert_one_line_error(code, lines, "model.layers.1.mlp.down_proj.weight")
    assert "non-finite" in lines[-1] or "NaN" in lines[-1], lines[-1]
    assert "--lr" not in lines[-1], lines[-1]
    assert not out.exists() and not Path(f"{out}.slicelm-work").exists() and tree(broken) == before


# --------------------------------------------------------------------------------------------------
# Rough 10. A diverged run is not a dead end: --restart with a lower --lr
# --------------------------------------------------------------------------------------------------
def test_rough_10_a_diverged_run_offers_restart_and_restart_works(models, tmp_path, data_dir, capsys):
    out = tmp_path / "out"
    work = Path(f"{out}.slicelm-work")
    base = finetune_args(models["sliced"], out, data_dir, "--loss", "lm")
    diverging = [*base, "--lr", "1e30"]  # the last --lr wins
    code, _, lines = run_cli(diverging, capsys)
    assert_one_line_error(code, lines, "the run diverged", "rerun with a lower --lr and --restart", str(work))
    assert "lower --lr:" not in lines[-1]  # said once
    assert not out.exists() and work.is_dir()
    code, _, lines = run_cli(base, capsys)  # the diverged run's checkpoint: the way on is named
    assert_one_line_error(code, lines, "pass --resume to continue it, or --restart to discard it")
    code, _, lines = run_cli([*base, "--resume"], capsys)  # a new lr is another run
    assert_one_line_error(code, lines, "--resume with other settings than the checkpoint (lr, peak_lr)", "--restart")
    code, _, lines = run_cli([*base, "--restart"], capsys)
    assert code == 0, lines
    assert (out / "model.safetensors").is_file() and not work.exists()


def test_rough_10_resume_and_restart_are_exclusive(models, tmp_path, data_dir, capsys):
    out = tmp_path / "out"
    code, _, lines = run_cli([*finetune_args(models["sliced"], out, data_dir), "--resume", "--restart"], capsys)
    assert_one_line_error(code, lines, "not allowed with argument")
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# Rough 17. A recorded teacher that is gone names itself and --teacher
# --------------------------------------------------------------------------------------------------
def test_rough_17_a_deleted_recorded_teacher_names_itself_and_the_way_out(
    smollm2_tokenizer, tmp_path, data_dir, capsys
):
    from slicelm.cli import main

    dense = save_model_folder(tmp_path / "dense", smollm2_tokenizer, tie_word_embeddings=True)
    sliced = tmp_path / "sliced"
    assert main([str(a) for a in ["slice", dense, *SLICE, "--out", sliced, "--data-dir", data_dir]]) == 0
    shutil.rmtree(dense)
    out = tmp_path / "out"
    code, _, lines = run_cli(finetune_args(sliced, out, data_dir, "--loss", "kd"), capsys)
    assert_one_line_error(
        code, lines, f"distils the teacher recorded in {sliced}, {dense}, which cannot be loaded", "give --teacher"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sliced"]


# --------------------------------------------------------------------------------------------------
# Rough 18. Training data errors speak of training, not calibration
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data", ["wikitext2", "missing.txt", "c4 (no data)"])
def test_rough_18_training_data_errors_speak_of_training(data, models, tmp_path, data_dir, capsys):
    out = tmp_path / "out"
    root = data_dir
    if data == "missing.txt":
        data = tmp_path / "missing.txt"
    elif data == "c4 (no data)":
        data, root = "c4", tmp_path / "empty"
        root.mkdir()
    argv = ["finetune", models["sliced"], "--out", out, "--data-dir", root, *FT, "--loss", "lm", "--data", data]
    code, _, lines = run_cli(argv, capsys)
    assert_one_line_error(code, lines, "train")
    assert "calibrat" not in lines[-1].lower(), lines[-1]
    assert not out.exists() and not Path(f"{out}.slicelm-work").exists()


# --------------------------------------------------------------------------------------------------
# Rough 19. Flags that would have no effect are refused, before any work
# --------------------------------------------------------------------------------------------------
FLAGS_WITHOUT_EFFECT = {
    "teacher with lm": (["--loss", "lm", "--teacher", "DENSE"], "--teacher is only used by --loss kd"),
    "temperature with lm": (["--loss", "lm", "--temperature", "2"], "--temperature is only used by --loss kd"),
    "lora-alpha with full": (["--full", "--lora-alpha", "16"], "--lora-alpha configures LoRA adapters"),
    "lora-extra with full": (["--full", "--lora-extra", "shortcuts"], "--lora-extra configures LoRA adapters"),
    "shortcuts on a dense folder": (
        ["--loss", "lm", "--lora-extra", "shortcuts", "MODEL=DENSE"],
        "has no shortcut matrices",
    ),
    "final on a dense folder": (["--loss", "lm", "--lora-extra", "final", "MODEL=DENSE"], "has no final projection"),
    "unknown extra": (["--lora-extra", "everything"], "unknown LoRA targets ['everything']"),
}


@pytest.mark.parametrize("case", sorted(FLAGS_WITHOUT_EFFECT))
def test_rough_19_finetune_flags_without_effect_are_refused(case, models, tmp_path, data_dir, capsys, monkeypatch):
    extra, fragment = FLAGS_WITHOUT_EFFECT[case]
    model = models["sliced"]
    if "MODEL=DENSE" in extra:
        model, extra = models["dense"], [a for a in extra if a != "MODEL=DENSE"]
    extra = [str(models["dense"]) if a == "DENSE" else a for a in extra]
    out = tmp_path / "out"
    code, _, lines = run_cli([*finetune_args(model, out, data_dir), *extra], capsys)
    assert_one_line_error(code, lines, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_rough_19_a_plain_folder_has_no_shortcuts_to_adapt(models, tmp_path, data_dir, capsys):
    from slicelm.cli import main

    plain = tmp_path / "plain"
    argv = ["slice", models["dense"], *SLICE, "--layout", "plain", "--out", plain, "--data-dir", data_dir]
    assert main([str(a) for a in argv]) == 0
    out = tmp_path / "out"
    code, _, lines = run_cli([*finetune_args(plain, out, data_dir), "--lora-extra", "shortcuts"], capsys)
    assert_one_line_error(code, lines, "--lora-extra shortcuts: this model has no shortcut matrices")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]
