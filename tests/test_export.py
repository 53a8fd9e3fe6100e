"""`slicelm export`: publishing the GGUF never replaces a file, converters that lie are caught, and
the vLLM command line. The converter here is a fake script standing in for llama.cpp's (the real one
runs under ``pytest -m serving``, tests/test_serving.py)."""

from __future__ import annotations

import json
import shlex
import textwrap
from pathlib import Path

import pytest

from slicelm.cli import main

PLAIN_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "dtype": "float32"}


def fake_llama_cpp(root: Path, body: str) -> Path:
    """A folder that `find_llama_cpp` accepts: ``convert_hf_to_gguf.py`` runs ``body`` with
    ``folder`` and ``outfile`` set from its command line (``FOLDER --outfile F --outtype T``)."""
    root.mkdir(parents=True, exist_ok=True)
    script = """
        import sys
        from pathlib import Path
        folder, outfile = Path(sys.argv[1]), Path(sys.argv[sys.argv.index("--outfile") + 1])
    """
    (root / "convert_hf_to_gguf.py").write_text(textwrap.dedent(script) + textwrap.dedent(body))
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    out = tmp_path / "plain"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(PLAIN_CONFIG))
    return out


def run_export(folder: Path, gguf: Path, tools: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    code = main(["export", str(folder), "--gguf", str(gguf), "--llama-cpp", str(tools), *extra])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_file_that_appears_at_the_gguf_path_during_conversion_is_never_overwritten(folder, tmp_path, capsys):
    """S3: the path is free when export starts; another program creates it while the converter runs."""
    gguf = tmp_path / "m.gguf"
    tools = fake_llama_cpp(
        tmp_path / "llama.cpp",
        f"""
        Path({str(gguf)!r}).write_bytes(b"the user's own file")  # appears meanwhile
        outfile.write_bytes(b"GGUF converted")
        """,
    )
    code, err = run_export(folder, gguf, tools, capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("slicelm: error: ") and "appeared while converting" in err[0] and "--gguf" in err[0]
    assert gguf.read_bytes() == b"the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama.cpp", "m.gguf", "plain"]  # no temporary left


def test_a_converter_that_exits_0_without_writing_is_one_line_and_exit_2(folder, tmp_path, capsys):
    """Rough 8: exit 0, no output file -> not a FileNotFoundError traceback."""
    gguf = tmp_path / "m.gguf"
    tools = fake_llama_cpp(tmp_path / "llama.cpp", 'print("converted!")\n')
    code, err = run_export(folder, gguf, tools, capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("slicelm: error: the GGUF conversion exited 0 but wrote no m.gguf")
    assert not gguf.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["llama.cpp", "plain"]


def test_a_quantizer_that_exits_0_without_writing_is_one_line_and_exit_2(folder, tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    tools = fake_llama_cpp(tmp_path / "llama.cpp", 'outfile.write_bytes(b"GGUF f16")\n')
    bin_dir = tools / "build" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "llama-quantize").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "llama-quantize").chmod(0o755)
    code, err = run_export(folder, gguf, tools, capsys, "--outtype", "q4_k_m")
    assert code == 2 and len(err) == 1
    assert err[0].startswith("slicelm: error: llama-quantize exited 0 but wrote no m.gguf")
    assert not gguf.exists()


def test_a_successful_export_publishes_the_file_and_prints_the_vllm_command(folder, tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    tools = fake_llama_cpp(tmp_path / "llama.cpp", 'outfile.write_bytes(b"GGUF " + folder.name.encode())\n')
    code = main(["export", str(folder), "--gguf", str(gguf), "--llama-cpp", str(tools)])
    captured = capsys.readouterr()
    assert code == 0 and gguf.read_bytes() == b"GGUF plain" and captured.out.strip() == str(gguf)
    vllm = [line for line in captured.err.splitlines() if "vllm.entrypoints.openai.api_server" in line]
    assert len(vllm) == 1
    command = shlex.split(vllm[0].split(": ", 2)[2])
    server = ["python", "-m", "vllm.entrypoints.openai.api_server"]  # the CPU wheel's `vllm serve` does not start
    assert command == [*server, "--model", str(folder), "--dtype", "float32"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama.cpp", "m.gguf", "plain"]


def test_export_without_gguf_only_prints_the_vllm_command(folder, tmp_path, capsys):
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["export", str(folder)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    server = "python -m vllm.entrypoints.openai.api_server"
    assert err == [f"slicelm: serve it with vLLM: {server} --model {folder} --dtype float32"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_export_refuses_a_slicegpt_folder_for_gguf_and_vllm_naming_layout_plain(folder, tmp_path, capsys):
    config = dict(PLAIN_CONFIG, slicelm={"layout": "slicegpt"}, auto_map={"AutoModelForCausalLM": "m.M"})
    (folder / "config.json").write_text(json.dumps(config))
    tools = fake_llama_cpp(tmp_path / "llama.cpp", 'outfile.write_bytes(b"GGUF")\n')
    for argv in (["export", str(folder), "--gguf", str(tmp_path / "m.gguf"), "--llama-cpp", str(tools)],
                 ["export", str(folder)]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--layout slicegpt" in err[0] and "re-slice with --layout plain" in err[0]
    assert not (tmp_path / "m.gguf").exists()


def test_export_notes_fallback_widths_on_stderr(folder, tmp_path, capsys):
    (folder / "config.json").write_text(json.dumps(dict(PLAIN_CONFIG, hidden_size=576, intermediate_size=1144)))
    tools = fake_llama_cpp(tmp_path / "llama.cpp", 'outfile.write_bytes(b"GGUF")\n')
    bin_dir = tools / "build" / "bin"
    bin_dir.mkdir(parents=True)
    quantize = bin_dir / "llama-quantize"
    quantize.write_text('#!/bin/sh\ncp "$1" "$2"\n')
    quantize.chmod(0o755)
    code, err = run_export(folder, tmp_path / "q.gguf", tools, capsys, "--outtype", "q4_k_m")
    assert code == 0
    notes = [line for line in err if line.startswith("slicelm: note: ")]
    assert len(notes) == 2 and "hidden_size 576" in notes[0] and "legacy type" in notes[0]
    assert "intermediate_size 1144" in notes[1] and "as F16" in notes[1]
    assert (tmp_path / "q.gguf").read_bytes() == b"GGUF"


@pytest.mark.parametrize(
    "section,fragment",
    [
        ({"plan": {"layout": "plain"}}, "was sliced with --layout plain but written in slicelm's remote-code format"),
        (None, "needs remote code (m.M), which llama.cpp and vLLM cannot run"),
    ],
)
def test_rough_12_export_names_what_a_remote_code_folder_is(section, fragment, folder, tmp_path, capsys):
    """Issue 23 rough 12: a plain-layout folder in slicelm's format is not called a --layout slicegpt one."""
    config = dict(PLAIN_CONFIG, auto_map={"AutoModelForCausalLM": "m.M"})
    if section is not None:
        config["slicelm"] = section
    (folder / "config.json").write_text(json.dumps(config))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["export", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and "--layout slicegpt" not in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("vocab_size", "tokenizer", "refused"),
    [
        (49152, {"model": {"type": "BPE", "byte_fallback": False}, "decoder": {"type": "ByteLevel"}}, True),
        (128256, {"model": {"type": "BPE", "byte_fallback": False}, "decoder": {"type": "ByteLevel"}}, False),
        (32000, {"model": {"type": "BPE", "byte_fallback": True}, "decoder": {"type": "Sequence"}}, False),
    ],
)
def test_a_decilm_folder_whose_tokenizer_the_deci_converter_cannot_read_is_refused_in_one_line(
    tmp_path, capsys, vocab_size, tokenizer, refused
):
    """llama.cpp's deci converter reads a GPT-2-style BPE only at Llama 3's 128,256 tokens, else a
    Llama-2-style byte-fallback BPE (SmolLM2's tokenizer is neither: 'Cannot find Llama BPE tokenizer')."""
    from conftest import build_tiny_model

    from slicelm.layouts.decilm import save_decilm

    folder = save_decilm(build_tiny_model("llama"), tmp_path / "deci", llama_cpp=True)  # widths it reads
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"vocab_size": vocab_size}))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    tools = fake_llama_cpp(tmp_path / "llama.cpp", 'outfile.write_bytes(b"GGUF deci")\n')
    code, err = run_export(folder, tmp_path / "m.gguf", tools, capsys)
    if refused:
        assert code == 2 and len(err) == 1 and not (tmp_path / "m.gguf").exists()
        assert "deci converter cannot read this DeciLM folder" in err[0] and "vocab_size 49152" in err[0]
    else:
        assert code == 0 and (tmp_path / "m.gguf").read_bytes() == b"GGUF deci"
