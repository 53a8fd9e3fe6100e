"""Opt-in (``pytest -m serving``): slicelm's output folders in real vLLM and llama.cpp, on a tiny model.

A tiny Llama saved with stock transformers (SmolLM2's tokenizer, so that llama.cpp's converter
recognises it), the same model with a quarter of its MLP channels pruned (``--layout plain``), and a
hand-made non-uniform DeciLM folder (layer 0: full attention, MLP 128 of 256; layer 1: attention
removed, MLP 192; Llama 3's vocabulary size, the only one at which llama.cpp's deci converter reads a
BPE tokenizer) go through the engines the way `benchmarks/serving.py` drives them on the real model:

* vLLM (``$SLICELM_VLLM_PYTHON``, made by ``benchmarks/vllm_setup.sh``): greedy tokens equal a
  transformers loop token for token; the NLL from prompt log-probabilities equals transformers';
  the server command ``slicelm export`` prints answers the ``openai`` client with the same greedy text;
* llama.cpp (``$LLAMA_CPP_DIR``, made by ``benchmarks/llama_cpp_build.sh``): ``slicelm export`` to
  f16 / q8_0 / q4_k_m, ``llama-perplexity`` equal to slicelm's perplexity (second half of each window),
  ``llama-bench`` measures both phases; the DeciLM folder written for llama.cpp (MLP widths zero-padded
  to multiples of 256) through the converter's ``deci`` architecture, f16 ppl equal to transformers'.

Without ``-m serving`` (the default test command) or without the engines, each test skips with one
line. Engine start-up dominates: about 1-2 minutes per vLLM engine on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import calibration

from slicelm.export import DECI_BPE_VOCAB_SIZE
from slicelm.layouts.checkpoint import save_sliced
from slicelm.layouts.decilm import save_decilm
from slicelm.measure.perplexity import perplexity
from slicelm.modeling.modeling_decilm import NoOpAttention
from slicelm.slicing import SliceConfig, slice_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import serving  # noqa: E402  (benchmarks/ is not a package; the driver is shared with the benchmark)

pytestmark = pytest.mark.serving
NEW_TOKENS = 12
PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time"]
TEXT = " ".join(
    f"Line {i}: the quick brown fox jumps over the lazy dog while {i * 7 % 13} cats watch the river." for i in range(60)
)


@pytest.fixture(scope="module", autouse=True)
def opt_in(request):  # module scope and autouse: runs before the module's model fixtures are built
    if "serving" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("serving checks are opt-in: pytest -m serving (with SLICELM_VLLM_PYTHON / LLAMA_CPP_DIR)")


def vllm_python() -> str:
    python = os.environ.get("SLICELM_VLLM_PYTHON", str(REPO / ".venv-vllm" / "bin" / "python"))
    if not Path(python).is_file():
        pytest.skip(f"vLLM not installed ({python} missing): bash benchmarks/vllm_setup.sh, set SLICELM_VLLM_PYTHON")
    return python


def llama_cpp_dir() -> Path:
    root = os.environ.get("LLAMA_CPP_DIR")
    if not root or not (Path(root) / "build" / "bin" / "llama-perplexity").is_file():
        pytest.skip("llama.cpp not built: bash benchmarks/llama_cpp_build.sh, set LLAMA_CPP_DIR")
    return Path(root)


def keep_mlp_channels(mlp: torch.nn.Module, width: int) -> None:
    """Keep ``width`` MLP channels picked at random, in order (gate/up rows, down columns)."""
    index = torch.randperm(mlp.gate_proj.out_features, generator=torch.Generator().manual_seed(width))[:width].sort()[0]
    for name in ("gate_proj", "up_proj"):
        linear = getattr(mlp, name)
        linear.weight = torch.nn.Parameter(linear.weight.detach()[index].clone())  # (width, D)
        linear.out_features = width
    mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight.detach()[:, index].clone())  # (D, width)
    mlp.down_proj.in_features = width


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smollm2_tokenizer) -> dict[str, Path]:
    """dense: a tiny stock Llama (widths multiples of 32, decisive logits); mlp25: 25% of its MLP
    channels pruned by slicelm, plain layout; decilm: a tiny Llama of Llama 3's vocabulary size with
    per-layer widths (layer 0 MLP 128, layer 1 no attention and MLP 192), and decilm_llama_cpp, the same
    written for llama.cpp (MLPs zero-padded to 256). All float32 with the SmolLM2 tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("serving")
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: a size every vLLM CPU attention kernel supports
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.2,  # large weights: argmax margins far above the engines' float32 rounding
        bos_token_id=smollm2_tokenizer.bos_token_id,
        eos_token_id=smollm2_tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    dense.save_pretrained(root / "dense")
    smollm2_tokenizer.save_pretrained(root / "dense")
    pruned = AutoModelForCausalLM.from_pretrained(root / "dense", dtype=torch.float32).eval()
    slice_model(
        pruned,
        calibration(config.vocab_size, lengths=(64,) * 8),
        SliceConfig(sparsity=0.0, mlp_sparsity=0.25, layout="plain", round_to=32),
        progress=False,
    )
    save_sliced(pruned, root / "mlp25", smollm2_tokenizer)
    assert json.loads((root / "mlp25" / "config.json").read_text())["intermediate_size"] == 192

    # llama.cpp's deci converter reads a BPE vocabulary only at Llama 3's size: SmolLM2's tokens, then padding.
    torch.manual_seed(1)
    deci_config = config.to_dict() | {"vocab_size": DECI_BPE_VOCAB_SIZE}
    deci = AutoModelForCausalLM.from_config(LlamaConfig(**deci_config), dtype=torch.float32).eval()
    with torch.no_grad():  # the padding tokens' rows (tied head): logit 0, never the argmax; text stays decodable
        deci.get_input_embeddings().weight[len(smollm2_tokenizer) :] = 0
    keep_mlp_channels(deci.model.layers[0].mlp, 128)
    deci.model.layers[1].self_attn = NoOpAttention()
    keep_mlp_channels(deci.model.layers[1].mlp, 192)
    save_decilm(deci, root / "decilm", smollm2_tokenizer)
    save_decilm(deci, root / "decilm_llama_cpp", smollm2_tokenizer, llama_cpp=True)
    blocks = json.loads((root / "decilm" / "config.json").read_text())["block_configs"]
    assert [(b["attention"]["no_op"], b["ffn"]["intermediate_size"]) for b in blocks] == [(False, 128), (True, 192)]
    names = ("dense", "mlp25", "decilm", "decilm_llama_cpp")
    return {name: root / name for name in names}


