"""The code base stays lint-clean (ruff, configured in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import REPO


def test_ruff_check_is_clean():
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(REPO / ".venv" / "bin"))
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e .[dev])")
    result = subprocess.run(
        [ruff, "check", "src", "tests", "benchmarks"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
