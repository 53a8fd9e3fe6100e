"""DeciLM / Nemotron-NAS folders: per-layer widths, head counts and removed sub-blocks, served as is."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build_tiny_model
from helpers import logits, padded_batch, relative_error
from safetensors import safe_open
from torch import nn

from slicelm.errors import SlicelmError
from slicelm.layouts.decilm import DeciBlock, deci_blocks, ffn_mult_for, ffn_mult_width, save_decilm, serving_problems
from slicelm.modeling.modeling_decilm import NoOpAttention, NoOpMLP

# float32 on both sides with the same operations: measured 0.0; 1e-5 leaves room for other kernels.
TOL = 1e-5
GREEDY = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
HEAD_DIM = 16  # the tiny config: hidden 64, 4 query heads, 2 KV heads


def keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[rows].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].clone())
    linear.out_features = len(rows)


def keep_columns(linear: nn.Linear, columns: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[:, columns].clone())
    linear.in_features = len(columns)


def keep_channels(mlp: nn.Module, width: int) -> None:
    """Keep MLP channels 0..width-1 (every other one would do: the writer keeps their order)."""
    channels = torch.arange(width)
    keep_rows(mlp.gate_proj, channels)
    keep_rows(mlp.up_proj, channels)
    keep_columns(mlp.down_proj, channels)


def keep_heads(attn: nn.Module, kv_heads: list[int], query_heads: list[int]) -> None:
    """Keep these KV heads and these query heads (each query head still reads its own group's KV)."""

    def rows(heads):
        return (torch.tensor(heads)[:, None] * HEAD_DIM + torch.arange(HEAD_DIM)).reshape(-1)

    keep_rows(attn.q_proj, rows(query_heads))
    keep_rows(attn.k_proj, rows(kv_heads))
    keep_rows(attn.v_proj, rows(kv_heads))
    keep_columns(attn.o_proj, rows(query_heads))
    attn.num_key_value_groups = len(query_heads) // len(kv_heads)


def heterogeneous_model(tied: bool = False) -> nn.Module:
    """A tiny Llama (biases everywhere, random norms) compressed by hand, layer by layer:

    0: one KV group left (with its 2 query heads), MLP 80 of 96;
    1: attention removed, MLP 64;
    2: MLP removed, full attention;
    3: one query head per KV group (2 of 4), full MLP.
    """
    model = build_tiny_model("llama", num_hidden_layers=4, tie_word_embeddings=tied)
    layers = model.model.layers
    keep_heads(layers[0].self_attn, [0], [0, 1])
    keep_channels(layers[0].mlp, 80)
    layers[1].self_attn = NoOpAttention()
    keep_channels(layers[1].mlp, 64)
    layers[2].mlp = NoOpMLP()
    keep_heads(layers[3].self_attn, [0, 1], [0, 2])
    return model.eval()


EXPECTED_BLOCKS = [DeciBlock(2, 1, 80), DeciBlock(None, None, 64), DeciBlock(4, 2, None), DeciBlock(2, 2, 96)]


def test_widths_are_read_from_the_weights():
    assert deci_blocks(heterogeneous_model()) == EXPECTED_BLOCKS


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen2", {}), ("mistral", {"sliding_window": None})],
)
def test_a_uniform_model_written_as_decilm_computes_the_same_logits(model_type, overrides, tmp_path):
    from transformers import AutoModelForCausalLM

    ids, mask = padded_batch(96)
    model = build_tiny_model(model_type, **overrides)
    expected = logits(model, ids, mask)
    folder = save_decilm(model, tmp_path / "deci")
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    assert type(loaded).__name__ == "DeciLMForCausalLM" and type(loaded).__module__.startswith("transformers_modules")
    assert relative_error(expected, logits(loaded, ids, mask), mask) <= TOL
    if overrides.get("tie_word_embeddings"):
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


@pytest.fixture(scope="module")
def saved_heterogeneous(tmp_path_factory):
    """{case: (in-memory logits, greedy tokens, folder)} for the hand-made model, untied and tied,
    and the llama.cpp-padded variant."""
    ids, mask = padded_batch(96)
    root = tmp_path_factory.mktemp("decilm")
    saved = {}
    for case, tied, llama_cpp in (("untied", False, False), ("tied", True, False), ("llama_cpp", False, True)):
        model = heterogeneous_model(tied)
        with torch.no_grad():
            tokens = model.generate(ids[:1, :6], **GREEDY)
        folder = save_decilm(model, root / case, llama_cpp=llama_cpp)
        saved[case] = (logits(model, ids, mask), tokens, folder)
    return saved