@pytest.fixture(scope="module")
def references(folders) -> dict[str, dict]:
    out = {}
    for name, folder in folders.items():
        model, tokenizer = serving.load_reference(folder)
        prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
        ids = torch.tensor(tokenizer(TEXT)["input_ids"])
        assert ids.numel() >= 256  # two windows of 128 below
        out[name] = {
            "tokenizer": tokenizer,
            "prompt_ids": prompt_ids,
            "greedy": [serving.greedy_tokens(model, p, NEW_TOKENS) for p in prompt_ids],
            "ids": ids,
            "ppl_full": perplexity(model, ids, seqlen=128, max_windows=2, progress=False),
            "ppl_half": perplexity(model, ids, seqlen=128, max_windows=2, progress=False, score_from=64),
        }
    return out


@pytest.mark.parametrize("name", ["dense", "mlp25", "decilm"])
def test_vllm_greedy_tokens_and_nll_equal_transformers(folders, references, name):
    engine = serving.VllmEngine(vllm_python(), folders[name], max_model_len=256, threads=2, timeout=900)
    try:
        assert engine.ready.get("ok"), engine.ready.get("error")
        ref = references[name]
        got = engine.ask({"op": "greedy", "prompts": ref["prompt_ids"], "max_tokens": NEW_TOKENS})["tokens"]
        assert serving.first_divergence(ref["greedy"], got, ref["tokenizer"]) is None
        windows = ref["ids"][:256].reshape(2, 128).tolist()
        nll = engine.ask({"op": "nll", "windows": windows, "score_from": 0})
        assert nll["tokens"] == ref["ppl_full"].tokens == 2 * 127
        # float32 on both sides over 254 tokens: agreement to ~1e-5 relative; 1e-3 is the headroom.
        assert math.exp(nll["nll_sum"] / nll["tokens"]) == pytest.approx(ref["ppl_full"].ppl, rel=1e-3)
    finally:
        engine.close()


