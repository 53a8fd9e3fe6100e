"""Issue 11, reproduced: every way a user's files could be destroyed, a broken model written, or a
traceback shown instead of one line — and that each is now refused (exit 2, nothing written).

The numbered comments refer to the issue's list; docs/reliability.md has the same table in prose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_OVERRIDES, build_tiny_model
from helpers import padded_batch, relative_error

from slicelm.cli import main
from slicelm.errors import SlicelmError
from slicelm.io.outputs import MANIFEST, OutputClaim
from slicelm.layouts.checkpoint import load_sliced

CALIB = ["--calib", "c4", "--calib-samples", "4", "--calib-seqlen", "32", "--calib-batch-size", "2", "--quiet"]


def run_cli(argv, capsys):
    """(exit code, stdout, stderr lines without blank ones)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.replace("\r", "\n").splitlines() if line.strip()]
    return code, captured.out, lines


def assert_one_line_error(code, lines, *fragments):
    assert code == 2, lines
    assert lines and lines[-1].startswith("slicelm: error: "), lines
    assert not any("Traceback" in line for line in lines), lines
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def save_model_folder(folder: Path, tokenizer, model_type: str = "llama", **overrides) -> Path:
    model = build_tiny_model(model_type, vocab_size=len(tokenizer), **overrides)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny Llama with a real tokenizer, saved to disk like any Hugging Face checkpoint."""
    return save_model_folder(tmp_path_factory.mktemp("src") / "tiny", smollm2_tokenizer, tie_word_embeddings=True)


def slice_args(source, out, *extra):
    return ["slice", source, "--sparsity", 0.25, *CALIB, "--out", out, *extra]


def tree(folder: Path) -> dict[str, int]:
    """Every file below ``folder`` with its size: to show that nothing changed."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# 1-3. Data loss
# --------------------------------------------------------------------------------------------------
def test_1_overwrite_never_deletes_the_source_or_its_parent(tiny_source, tmp_path, capsys, data_dir):
    parent = tmp_path / "parent"
    parent.mkdir()
    source = parent / "src"
    source.mkdir()
    for f in tiny_source.iterdir():
        (source / f.name).write_bytes(f.read_bytes())
    (parent / "notes.txt").write_text("my notes")
    before = tree(parent)
    for out in (parent, source):  # the folder holding the source, and the source itself
        code, _, lines = run_cli(slice_args(source, out, "--overwrite", "--data-dir", data_dir), capsys)
        assert_one_line_error(code, lines, "source model")
    assert tree(parent) == before


