"""Output formats: a one-basis plan whose layers differ is written as a DeciLM folder, served as is.

The registry (checkpoint.OUTPUT_FORMATS) picks the most portable format that holds a plan; an
explicit ``--format`` that cannot hold it is refused in one line before any weights load.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from cli_checks import CALIB, assert_one_line_error, run_cli
from conftest import build_tiny_model
from helpers import calibration, logits, padded_batch, relative_error
from safetensors import safe_open
from test_decilm import keep_heads, vllm_view

from slicelm.allocate.context import PlanContext
from slicelm.allocate.counting import ParameterCounter
from slicelm.config import SliceConfig
from slicelm.core.arch import resolve
from slicelm.core.plan import LayerWidths, SlicingPlan
from slicelm.errors import SlicelmError
from slicelm.io.outputs import read_manifest
from slicelm.layouts.checkpoint import OUTPUT_FORMATS, choose_format, save_sliced
from slicelm.layouts.decilm import deci_blocks, save_decilm
from slicelm.layouts.plain import to_shaped_model
from slicelm.slicing import slice_model
from slicelm.steps.blocks import remove_attention, remove_layer, remove_mlp

# In-memory sliced model (slicelm's classes) against the folder through its own modeling file, both
# float32: measured 0.0 (the same operations); 1e-4 is the bound and leaves room for kernels.
TOL = 1e-4
NON_UNIFORM = SliceConfig(target_params=0.8, schedule="mlp-global", layout="plain", round_to=1)


def sliced_non_uniform(tied: bool = False, model_type: str = "llama"):
    model = build_tiny_model(model_type, num_hidden_layers=4, intermediate_size=192, tie_word_embeddings=tied)
    report = slice_model(model, calibration(96), NON_UNIFORM, progress=False)
    assert len({lw.get("mlp") for lw in report.plan["layers"]}) > 1  # per-layer MLP widths
    return model, report


def stored_parameters(folder) -> int:
    """Parameters in the folder's safetensors shards (what is written: zero padding included)."""
    total = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    return total


def folder_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}


@pytest.fixture(scope="module")
def deci_folders(tmp_path_factory):
    """{case: (in-memory logits, report, folder)}: non-uniform plain plans saved with format auto."""
    ids, mask = padded_batch(96)
    root = tmp_path_factory.mktemp("formats")
    saved = {}
    for case, tied, model_type in (("untied", False, "llama"), ("tied", True, "llama"), ("qwen2", False, "qwen2")):
        model, report = sliced_non_uniform(tied, model_type)
        folder = save_sliced(model, root / case, report={"plan": report.plan})
        saved[case] = (logits(model, ids, mask), report, folder)
    model = build_tiny_model("llama", num_hidden_layers=4, intermediate_size=192, tie_word_embeddings=True)
    report = slice_model(model, calibration(96), plan=HEADS_PLAN, progress=False)
    saved["heads"] = (logits(model, ids, mask), report, save_sliced(model, root / "heads"))
    return saved


# Per-layer heads and sub-blocks as plan entries: one KV group of two query heads (zero-padded to four
# in the folder), attention removed, MLP removed, one query head per group; the stream kept whole.
HEADS_PLAN = SlicingPlan(
    64,
    64,
    (
        LayerWidths(64, 64, 120, kv_heads=1, q_per_kv=2),
        LayerWidths(64, 64, 100, kv_heads=0, q_per_kv=0),
        LayerWidths(64, 64, 0),
        LayerWidths(64, 64, 150, kv_heads=2, q_per_kv=1),
    ),
    layout="plain",
)


def served_layers(plan: dict) -> list[tuple]:
    """(no-op attention, no-op FFN, query heads, KV heads, MLP width) per layer as vLLM derives them
    from the folder (4 query heads in every attention layer, zero-padded; tiny configs: 2 KV heads)."""
    out = []
    for lw in plan["layers"]:
        attention = lw.get("kv_heads", 2) != 0
        kv = None if not attention else (2 if lw.get("kv_heads") in (None, 2) else lw["kv_heads"])
        width = None if lw.get("mlp") == 0 else lw.get("mlp", 192)
        out.append((not attention, width is None, 4 if attention else None, kv, width))
    return out