@pytest.mark.parametrize("name", ["mlp25", "decilm"])
def test_vllm_serve_answers_the_openai_client_with_the_greedy_text(folders, references, name):
    check = serving.vllm_server_check(vllm_python(), folders[name], PROMPTS, NEW_TOKENS, 256, timeout=900)
    assert check["ok"], check.get("error")
    ref = references[name]
    assert check["texts"] == [ref["tokenizer"].decode(t, skip_special_tokens=True) for t in ref["greedy"]]


def test_llama_cpp_runs_the_pruned_folder_with_slicelm_perplexity(folders, references, tmp_path):
    root = llama_cpp_dir()
    tools = root / "build" / "bin"
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    env = serving.child_env()
    for outtype in ("f16", "q8_0", "q4_k_m"):
        gguf = tmp_path / f"mlp25-{outtype}.gguf"
        done = subprocess.run(
            [sys.executable, "-m", "slicelm", "export", str(folders["mlp25"]), "--gguf", str(gguf)]
            + ["--outtype", outtype, "--llama-cpp", str(root)],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert gguf.read_bytes()[:4] == b"GGUF"
        assert f"vllm.entrypoints.openai.api_server --model {folders['mlp25']}" in done.stderr
        if outtype == "q4_k_m":  # the 128-wide stream is not a multiple of 256: said in one note line
            assert "hidden_size 128 is not a multiple of 256" in done.stderr
        ppl = serving.llama_perplexity(tools / "llama-perplexity", gguf, text, 128, 2, 2)
        expected = references["mlp25"]["ppl_half"].ppl
        if outtype == "f16":  # f16 only rounds the weights: the 0.5% target
            assert ppl == pytest.approx(expected, rel=0.005), (ppl, expected)
        else:  # 8- and 4-bit weights change a random model's ppl by an amount not bounded here
            assert math.isfinite(ppl) and ppl > 1
        if outtype != "q8_0":
            speed = serving.llama_bench(tools / "llama-bench", gguf, 2, 32, 8)
            assert speed["prompt"] > 0 and speed["generation"] > 0


def test_llama_cpp_runs_the_decilm_folder_as_deci_with_transformers_perplexity(folders, references, tmp_path):
    """The DeciLM folder written for llama.cpp goes through the converter's ``deci`` architecture; its f16
    ppl equals transformers' on the remote-code model (the padding channels are zero: same function)."""
    root = llama_cpp_dir()
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    gguf = tmp_path / "decilm-f16.gguf"
    done = subprocess.run(
        [sys.executable, "-m", "slicelm", "export", str(folders["decilm_llama_cpp"]), "--gguf", str(gguf)]
        + ["--outtype", "f16", "--llama-cpp", str(root)],
        capture_output=True, text=True, env=serving.child_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert serving.gguf_architecture(gguf) == "deci"
    ppl = serving.llama_perplexity(root / "build" / "bin" / "llama-perplexity", gguf, text, 128, 2, 2)
    expected = references["decilm"]["ppl_half"].ppl
    assert references["decilm_llama_cpp"]["ppl_half"].ppl == pytest.approx(expected, rel=1e-5)
    assert ppl == pytest.approx(expected, rel=0.005), (ppl, expected)


def test_serving_accepts_any_folder_and_reports_a_load_failure_in_one_line(tmp_path):
    """A folder vLLM cannot load (not a model at all) is a row with the reason, not a crash."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    engine = serving.VllmEngine(vllm_python(), tmp_path, max_model_len=128, threads=2, timeout=600)
    try:
        assert engine.ready["ok"] is False and engine.ready["error"] and "\n" not in engine.ready["error"]
    finally:
        engine.close()
