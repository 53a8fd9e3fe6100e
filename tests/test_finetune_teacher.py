"""Where the KD teacher runs (``--teacher-device``), and the refusals before any weight is loaded: a device
this machine cannot use, one that is ambiguous with several processes, a teacher that does not fit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model
from safetensors.torch import load_file
from test_finetune import (
    CONFIG,
    FT,
    sliced_tiny,
    tiny_sliced_folder,  # noqa: F401 (the fixture, found here by name)
    windows,
)

from slicelm.cli import finetune_cmd, main
from slicelm.core.resources import AVAILABLE_MEMORY_ENV
from slicelm.errors import SlicelmError
from slicelm.recover.config import FinetuneConfig
from slicelm.recover.loop import train

STEPS = ["--steps", "2", "--seqlen", "32", "--batch-size", "2", "--eval-windows", "1", "--quiet", "--lr", "1e-3"]


def refused(argv: list[str], capsys) -> str:
    """The one line of a refused command (exit 2)."""
    capsys.readouterr()  # what came before (a fixture that sliced a folder first) is not this command's
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("slicelm: error: "), err[-3:]
    return err[0]


@pytest.fixture
def no_teacher_loading(monkeypatch):
    """Loading the teacher fails the test: a refusal must come before it."""

    def load_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the refusal")

    monkeypatch.setattr(finetune_cmd, "load_teacher", load_teacher)


def test_teacher_device_cpu_with_a_cpu_student_trains_the_same_weights(request, tmp_path, data_dir, capsys):
    """``--teacher-device cpu`` beside a CPU student is the default placement: the same run, bit for bit."""
    _, sliced = request.getfixturevalue("tiny_sliced_folder")
    argv = ["finetune", str(sliced), "--data-dir", str(data_dir), *STEPS]
    default, placed = tmp_path / "default", tmp_path / "placed"
    assert main([*argv, "--out", str(default)]) == 0
    assert main([*argv, "--out", str(placed), "--teacher-device", "cpu"]) == 0
    capsys.readouterr()
    expected, got = load_file(default / "model.safetensors"), load_file(placed / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[key], value) for key, value in expected.items())
    reports = [json.loads((out / "slicelm_report.json").read_text())["finetune"] for out in (default, placed)]
    assert [r["config"]["teacher_device"] for r in reports] == [None, "cpu"]
    assert reports[0]["curve"] == reports[1]["curve"]


@pytest.mark.parametrize("k", [None, 5])
def test_teacher_device_cpu_in_train_is_the_default_run(k):
    """Through the library, exact KD and --kd-top-k: the teacher placed on the CPU beside a CPU student
    trains the same weights and curve as the default placement."""
    results = []
    for device in (None, "cpu"):
        config = FinetuneConfig(loss="kd", kd_top_k=k, teacher_device=device, **CONFIG | {"steps": 3})
        teacher = build_tiny_model("llama", seed=3, tie_word_embeddings=True)
        results.append(train(sliced_tiny(), windows(12), windows(2, seed=2), config, teacher=teacher, progress=False))
    (a, report_a), (b, report_b) = results
    assert report_a.curve == report_b.curve
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_resumed_run_may_place_its_teacher_elsewhere(request, tmp_path, data_dir, capsys, monkeypatch):
    """Where the teacher runs is not a setting of the run (like --device): resuming with another
    --teacher-device continues the checkpoint instead of refusing it."""
    from slicelm.recover import recovery

    _, sliced = request.getfixturevalue("tiny_sliced_folder")
    out = tmp_path / "recovered"
    argv = ["finetune", str(sliced), "--out", str(out), "--data-dir", str(data_dir), *STEPS]
    original = recovery.train
    monkeypatch.setattr(recovery, "train", lambda *a, **k: original(*a, **k, stop_after=1))
    assert main([*argv, "--teacher-device", "cpu"]) == 130
    monkeypatch.setattr(recovery, "train", original)
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err[-2000:]
    report = json.loads((out / "slicelm_report.json").read_text())["finetune"]
    assert report["resumed_from"] == 1 and report["config"]["teacher_device"] is None


@pytest.mark.parametrize(
    "device,message",
    [
        ("cuda:0", "--teacher-device cuda:0: no CUDA device is available"),
        ("gpu0", "--teacher-device gpu0: unknown device"),
        ("meta", "--teacher-device meta: unsupported device type 'meta'"),
    ],
)
def test_a_teacher_device_torch_cannot_use_here_is_one_line_before_loading(
    device, message, request, tmp_path, data_dir, capsys, no_teacher_loading
):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    _, sliced = request.getfixturevalue("tiny_sliced_folder")
    out = tmp_path / "out"
    argv = ["finetune", str(sliced), "--out", str(out), "--data-dir", str(data_dir), *FT]
    assert message in refused([*argv, "--teacher-device", device], capsys)
    assert list(tmp_path.iterdir()) == []


def test_teacher_device_without_kd_is_one_line(tmp_path, capsys):
    line = refused(["finetune", "m", "--out", str(tmp_path / "o"), "--loss", "lm", "--teacher-device", "cpu"], capsys)
    assert "--teacher-device is only used by --loss kd, not --loss lm" in line
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SlicelmError, match="--teacher-device is only used by --loss kd"):
        FinetuneConfig(loss="lm", teacher_device="cpu")


def test_a_teacher_device_index_with_several_processes_is_one_line_before_any_process_starts(
    request, tmp_path, data_dir, capsys, no_teacher_loading, monkeypatch
):
    """Every process holds a teacher: one device named for all of them is refused (cpu is taken)."""
    _, sliced = request.getfixturevalue("tiny_sliced_folder")
    monkeypatch.setattr(finetune_cmd, "launch", lambda *a: pytest.fail("launched"))
    argv = ["finetune", str(sliced), "--out", str(tmp_path / "out"), "--data-dir", str(data_dir), *FT]
    line = refused([*argv, "--num-processes", "2", "--teacher-device", "cuda:1"], capsys)
    assert "--teacher-device cuda:1 with 2 processes would put every process's teacher on one device" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("placed", [False, True])
def test_a_teacher_that_does_not_fit_is_one_line_before_loading(
    placed, request, tmp_path, data_dir, capsys, monkeypatch, no_teacher_loading
):
    """Its weights, counted from its config on the meta device, against the memory free on its device
    (here the host's, pretended small): refused with the numbers and the ways out, nothing written."""
    dense, sliced = request.getfixturevalue("tiny_sliced_folder")
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, "1MiB")
    argv = ["finetune", str(sliced), "--out", str(tmp_path / "out"), "--data-dir", str(data_dir), *FT]
    line = refused([*argv, *(["--teacher-device", "cpu"] if placed else [])], capsys)
    teacher = sum(p.numel() for p in load_file(dense / "model.safetensors").values()) * 4 / 2**20
    assert f"the teacher {dense} does not fit on cpu: its float32 weights alone take {teacher:.1f} MiB" in line
    assert "1.0 MiB is free there; free memory, or use --loss lm (no teacher)" in line
    assert list(tmp_path.iterdir()) == []


def test_a_teacher_that_fits_is_not_refused(request, tmp_path, data_dir, monkeypatch):
    """The check counts the weights alone: with room for them the run goes on to load the teacher."""
    dense, sliced = request.getfixturevalue("tiny_sliced_folder")
    teacher = sum(p.numel() * 4 for p in load_file(dense / "model.safetensors").values())
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, str(teacher + 1))
    loaded = []

    def load_teacher(*args, **kwargs):
        loaded.append(True)
        raise SlicelmError("stop here")

    monkeypatch.setattr(finetune_cmd, "load_teacher", load_teacher)
    argv = ["finetune", str(sliced), "--out", str(tmp_path / "out"), "--data-dir", str(data_dir), *FT]
    assert main(argv) == 2 and loaded == [True]