def test_auto_writes_a_non_uniform_one_basis_plan_as_decilm(deci_folders):
    for case, (_, report, folder) in deci_folders.items():
        raw = json.loads((folder / "config.json").read_text())
        assert raw["architectures"] == ["DeciLMForCausalLM"] and raw["model_type"] == "nemotron-nas", case
        widths = [b["ffn"].get("intermediate_size") for b in raw["block_configs"]]
        assert widths == [row[-1] for row in served_layers(report.plan)], case
        names = {p.name for p in folder.iterdir()}
        assert {"modeling_decilm.py", "configuration_decilm.py", "slicing_plan.json"} <= names, case
        assert "modeling_slicelm.py" not in names and "slicelm" not in raw, case
        assert read_manifest(folder)["kind"] == "decilm-model", case
        assert json.loads((folder / "slicing_plan.json").read_text())["layers"] == report.plan["layers"], case


def test_decilm_folder_loads_without_slicelm_with_the_in_memory_logits(deci_folders):
    ids, mask = padded_batch(96)
    folders = {case: str(entry[2]) for case, entry in deci_folders.items()}
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["slicelm"] = None  # the folder's own modeling file must be enough
        import torch
        torch.set_num_threads(1)
        from transformers import AutoModelForCausalLM
        ids, mask = torch.tensor({ids.tolist()}), torch.tensor({mask.tolist()})
        out = {{}}
        for case, folder in {folders!r}.items():
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
            with torch.no_grad():
                out[case] = [type(model).__module__, model(input_ids=ids, attention_mask=mask).logits.tolist()]
        print(json.dumps(out))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for case, (expected, _, _) in deci_folders.items():
        assert got[case][0].startswith("transformers_modules."), case
        assert relative_error(expected, torch.tensor(got[case][1]), mask) <= TOL, case


def test_decilm_config_is_what_vllm_reads(deci_folders):
    from transformers import AutoConfig

    for case in ("untied", "heads"):
        _, report, folder = deci_folders[case]
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        assert vllm_view(config) == served_layers(report.plan), case


def test_decilm_folder_round_trips_through_slicelm_load_and_save(deci_folders, tmp_path):
    from slicelm.layouts.decilm import load_decilm

    ids, mask = padded_batch(96)
    expected, report, folder = deci_folders["tied"]
    loaded = load_decilm(folder)  # slicelm's own copy of the modeling file (slicelm.io.models.load_model's path)
    assert type(loaded).__module__ == "slicelm.modeling.modeling_decilm"
    assert relative_error(expected, logits(loaded, ids, mask), mask) <= TOL
    again = save_decilm(loaded, tmp_path / "again", plan=json.loads((folder / "slicing_plan.json").read_text()))
    assert (
        json.loads((again / "config.json").read_text())["block_configs"]
        == json.loads((folder / "config.json").read_text())["block_configs"]
    )
    assert SlicingPlan.load(again / "slicing_plan.json") == SlicingPlan.from_dict(report.plan)


@pytest.mark.parametrize("case", ["untied", "tied", "heads"])
def test_planning_counts_the_decilm_folder_exactly(deci_folders, case):
    """Planning's count, the report's params_after and the folder's stored tensors agree (zero padding
    of query heads included)."""
    _, report, folder = deci_folders[case]
    stored = stored_parameters(folder)
    assert report.params_after == stored
    if case != "heads":  # planned by a budget; the heads case follows a given plan
        assert report.planning["planned_count"] == stored
    parameters = json.loads((folder / "slicelm_report.json").read_text())["parameters"]
    assert parameters["stored"] == stored and (parameters["zero_padding"] > 0) == (case == "heads")


def test_counter_counts_a_hand_written_non_uniform_plan_as_its_decilm_folder(tmp_path):
    model = build_tiny_model("llama", num_hidden_layers=3, intermediate_size=192)
    plan = SlicingPlan(64, 64, tuple(LayerWidths(64, 64, m) for m in (40, None, 136)), layout="plain")
    layout = resolve(model)
    counted = ParameterCounter(PlanContext(layout, model.config, "plain", False, 192)).count(plan)
    slice_model(model, calibration(96), plan=plan, progress=False)
    folder = save_sliced(model, tmp_path / "out")
    assert read_manifest(folder)["kind"] == "decilm-model"
    assert counted == stored_parameters(folder)