def test_decilm_folder_loads_without_slicelm_with_equal_logits_and_tokens(saved_heterogeneous):
    ids, mask = padded_batch(96)
    folders = {case: str(entry[2]) for case, entry in saved_heterogeneous.items()}
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["slicelm"] = None  # the folder's own modeling file must be enough
        import torch
        torch.set_num_threads(1)
        from transformers import AutoModelForCausalLM
        ids, mask = torch.tensor({ids.tolist()}), torch.tensor({mask.tolist()})
        results = {{}}
        for case, folder in {folders!r}.items():
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask).logits
                tokens = model.generate(ids[:1, :6], **{GREEDY!r})
            results[case] = {{"logits": out.tolist(), "tokens": tokens.tolist(), "cls": type(model).__module__}}
        print(json.dumps(results))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for case, (expected, tokens, _) in saved_heterogeneous.items():
        assert got[case]["cls"].startswith("transformers_modules."), case
        assert relative_error(expected, torch.tensor(got[case]["logits"]), mask) <= TOL, case
        assert got[case]["tokens"] == tokens.tolist(), case


def test_folder_holds_safetensors_and_code_only(saved_heterogeneous):
    names = {p.name for p in saved_heterogeneous["untied"][2].iterdir()}
    assert {"model.safetensors", "config.json", "configuration_decilm.py", "modeling_decilm.py"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]


# What vLLM 0.32's nemotron_nas.py derives per layer, from the config object it gets through
# AutoConfig (trust_remote_code): (no-op attention, no-op FFN, query heads, KV heads, MLP width).
# Layer 0: 2 real query heads + 2 zero ones in one group; layer 3: 1 + 1 per group.
VLLM_LAYERS = [
    (False, False, 4, 1, 80),
    (True, False, None, None, 64),
    (False, True, 4, 2, None),
    (False, False, 4, 2, 96),
]


def vllm_view(config) -> list[tuple]:
    """The per-layer quantities as DeciLMDecoderLayer.__init__ computes them (attribute access and
    ``hasattr(ffn, "ffn_mult")`` exactly as there)."""
    layers = []
    for block in config.block_configs:
        attn_no_op, ffn_no_op = block.attention.no_op, block.ffn.no_op
        heads = kv = width = None
        if not attn_no_op:
            heads, kv = config.num_attention_heads, config.num_attention_heads // block.attention.n_heads_in_group
        if not ffn_no_op:
            width = ffn_mult_width(block.ffn.ffn_mult, config.hidden_size) if hasattr(block.ffn, "ffn_mult") else None
            width = width if width is not None else block.ffn.intermediate_size
        layers.append((attn_no_op, ffn_no_op, heads, kv, width))
    return layers