def test_1_overwrite_never_replaces_the_current_directory_or_a_foreign_folder(
    tiny_source, tmp_path, capsys, data_dir, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", str(tmp_path)):  # the current directory, and one of its ancestors
        code, _, lines = run_cli(slice_args(tiny_source, out, "--overwrite", "--data-dir", data_dir), capsys)
        assert_one_line_error(code, lines, "current directory")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    code, _, lines = run_cli(slice_args(tiny_source, foreign, "--overwrite", "--data-dir", data_dir), capsys)
    assert_one_line_error(code, lines, "only replaces folders slicelm wrote")
    assert (foreign / "thesis.tex").read_text() == "years of work" and (work / "keep.txt").is_file()


def test_1_overwrite_replaces_an_earlier_output_but_not_one_with_added_files(tiny_source, tmp_path, capsys, data_dir):
    out = tmp_path / "out"
    assert run_cli(slice_args(tiny_source, out, "--data-dir", data_dir), capsys)[0] == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["created_by"] == "slicelm" and "model.safetensors" in manifest["entries"]
    assert run_cli(slice_args(tiny_source, out, "--overwrite", "--data-dir", data_dir), capsys)[0] == 0
    (out / "my-eval.json").write_text("{}")  # the user added a file: the folder is no longer only ours
    code, _, lines = run_cli(slice_args(tiny_source, out, "--overwrite", "--data-dir", data_dir), capsys)
    assert_one_line_error(code, lines, "holds files slicelm did not write (my-eval.json)")
    assert (out / "my-eval.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temporary or lock files left behind"


def test_2_two_runs_cannot_claim_one_output(tiny_source, tmp_path, capsys, data_dir):
    out = tmp_path / "out"
    with OutputClaim(out, overwrite=False):  # another run is busy writing `out`
        code, _, lines = run_cli(slice_args(tiny_source, out, "--data-dir", data_dir), capsys)
        assert_one_line_error(code, lines, "another slicelm run", f"pid {os.getpid()}")
    assert not out.exists()
    assert run_cli(slice_args(tiny_source, out, "--data-dir", data_dir), capsys)[0] == 0
    with pytest.raises(SlicelmError, match="already exists"):  # and once published, a second claim fails
        OutputClaim(out, overwrite=False)


def test_3_a_killed_run_leaves_nothing_that_the_next_run_does_not_remove(tmp_path):
    """SIGKILL in the middle of publishing: the next claim on that folder removes what was left."""
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import os, signal
        from slicelm.core.offload import ActivationStore
        from slicelm.io.outputs import OutputClaim
        import torch
        store = ActivationStore(max_bytes=0, offload_dir={str(tmp_path / "offload")!r})
        store["x"] = torch.ones(4)  # spilled to a memory-mapped file under the offload folder
        claim = OutputClaim({str(out)!r}, overwrite=False)
        with claim.stage() as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert any(".slicelm-tmp-" in n for n in left) and any(n.endswith("slicelm-lock") for n in left)
    assert list((tmp_path / "offload").iterdir())
    with OutputClaim(out, overwrite=False) as claim, claim.stage() as tmp:
        (tmp / "x").write_text("new")
        from slicelm.core.offload import ActivationStore

        store = ActivationStore(max_bytes=0, offload_dir=tmp_path / "offload")
        store["y"] = torch.ones(4)
        assert len(list((tmp_path / "offload").iterdir())) == 1  # the dead run's folder is gone, ours remains
        store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["offload", "out"]
    assert not list((tmp_path / "offload").iterdir())


def test_3_entries_of_live_processes_are_kept(tmp_path):
    from slicelm.io.outputs import remove_stale, temp_name

    mine = tmp_path / (temp_name(".out.slicelm-tmp") + "abcd")
    mine.mkdir()
    other_host = tmp_path / ".out.slicelm-tmp-otherhost-1-abcd"
    other_host.mkdir()
    user = tmp_path / ".out.slicelm-tmp-notes"
    user.mkdir()
    assert remove_stale(tmp_path, ".out.slicelm-tmp") == []
    assert mine.is_dir() and other_host.is_dir() and user.is_dir()


# --------------------------------------------------------------------------------------------------
# 4-9. Silently broken models
# --------------------------------------------------------------------------------------------------
def test_4_non_finite_source_weights_are_refused_by_name(tmp_path, smollm2_tokenizer, capsys, data_dir):
    source = save_model_folder(tmp_path / "nan", smollm2_tokenizer)
    from safetensors.torch import load_file, save_file

    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    for extra in ([], ["--stream"]):
        code, _, lines = run_cli(slice_args(source, tmp_path / "out", "--data-dir", data_dir, *extra), capsys)
        assert_one_line_error(code, lines, "model.layers.1.mlp.down_proj.weight", "non-finite")
        assert not (tmp_path / "out").exists()


def test_4_non_finite_values_produced_on_the_way_are_refused(tmp_path):
    """float16 overflow inside the network: no model is written, the error names the point."""
    from slicelm.layouts.checkpoint import save_sliced
    from slicelm.slicing import SliceConfig, slice_model

    model = build_tiny_model("llama").to(torch.float16)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(6e4)  # finite, but the MLP's output overflows float16
    calibration = [torch.randint(3, 96, (16,)) for _ in range(4)]
    with pytest.raises(SlicelmError, match=r"residual stream at layer.* holds non-finite values"):
        slice_model(model, calibration, SliceConfig(sparsity=0.25), progress=False)
    with pytest.raises(SlicelmError, match="not sliced"):  # the refused model cannot be saved as sliced
        save_sliced(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_4_report_json_is_strict():
    from slicelm.io.outputs import to_json

    text = to_json({"ppl": float("nan"), "nested": [float("inf"), 1.5]})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard {c}")) == {
        "ppl": None,
        "nested": [None, 1.5],
    }


def test_5_a_source_checkpoint_missing_a_tensor_is_refused_in_memory(tmp_path, smollm2_tokenizer, capsys, data_dir):
    source = save_model_folder(tmp_path / "incomplete", smollm2_tokenizer)
    from safetensors.torch import load_file, save_file

    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    code, _, lines = run_cli(slice_args(source, tmp_path / "out", "--data-dir", data_dir), capsys)
    assert_one_line_error(code, lines, "1 missing keys", "model.layers.0.self_attn.k_proj.weight")
    assert not (tmp_path / "out").exists()


def test_5_wrong_shape_and_truncated_source_tensors_are_refused(tmp_path, smollm2_tokenizer, capsys, data_dir):
    from safetensors.torch import load_file, save_file

    source = save_model_folder(tmp_path / "shape", smollm2_tokenizer)
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    code, _, lines = run_cli(slice_args(source, tmp_path / "out", "--data-dir", data_dir), capsys)
    assert_one_line_error(code, lines, "model.layers.0.mlp.up_proj.weight is [3, 3], expected [96, 64]")
    truncated = save_model_folder(tmp_path / "truncated", smollm2_tokenizer)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, lines = run_cli(slice_args(truncated, tmp_path / "out", "--data-dir", data_dir), capsys)
    assert_one_line_error(code, lines, "damaged or truncated")
    assert not (tmp_path / "out").exists()


def test_6_gpt_neox_checkpoint_from_disk_round_trips(tmp_path, smollm2_tokenizer, capsys, data_dir):
    """transformers stores GPT-NeoX's head as `embed_out` on disk and `lm_head` in memory."""
    source = save_model_folder(tmp_path / "pythia", smollm2_tokenizer, "gpt_neox", use_parallel_residual=True)
    out = tmp_path / "out"
    code, _, lines = run_cli(["slice", source, "--sparsity", 0, *CALIB, "--out", out, "--data-dir", data_dir], capsys)
    assert code == 0, lines
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(source).eval()
    ids, mask = padded_batch(96)
    with torch.no_grad():
        expected = original(input_ids=ids, attention_mask=mask).logits
        got = load_sliced(out)(input_ids=ids, attention_mask=mask).logits
    assert relative_error(expected, got, mask) <= 1e-4


@pytest.fixture(scope="module")
def sliced_folder(tmp_path_factory, tiny_source, data_dir):
    out = tmp_path_factory.mktemp("sliced") / "out"
    assert main([str(a) for a in slice_args(tiny_source, out, "--data-dir", data_dir)]) == 0
    return out


def _tampered(folder: Path, tmp_path: Path, edit) -> Path:
    import shutil

    copy = tmp_path / f"tampered-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(folder, copy)
    edit(copy)
    return copy


def _edit_config(change):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def _drop_tensor(name):
    def edit(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        del tensors[name]
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    return edit


TAMPERING = {
    "norm_eps": (_edit_config(lambda c: c["slicelm"].__setitem__("norm_eps", 0.5)), "checksum mismatch"),
    "hidden_size": (_edit_config(lambda c: c["slicelm"]["plan"].__setitem__("hidden_size", 48)), "checksum"),
    "tied_head": (_edit_config(lambda c: c["slicelm"].pop("tied_head")), "checksum mismatch"),
    "tie_flag": (_edit_config(lambda c: c.__setitem__("tie_word_embeddings", False)), "tied_head disagree"),
    "no_section": (_edit_config(lambda c: c["slicelm"].pop("layout")), "checksum mismatch"),
    "garbage": (_edit_config(lambda c: c.__setitem__("slicelm", "not json {")), "not JSON"),
    "shortcut": (_drop_tensor("model.layers.1.attn_shortcut.weight"), "1 missing keys"),
    "embedding": (_drop_tensor("model.embed_tokens.weight"), "not in the checkpoint"),
}


def test_7_tampered_or_incomplete_folders_are_refused_by_slicelm_and_by_plain_transformers(sliced_folder, tmp_path):
    folders = {name: _tampered(sliced_folder, tmp_path, edit) for name, (edit, _) in TAMPERING.items()}
    for name, folder in folders.items():
        with pytest.raises(SlicelmError, match=TAMPERING[name][1]):
            load_sliced(folder)
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["slicelm"] = None
        from transformers import AutoModelForCausalLM
        results = {{}}
        for name, folder in { ({k: str(v) for k, v in folders.items()})!r}.items():
            try:
                AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
                results[name] = "loaded"
            except Exception as error:
                results[name] = str(error)
        print(json.dumps(results))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for name, (_, fragment) in TAMPERING.items():
        assert fragment in got[name], f"{name}: {got[name]}"


def test_8_round_to_larger_than_the_width_is_refused(tiny_source, tmp_path, capsys, data_dir):
    code, _, lines = run_cli(slice_args(tiny_source, tmp_path / "o", "--round-to", 128, "--data-dir", data_dir), capsys)
    assert_one_line_error(code, lines, "--round-to 128", "lower --round-to")
    assert not (tmp_path / "o").exists()


def test_9_streaming_counts_a_tied_embedding_once(tiny_source, tmp_path, capsys, data_dir):
    reports = {}
    for mode in ("memory", "stream"):
        out = tmp_path / mode
        extra = ["--stream"] if mode == "stream" else []
        assert run_cli(slice_args(tiny_source, out, "--data-dir", data_dir, *extra), capsys)[0] == 0
        reports[mode] = json.loads((out / "slicelm_report.json").read_text())
    assert reports["stream"]["params_before"] == reports["memory"]["params_before"]
    assert reports["stream"]["params_after"] == reports["memory"]["params_after"]


# --------------------------------------------------------------------------------------------------
# 10. One line instead of a traceback — before the work when it can be known then
# --------------------------------------------------------------------------------------------------
def test_10_sequences_beyond_learned_positions(tmp_path, smollm2_tokenizer, capsys, data_dir):
    source = save_model_folder(tmp_path / "gpt2", smollm2_tokenizer, "gpt2")  # 128 positions
    argv = ["slice", source, "--sparsity", 0.2, "--calib-seqlen", 256, "--out", tmp_path / "o", "--data-dir", data_dir]
    code, _, lines = run_cli(argv, capsys)
    assert_one_line_error(code, lines, "--calib-seqlen 256 is longer than the model's 128 positions")
    code, _, lines = run_cli(["ppl", source, "--seqlen", 256, "--data-dir", data_dir], capsys)
    assert_one_line_error(code, lines, "--seqlen 256 is longer than the model's 128 positions")


def test_10_non_utf8_and_uppercase_calibration_files(tiny_source, tmp_path, capsys, data_dir):
    latin = tmp_path / "latin1.TXT"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 400)
    code, _, lines = run_cli(
        ["slice", tiny_source, "--sparsity", 0.2, "--calib", latin, "--out", tmp_path / "o"], capsys
    )
    assert_one_line_error(code, lines, "is not UTF-8 text")
    good = tmp_path / "good.TXT"  # an upper-case suffix is still a text file
    good.write_text("the cat sat on the mat. " * 400)
    argv = ["slice", tiny_source, "--sparsity", 0.2, "--calib", good, "--calib-samples", 2, "--calib-seqlen", 32]
    assert run_cli([*argv, "--out", tmp_path / "o", "--quiet"], capsys)[0] == 0


def test_10_unwritable_outputs_fail_before_slicing(tiny_source, tmp_path, capsys, data_dir):
    if Path("/sys").is_dir() and os.geteuid() == 0:
        target = Path("/sys/slicelm-test-out")  # root ignores permission bits; /sys refuses even root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out"
    code, _, lines = run_cli(slice_args(tiny_source, target, "--data-dir", data_dir), capsys)
    assert_one_line_error(code, lines, "cannot write to", "permission denied")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, lines = run_cli(slice_args(tiny_source, blocker / "out", "--data-dir", data_dir), capsys)
    assert_one_line_error(code, lines, "is not a folder")


def test_10_eval_output_problems_never_lose_the_result(tiny_source, tmp_path, capsys, data_dir, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    base = ["eval", tiny_source, "--tasks", "piqa", "--limit", 2, "--data-dir", data_dir, "--device", "cpu"]
    code, stdout, lines = run_cli([*base, "--output", blocker / "eval.json"], capsys)
    assert_one_line_error(code, lines, "is a file, not a folder")
    assert stdout == ""  # refused before evaluating: nothing was computed to lose

    import slicelm.io.outputs

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(slicelm.io.outputs, "write_result_file", disk_full)
    code, stdout, lines = run_cli([*base, "--output", tmp_path / "eval.json"], capsys)
    assert_one_line_error(code, lines, "No space left on device", "the result is above")
    assert json.loads(stdout)["tasks"]["piqa"]["samples"] == 2  # printed before the write failed


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["eval", "--limit", "inf"], "must be a finite number"),
        (["eval", "--device", "cuda:7"], "--device cuda:7"),
        (["slice", "--sparsity", "0.2", "--stream", "--max-memory", "1e400", "--out", "o"], "not a usable size"),
        (["slice", "--sparsity", "0.2", "--stream", "--max-memory=-1GiB", "--out", "o"], "not a usable size"),
        (["slice", "--sparsity", "0.2", "--out", "o", "--device", "tpu"], "unknown device"),
    ],
)
def test_10_bad_numbers_and_devices_are_one_line(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, lines = run_cli(argv, capsys)
    assert_one_line_error(code, lines, fragment)
    assert not (tmp_path / "o").exists()


def test_10_malformed_section_through_the_cli(sliced_folder, tmp_path, capsys, data_dir):
    folder = _tampered(sliced_folder, tmp_path, TAMPERING["garbage"][0])
    code, _, lines = run_cli(["ppl", folder, "--max-windows", 1, "--seqlen", 32, "--data-dir", data_dir], capsys)
    assert_one_line_error(code, lines, "not JSON")


def test_10_published_folders_get_normal_permissions(sliced_folder):
    umask = os.umask(0)
    os.umask(umask)
    assert sliced_folder.stat().st_mode & 0o777 == 0o777 & ~umask


# --------------------------------------------------------------------------------------------------
# Rough edges
# --------------------------------------------------------------------------------------------------
def test_quiet_means_quiet_and_growth_is_reported(tiny_source, tmp_path, capfd, data_dir):
    # A thin slice of the stream: the shortcut matrices outweigh what it removes.
    code = main([str(a) for a in ["slice", tiny_source, "--sparsity", 0.125, *CALIB, "--out", tmp_path / "o"]])
    err = capfd.readouterr().err
    assert code == 0
    assert "it/s" not in err and "Loading weights" not in err and "%|" not in err, err
    assert "note            the sliced model is larger than the original" in err


# --------------------------------------------------------------------------------------------------
# Every family: a checkpoint saved to disk, sliced through the CLI, reloaded by plain transformers
# --------------------------------------------------------------------------------------------------
DISK_CASES = sorted(FAMILY_OVERRIDES)


def test_every_family_round_trips_a_checkpoint_from_disk(tmp_path_factory, smollm2_tokenizer, data_dir):
    """Sparsity 0 must reproduce the original checkpoint's logits through plain transformers with
    remote code and no slicelm; 0.25 must reproduce what slicelm itself loads."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("disk")
    ids, mask = padded_batch(96)
    expected, folders = {}, {}
    for model_type in DISK_CASES:
        tied = model_type in ("llama", "gemma", "qwen2")  # families whose small models ship tied
        source = save_model_folder(root / model_type, smollm2_tokenizer, model_type, tie_word_embeddings=tied)
        with torch.no_grad():
            expected[f"{model_type}-0"] = AutoModelForCausalLM.from_pretrained(source)(ids, attention_mask=mask).logits
        for sparsity in (0.0, 0.25):
            out = root / f"{model_type}-{sparsity:g}"
            argv = ["slice", source, "--sparsity", sparsity, *CALIB, "--out", out, "--data-dir", data_dir]
            assert main([str(a) for a in argv]) == 0, model_type
            folders[f"{model_type}-{sparsity:g}"] = str(out)
        with torch.no_grad():
            expected[f"{model_type}-0.25"] = load_sliced(root / f"{model_type}-0.25")(ids, attention_mask=mask).logits
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["slicelm"] = None
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(1)
        ids, mask = torch.tensor({ids.tolist()}), torch.tensor({mask.tolist()})
        results = {{}}
        for case, folder in {folders!r}.items():
            try:
                model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
                with torch.no_grad():
                    results[case] = model(input_ids=ids, attention_mask=mask).logits.tolist()
            except Exception as error:
                results[case] = repr(error)
        print(json.dumps(results))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    problems = []
    for case, reference in expected.items():
        if isinstance(got[case], str):
            problems.append(f"{case}: {got[case]}")
            continue
        error = relative_error(reference, torch.tensor(got[case]), mask)
        if error > 1e-4:
            problems.append(f"{case}: relative logit error {error:.2e}")
    assert not problems, "\n".join(problems)


def test_sweep_never_writes_into_a_foreign_folder(tmp_path):
    from slicelm.measure.sweep import SweepConfig, run_sweep

    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "paper.md").write_text("draft")
    with pytest.raises(SlicelmError, match="not a slicelm sweep folder"):
        run_sweep(SweepConfig(model="unused", sparsities=(0.1,)), foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["paper.md"]


def test_slice_streams_by_itself_when_memory_is_short(tiny_source, tmp_path, capfd, data_dir, monkeypatch):
    """A model that would not fit is streamed from disk (one line says so), not killed by the OOM killer."""
    monkeypatch.setenv("SLICELM_AVAILABLE_MEMORY", "64MiB")
    out = tmp_path / "o"
    assert main([str(a) for a in slice_args(tiny_source, out, "--data-dir", data_dir)]) == 0
    err = capfd.readouterr().err
    assert "streaming layers from disk (as with --stream)" in err
    assert json.loads((out / "slicelm_report.json").read_text())["streamed"] is True


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--target-params", "0.001"], "below the smallest model schedule auto can make"),
        (["--target-params", "0"], "in (0, 1)"),
        (["--target-params", "1.5"], "in (0, 1)"),
        (["--target-params", "0.8", "--sparsity", "0.2"], "not both"),
        (["--mlp-sparsity", "1.2"], "--mlp-sparsity must be in [0, 1)"),
    ],
)
def test_impossible_budgets_are_refused_before_loading(extra, fragment, tiny_source, tmp_path, capsys, monkeypatch):
    import slicelm.io.models

    def no_loading(*_args, **_kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(slicelm.io.models, "load_model", no_loading)
    code, _, lines = run_cli(["slice", tiny_source, *extra, "--out", tmp_path / "o", "--quiet"], capsys)
    assert_one_line_error(code, lines, fragment)
    assert not (tmp_path / "o").exists()


def test_plain_layout_of_a_layernorm_family_is_refused_before_loading(tmp_path, smollm2_tokenizer, capsys):
    source = save_model_folder(tmp_path / "opt", smollm2_tokenizer, "opt")
    code, _, lines = run_cli(
        ["slice", source, "--sparsity", 0.25, "--layout", "plain", "--out", tmp_path / "o"], capsys
    )
    assert_one_line_error(code, lines, "--layout plain needs an RMSNorm model and opt uses LayerNorm")