def test_removed_heads_and_sub_blocks_of_a_one_basis_model_are_written_exactly(tmp_path):
    """What the executor makes of head and sub-block removal (fewer q/k/v rows, ZeroBranch) is written
    as DeciLM: same logits, the removed parts absent, the zero padding of query heads counted."""
    from transformers import AutoModelForCausalLM

    model, _ = sliced_non_uniform(tied=True)
    layout, layers = resolve(model), model.model.layers
    keep_heads(layers[0].self_attn, [1], [2, 3])  # one KV group of two query heads left
    remove_attention(layers[1], layout)
    remove_mlp(layers[2], layout)
    remove_layer(layers[3], layout)
    ids, mask = padded_batch(96)
    expected = logits(model, ids, mask)
    shaped = to_shaped_model(model)
    assert [(b.query_heads, b.kv_heads, b.mlp is None) for b in deci_blocks(shaped)] == [
        (2, 1, False),
        (None, None, False),
        (4, 2, True),
        (None, None, True),
    ]
    assert relative_error(expected, logits(shaped, ids, mask), mask) <= TOL
    folder = save_sliced(model, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    assert relative_error(expected, logits(loaded, ids, mask), mask) <= TOL
    parameters = json.loads((folder / "slicelm_report.json").read_text())["parameters"]
    head_dim, width, bias = 16, 64, model.config.attention_bias
    padding = 2 * head_dim * (width + int(bias)) + width * 2 * head_dim  # two zero query heads: q rows, o columns
    assert parameters["zero_padding"] == padding
    assert parameters["stored"] == stored_parameters(folder) == sum(p.numel() for p in shaped.parameters()) + padding


def test_the_registry_picks_the_most_portable_format_that_holds_the_plan():
    config = build_tiny_model("llama").config
    uniform = SlicingPlan(64, 48, tuple(LayerWidths(48, 48, 80) for _ in range(3)), layout="plain")
    per_layer = uniform.with_mlp([80, 40, None])
    shortcuts = SlicingPlan(64, 48, tuple(LayerWidths(48, 48) for _ in range(3)))
    assert list(OUTPUT_FORMATS) == ["stock", "decilm", "slicelm"]
    assert choose_format(uniform, config).name == "stock"
    assert choose_format(per_layer, config).name == "decilm"
    assert choose_format(shortcuts, config).name == "slicelm"
    assert choose_format(per_layer, build_tiny_model("qwen3").config).name == "slicelm"  # q/k norms: no DeciLM
    assert choose_format(uniform, config, "decilm").name == "decilm"
    no_first_attention = per_layer.with_heads([(0, 0), None, None])  # vLLM 0.32 cannot run it as DeciLM
    assert choose_format(no_first_attention, config).name == "slicelm"
    assert choose_format(no_first_attention.with_mlp([0, 40, None]), config).name == "decilm"  # layer left out
    for plan, fmt, fragment in (
        (per_layer, "stock", "one MLP width"),
        (shortcuts, "decilm", "shortcut matrices"),
        (per_layer.with_mlp([80, 40, 8]), "decilm", None),
    ):
        if fragment is None:
            assert choose_format(plan, config, fmt).name == fmt
            continue
        with pytest.raises(SlicelmError, match=fragment):
            choose_format(plan, config, fmt)


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2_tokenizer):
    """A tiny Llama (MLP 512 wide) with SmolLM2's tokenizer, saved like any Hugging Face checkpoint."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model = build_tiny_model("llama", vocab_size=len(smollm2_tokenizer), num_hidden_layers=4, intermediate_size=512)
    model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def plan_file(path, widths):
    plan = SlicingPlan(64, 64, tuple(LayerWidths(64, 64, m) for m in widths), layout="plain")
    plan.save(path)
    return path


@pytest.fixture(scope="module")
def cli_deci(tiny_folder, tmp_path_factory, data_dir):
    """A DeciLM folder written by ``slicelm slice --plan`` (MLP widths llama.cpp can read: 256 steps)."""
    root = tmp_path_factory.mktemp("cli")
    plan = plan_file(root / "plan.json", [512, 256, 256, None])
    out = root / "deci"
    from slicelm.cli import main

    assert (
        main(["slice", str(tiny_folder), "--plan", str(plan), *CALIB, "--data-dir", str(data_dir), "--out", str(out)])
        == 0
    )
    return out


def test_cli_plan_is_written_as_decilm_and_reported(cli_deci):
    raw = json.loads((cli_deci / "config.json").read_text())
    assert [b["ffn"]["intermediate_size"] for b in raw["block_configs"]] == [512, 256, 256, 512]
    assert [b["ffn"]["ffn_mult"] for b in raw["block_configs"]]  # multiples of 256: llama.cpp reads them
    report = json.loads((cli_deci / "slicelm_report.json").read_text())
    assert report["format"] == "decilm" and read_manifest(cli_deci)["kind"] == "decilm-model"
    assert report["params_after"] == report["parameters"]["stored"] == stored_parameters(cli_deci)


def test_ppl_eval_and_export_take_a_decilm_folder_and_slice_and_finetune_refuse_it(
    cli_deci, data_dir, tmp_path, capsys
):
    from slicelm.io.models import load_model
    from slicelm.measure.perplexity import perplexity

    code, out, err = run_cli(
        ["ppl", cli_deci, "--seqlen", 32, "--max-windows", 2, "--data-dir", data_dir, "--quiet"], capsys
    )
    assert code == 0, err
    model, tokenizer = load_model(str(cli_deci))
    from slicelm.io.data import load_eval_ids

    direct = perplexity(model, load_eval_ids("wikitext2", tokenizer, data_dir=data_dir), seqlen=32, max_windows=2)
    assert json.loads(out.strip().splitlines()[-1])["ppl"] == pytest.approx(direct.ppl, rel=1e-6)
    code, out, err = run_cli(["eval", cli_deci, "--tasks", "piqa", "--limit", 2, "--data-dir", data_dir], capsys)
    assert code == 0, err
    code, _, err = run_cli(["export", cli_deci], capsys)
    assert code == 0 and "--trust-remote-code" in err[-1], err
    code, _, err = run_cli(["export", cli_deci, "--gguf", tmp_path / "m.gguf", "--llama-cpp", tmp_path], capsys)
    # The folder passes export's checks; then either its tokenizer is one llama.cpp's deci converter cannot
    # read (how transformers saves the GGUF's tokenizer differs between releases: byte fallback or not),
    # refused before any converter is looked for, or only the converter is missing. Nothing is written.
    from slicelm.export import deci_vocab_problem

    config = json.loads((cli_deci / "config.json").read_text())
    if deci_vocab_problem(cli_deci, config) is not None:
        assert_one_line_error(code, err, "deci converter cannot read this DeciLM folder", "tokenizer")
    else:
        assert_one_line_error(code, err, "convert_hf_to_gguf.py")
    assert not (tmp_path / "m.gguf").exists()
    code, _, err = run_cli(["slice", cli_deci, "--sparsity", 0.1, "--out", tmp_path / "again"], capsys)
    assert_one_line_error(code, err, "DeciLM folder")
    code, _, err = run_cli(["finetune", cli_deci, "--out", tmp_path / "ft"], capsys)
    assert_one_line_error(code, err, "DeciLM folder")
    assert not (tmp_path / "ft").exists()


def test_export_refuses_a_decilm_folder_llama_cpp_cannot_read(deci_folders, tmp_path, capsys):
    folder = deci_folders["untied"][2]
    code, _, err = run_cli(["export", folder, "--gguf", tmp_path / "m.gguf"], capsys)
    assert_one_line_error(code, err, "llama.cpp's deci converter", "multiple of 256")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--format", "stock", "--plan", "PLAN"], "one stream width and one MLP width"),
        (["--format", "stock", "--target-params", 0.8, "--schedule", "mlp-global", "--layout", "plain"], "mlp-global"),
        (["--format", "decilm", "--sparsity", 0.25], "--layout plain"),
        (["--format", "decilm", "--sparsity", 0.25, "--layout", "plain", "--stream"], "drop --format"),
        (["--format", "decilm", "--sparsity", 0.25, "--plan-only"], "--plan-only"),
    ],
)
def test_impossible_formats_are_refused_before_the_weights_load(
    flags, fragment, tiny_folder, data_dir, tmp_path, capsys, monkeypatch
):
    import slicelm.io.models

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(slicelm.io.models, "load_model", never)
    flags = [str(plan_file(tmp_path / "p.json", [512, 256, 256, None])) if f == "PLAN" else f for f in flags]
    out = tmp_path / ("out.json" if "--plan-only" in flags else "out")
    code, _, err = run_cli(["slice", tiny_folder, *flags, *CALIB, "--data-dir", data_dir, "--out", out], capsys)
    assert_one_line_error(code, err, fragment)
    assert not out.exists()


def test_decilm_is_refused_for_a_family_it_cannot_hold_before_the_weights_load(
    smollm2_tokenizer, data_dir, tmp_path, capsys, monkeypatch
):
    from cli_checks import save_model_folder

    import slicelm.io.models

    folder = save_model_folder(tmp_path / "qwen3", smollm2_tokenizer, "qwen3")
    monkeypatch.setattr(slicelm.io.models, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    argv = ["slice", folder, "--format", "decilm", "--mlp-sparsity", 0.25, "--layout", "plain", *CALIB]
    code, _, err = run_cli([*argv, "--data-dir", data_dir, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "--format decilm", "Llama-style")
    assert not (tmp_path / "out").exists()


# HEADS_PLAN with a whole layer removed after its first layer (left out of the folder, the rest renumbered).
HEADS_AND_LAYER_PLAN = replace(
    HEADS_PLAN, layers=(HEADS_PLAN.layers[0], LayerWidths(64, 64, 0, 0, 0), *HEADS_PLAN.layers[1:])
)


@pytest.mark.parametrize(
    ("tied", "plan"), [(False, None), (True, None), (True, HEADS_AND_LAYER_PLAN)], ids=["untied", "tied", "heads"]
)
def test_a_streamed_non_uniform_plan_writes_the_same_decilm_folder(tied, plan, tmp_path):
    """Streaming writes what the in-memory run writes (and planning counted): the same DeciLM folder,
    zero padding of heads and whole removed layers included."""
    from slicelm.layouts.decilm import load_decilm
    from slicelm.streaming import slice_streaming

    layers = 4 if plan is None else len(plan.layers)
    overrides = dict(num_hidden_layers=layers, intermediate_size=192, tie_word_embeddings=tied)
    build_tiny_model("llama", **overrides).save_pretrained(tmp_path / "source")
    config = SliceConfig(target_params=0.8, schedule="mlp-global", layout="plain", round_to=1, batch_size=3)
    in_memory = build_tiny_model("llama", **overrides)
    report = slice_model(in_memory, calibration(96), config, plan=plan, progress=False)
    memory = save_sliced(in_memory, tmp_path / "memory")
    streamed_report = slice_streaming(
        tmp_path / "source",
        tmp_path / "streamed",
        calibration(96),
        config,
        plan=plan,
        max_memory=2048,
        progress=False,
    )
    streamed = tmp_path / "streamed"
    assert streamed_report.plan == report.plan and streamed_report.params_after == report.params_after
    assert read_manifest(streamed)["kind"] == "decilm-model"
    a, b = (json.loads((f / "config.json").read_text()) for f in (memory, streamed))
    assert a["block_configs"] == b["block_configs"] and a["architectures"] == b["architectures"]
    expected, got = folder_tensors(memory), folder_tensors(streamed)
    assert expected.keys() == got.keys()
    for key, tensor in expected.items():
        scale = tensor.abs().max().clamp_min(1e-12)
        assert ((got[key] - tensor).abs().max() / scale).item() <= 1e-6, key
    assert stored_parameters(streamed) == report.params_after
    ids, mask = padded_batch(96)
    assert relative_error(logits(in_memory, ids, mask), logits(load_decilm(streamed), ids, mask), mask) <= TOL
    parameters = json.loads((streamed / "slicelm_report.json").read_text())["parameters"]
    assert parameters == json.loads((memory / "slicelm_report.json").read_text())["parameters"]
    assert parameters["stored"] == report.params_after
    if plan is not None:
        assert parameters["zero_padding"] > 0
        assert len(json.loads((streamed / "config.json").read_text())["block_configs"]) == layers - 1


def test_the_default_allocators_per_layer_choice_is_written_as_decilm_and_counted_exactly(tmp_path, monkeypatch):
    """`--target-params` with the default schedule and layout: a sensitivity-shaped MLP plan (chosen
    here by a deterministic scorer) has one basis, so it is served as a DeciLM folder, counted as such."""
    import dataclasses

    import slicelm.allocate.measured
    from slicelm.allocate.budget import ALLOCATORS

    measured = slicelm.allocate.measured.measured_allocator
    prefer_shaped = dataclasses.replace(
        ALLOCATORS["auto"], fn=lambda r: measured(r, scorer=lambda name, _: 0.0 if "shaped" in name else 1.0)
    )
    monkeypatch.setitem(ALLOCATORS, "auto", prefer_shaped)
    model = build_tiny_model("llama", num_hidden_layers=4, intermediate_size=192)
    report = slice_model(model, calibration(96), SliceConfig(target_params=0.8, round_to=1), progress=False)
    assert report.planning["chosen"].startswith("mlp-shaped") and report.plan["layout"] == "plain"
    folder = save_sliced(model, tmp_path / "out")
    assert read_manifest(folder)["kind"] == "decilm-model"
    chosen = next(c for c in report.planning["candidates"] if c["name"] == report.planning["chosen"])
    assert chosen["params"] == report.planning["planned_count"] == report.params_after == stored_parameters(folder)
