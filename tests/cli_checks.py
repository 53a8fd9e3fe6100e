"""CLI runs and the checks every refusal must pass: one line, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

from conftest import build_tiny_model

from slicelm.cli import main

CALIB = ["--calib", "c4", "--calib-samples", "4", "--calib-seqlen", "32", "--calib-batch-size", "2", "--quiet"]


def run_cli(argv, capsys) -> tuple[int, str, list[str]]:
    """(exit code, stdout, stderr lines without blank ones)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.replace("\r", "\n").splitlines() if line.strip()]
    return code, captured.out, lines


def assert_one_line_error(code, lines, *fragments) -> None:
    assert code == 2, lines
    assert lines and lines[-1].startswith("slicelm: error: "), lines
    assert not any("Traceback" in line for line in lines), lines
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def save_model_folder(folder: Path, tokenizer, model_type: str = "llama", **overrides) -> Path:
    """A tiny random model of ``model_type`` with ``tokenizer``'s vocabulary, saved like any HF checkpoint."""
    model = build_tiny_model(model_type, vocab_size=len(tokenizer), **overrides)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tree(folder: Path) -> dict[str, int]:
    """Every file below ``folder`` with its size: to show that nothing changed."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