def test_config_matches_what_vllm_reads(saved_heterogeneous):
    from transformers import AutoConfig

    folder = saved_heterogeneous["untied"][2]
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "nemotron-nas" and raw["architectures"] == ["DeciLMForCausalLM"]
    assert raw["auto_map"] == {
        "AutoConfig": "configuration_decilm.DeciLMConfig",
        "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
    }
    assert raw["head_dim"] == HEAD_DIM and raw["hidden_size"] == 64 and raw["num_attention_heads"] == 4
    assert raw["attention_bias"] is True and raw["qkv_bias"] is True and raw["mlp_bias"] is True
    assert raw["rope_parameters"]["rope_theta"] > 0 and raw["rms_norm_eps"] > 0
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert vllm_view(config) == VLLM_LAYERS
    # get_total_num_kv_heads: the first layer with attention; get_num_layers_by_block_type: attention layers
    first = next(b for b in config.block_configs if not b.attention.no_op)
    assert config.num_attention_heads // first.attention.n_heads_in_group == 1
    assert sum(not b.attention.no_op for b in config.block_configs) == 3
    # the tensors vLLM's layers would load, with their shapes; a no-op sub-block has none, norms included
    with safe_open(folder / "model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    for index, (attn_no_op, ffn_no_op, heads, kv, width) in enumerate(VLLM_LAYERS):
        p = f"model.layers.{index}."
        if attn_no_op:
            assert not [k for k in shapes if k.startswith(p + "self_attn") or k.startswith(p + "input_layernorm")]
        else:
            assert shapes[p + "self_attn.q_proj.weight"] == (heads * HEAD_DIM, 64)
            assert shapes[p + "self_attn.k_proj.weight"] == shapes[p + "self_attn.v_proj.weight"] == (kv * HEAD_DIM, 64)
            assert shapes[p + "self_attn.o_proj.weight"] == (64, heads * HEAD_DIM)
            assert shapes[p + "input_layernorm.weight"] == (64,)
        if ffn_no_op:
            assert not [k for k in shapes if k.startswith(p + "mlp") or k.startswith(p + "post_attention")]
        else:
            assert shapes[p + "mlp.gate_proj.weight"] == shapes[p + "mlp.up_proj.weight"] == (width, 64)
            assert shapes[p + "mlp.down_proj.weight"] == (64, width)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(shapes)
    assert not [k for k in shapes if not k.startswith(("model.", "lm_head."))]


def llama_cpp_view(raw: dict) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, MLP width) per layer as llama.cpp's DeciModel converter derives them
    from the raw JSON (it reads only n_heads_in_group, replace_with_linear and ffn_mult)."""
    heads, layers = raw["num_attention_heads"], []
    for block in raw["block_configs"]:
        group = block["attention"]["n_heads_in_group"]
        q, kv = (0, 0) if group is None else (heads, heads // group)
        mult = block["ffn"]["ffn_mult"]
        layers.append((q, kv, 0 if mult is None else ffn_mult_width(mult, raw["hidden_size"])))
    return layers


def test_llama_cpp_variant_pads_every_width_to_what_its_converter_reads(saved_heterogeneous):
    raw = json.loads((saved_heterogeneous["llama_cpp"][2] / "config.json").read_text())
    # layer 2's absent MLP becomes 256 zero channels: llama.cpp would drop that layer's attention otherwise
    assert llama_cpp_view(raw) == [(4, 1, 256), (0, 0, 256), (4, 2, 256), (4, 2, 256)]
    assert [b["ffn"]["intermediate_size"] for b in raw["block_configs"]] == [256] * 4
    assert serving_problems(raw) == {"vllm": [], "llama.cpp": []}
    exact = json.loads((saved_heterogeneous["untied"][2] / "config.json").read_text())
    problems = serving_problems(exact)["llama.cpp"]
    assert len(problems) == 4 and "loses its attention output" in problems[2]
    report = json.loads((saved_heterogeneous["llama_cpp"][2] / "slicelm_report.json").read_text())
    assert report["parameters"]["zero_padding"] > 0 and report["blocks"][1]["query_heads"] is None


@pytest.mark.parametrize("hidden", [64, 576, 2048, 4096, 5120, 8192])
def test_ffn_mult_reproduces_every_multiple_of_256_and_nothing_else(hidden):
    for width in range(256, 8 * hidden + 1, 256):
        mult = ffn_mult_for(width, hidden)
        assert mult is not None and ffn_mult_width(mult, hidden) == width, (hidden, width)
    assert ffn_mult_for(1536 + 64, hidden) is None and ffn_mult_for(80, hidden) is None


def test_non_uniform_widths_round_trip(saved_heterogeneous, tmp_path):
    """Loaded back, the model has the widths as written; saving it again writes the same folder."""
    from transformers import AutoModelForCausalLM

    ids, mask = padded_batch(96)
    expected, _, folder = saved_heterogeneous["untied"]
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    # as written: every attention layer has 4 query heads (zero-padded), KV heads as kept
    assert deci_blocks(loaded) == [
        DeciBlock(4, 1, 80),
        DeciBlock(None, None, 64),
        DeciBlock(4, 2, None),
        DeciBlock(4, 2, 96),
    ]
    again = save_decilm(loaded, tmp_path / "again")
    first = json.loads((folder / "config.json").read_text())
    second = json.loads((again / "config.json").read_text())
    assert first["block_configs"] == second["block_configs"]
    with safe_open(folder / "model.safetensors", "pt") as a, safe_open(again / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():  # noqa: SIM118
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    assert relative_error(expected, logits(loaded, ids, mask), mask) <= TOL


def test_a_missing_tensor_is_refused_on_load(saved_heterogeneous, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "broken"
    shutil.copytree(saved_heterogeneous["untied"][2], folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match its block_configs"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def test_plans_the_engines_cannot_hold_are_refused_with_one_line(tmp_path):
    model = heterogeneous_model()
    model.model.layers[0].self_attn = NoOpAttention()  # vLLM needs attention in the first computing layer
    with pytest.raises(SlicelmError, match="vLLM cannot run this plan"):
        save_decilm(model, tmp_path / "a")
    with pytest.raises(SlicelmError, match="blocks given differ"):
        save_decilm(heterogeneous_model(), tmp_path / "b", blocks=EXPECTED_BLOCKS[::-1])
    for model_type, overrides, message in (
        ("qwen3", {}, "Llama-style models"),
        ("gemma", {}, "Llama-style models"),
        ("mistral", {"sliding_window": 8}, "sliding window"),
    ):
        with pytest.raises(SlicelmError, match=message):
            save_decilm(build_tiny_model(model_type, **overrides), tmp_path / model_type)
    assert not any(tmp_path.iterdir())  # nothing written
