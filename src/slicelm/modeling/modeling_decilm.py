"""Modeling code of DeciLM / Nemotron-NAS folders: a Llama model whose layers differ in width.

This file is copied verbatim into every DeciLM folder slicelm writes, with
``configuration_decilm.py``, so that ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` works on a machine without slicelm (vLLM and llama.cpp read the same
folder with their own code). It imports nothing but ``torch`` and ``transformers``.

Each decoder layer follows its ``block_configs`` entry (see ``configuration_decilm.py``):

* attention with ``num_attention_heads`` query heads and ``num_attention_heads // n_heads_in_group``
  KV heads (GQA per layer), RoPE as in Llama, or no attention at all (``no_op``: the residual
  passes through; no ``input_layernorm``);
* an MLP of ``ffn.intermediate_size`` channels, or none (``no_op``; no ``post_attention_layernorm``).

Only the decoder layer is new. Embeddings, rotary embeddings, masks, the KV cache and generation
are transformers' own Llama classes of whichever release is installed (tested with 5.14 and 5.24),
so no forward is copied. KV-cache slots are numbered over the layers that have attention, so a
no-op attention layer holds no cache entry (as in vLLM), and position counting, which reads slot 0,
always sees a real layer.

:class:`NoOpAttention` and :class:`NoOpMLP` are what an *in-memory* stock Llama model holds in place
of a removed sub-block before it is written in this format: they add nothing to the residual
stream, so the stock layer computes the same function the DeciLM layer does.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm

from .configuration_decilm import DeciLMConfig


# --------------------------------------------------------------------------------------------------
# Stand-ins for removed sub-blocks in a stock model (before saving)
# --------------------------------------------------------------------------------------------------
class NoOpAttention(nn.Module):
    """A removed attention sub-block inside a stock decoder layer: its output is zero.

    The stock layer computes ``x + attn(norm(x))``, which becomes ``x``. It never touches the KV
    cache. Returns ``(zeros (B, T, D), None)`` like an attention module.
    """

    no_op = True

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class NoOpMLP(nn.Module):
    """A removed MLP sub-block inside a stock decoder layer: ``x + mlp(norm(x))`` becomes ``x``."""

    no_op = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> zeros (B, T, D)
        return torch.zeros_like(hidden_states)


# --------------------------------------------------------------------------------------------------
# The heterogeneous decoder layer
# --------------------------------------------------------------------------------------------------
def _linear(d_in: int, d_out: int, bias: bool) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=bias)


def build_attention(config: DeciLMConfig, n_heads_in_group: int, cache_index: int) -> LlamaAttention:
    """Llama attention with ``num_attention_heads`` query heads and ``H // n_heads_in_group`` KV heads.

    q_proj (H hd, D), k_proj/v_proj (kv hd, D), o_proj (D, H hd). q/k/v carry a bias when
    ``qkv_bias`` (default ``attention_bias``), o_proj when ``attention_bias``, as vLLM reads them.
    The module keeps the model's own config, so a later change of attention implementation applies.
    """
    heads = config.num_attention_heads
    if n_heads_in_group is None or n_heads_in_group < 1 or heads % n_heads_in_group:
        raise ValueError(f"n_heads_in_group {n_heads_in_group!r} does not divide num_attention_heads {heads}")
    layer_config = copy.copy(config)  # only for the constructor's shapes
    layer_config.num_key_value_heads = heads // n_heads_in_group
    attn = LlamaAttention(layer_config, layer_idx=cache_index)
    attn.config = config
    qkv_bias = bool(getattr(config, "qkv_bias", config.attention_bias))
    hidden, head_dim, kv = config.hidden_size, attn.head_dim, heads // n_heads_in_group
    attn.q_proj = _linear(hidden, heads * head_dim, qkv_bias)
    attn.k_proj = _linear(hidden, kv * head_dim, qkv_bias)
    attn.v_proj = _linear(hidden, kv * head_dim, qkv_bias)
    attn.o_proj = _linear(heads * head_dim, hidden, bool(config.attention_bias))
    attn.num_key_value_groups = n_heads_in_group
    return attn


def build_mlp(config: DeciLMConfig, width: int) -> LlamaMLP:
    """Llama's gated MLP with ``width`` channels: gate/up (width, D), down (D, width)."""
    layer_config = copy.copy(config)
    layer_config.intermediate_size = int(width)
    return LlamaMLP(layer_config)


def block_mlp_width(config: DeciLMConfig, ffn: Any) -> int:
    """The MLP width of a block, read as vLLM reads it: ``ffn_mult`` if present, else the explicit size."""
    if getattr(ffn, "ffn_mult", None) is not None:
        width = int(2 * ffn.ffn_mult * config.hidden_size / 3)
        width = width if width % 256 == 0 else width + 256 - width % 256
        explicit = getattr(ffn, "intermediate_size", None)
        if explicit is not None and explicit != width:
            raise ValueError(f"ffn_mult {ffn.ffn_mult} gives {width} channels but intermediate_size is {explicit}")
        return width
    return int(ffn.intermediate_size)


class DeciLMDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose attention and MLP follow one ``block_configs`` entry.

    ``y = h + mlp(norm2(h))`` with ``h = x + attn(norm1(x))``; a no-op sub-block and its norm are
    absent (``None``), so its residual passes through unchanged. Subclassing keeps transformers'
    output capturing (hidden states per layer) working.
    """

    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_index: int | None) -> None:
        nn.Module.__init__(self)  # the parent's constructor would build dense modules first
        block = config.block_configs[layer_idx]
        self.hidden_size = config.hidden_size
        self.layer_idx = layer_idx
        self.self_attn = None
        self.input_layernorm = None
        if not block.attention.no_op:
            self.self_attn = build_attention(config, block.attention.n_heads_in_group, cache_index)
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = None
        self.post_attention_layernorm = None
        if not block.ffn.no_op:
            self.mlp = build_mlp(config, block_mlp_width(config, block.ffn))
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """hidden_states (B, T, D) -> (B, T, D). Keyword arguments (mask, position embeddings, the
        cache under the installed release's name) go to the attention, as Llama's layer passes them."""
        if args:
            raise TypeError("DeciLMDecoderLayer takes its extra arguments by keyword")
        if self.self_attn is not None:
            attn_out = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
            hidden_states = hidden_states + attn_out[0]
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
def check_blocks(config: DeciLMConfig) -> None:
    """Refuse a config whose ``block_configs`` cannot describe its layers (one line)."""
    blocks = config.block_configs
    if len(blocks) != config.num_hidden_layers:
        raise ValueError(f"block_configs has {len(blocks)} entries for {config.num_hidden_layers} layers")
    for index, block in enumerate(blocks):
        for key in ("attention", "ffn"):
            if not isinstance(getattr(block, key, None), dict) or "no_op" not in block[key]:
                raise ValueError(f"block_configs[{index}] lacks {key}.no_op")
        if block.attention.get("replace_with_linear") or block.ffn.get("replace_with_linear"):
            raise ValueError(f"block_configs[{index}]: replace_with_linear blocks are not supported")


class DeciLMForCausalLM(LlamaForCausalLM):
    """Llama's causal LM with heterogeneous decoder layers built from ``config.block_configs``.

    Loading is strict: a tensor missing from the folder, or one the layers do not have, is an error
    (transformers would only warn and keep random weights).
    """

    config_class = DeciLMConfig
    _no_split_modules = ["DeciLMDecoderLayer"]

    def __init__(self, config: DeciLMConfig) -> None:
        check_blocks(config)
        super().__init__(config)
        cache_index = 0
        for index in range(config.num_hidden_layers):
            has_attention = not config.block_configs[index].attention.no_op
            self.model.layers[index] = DeciLMDecoderLayer(config, index, cache_index if has_attention else None)
            cache_index += has_attention
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        problems = [
            f"{kind.replace('_', ' ')}: {', '.join(sorted(map(str, names))[:3])}"
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
            if (names := set(info.get(kind) or ()) - tied)
        ]
        if problems:
            raise ValueError(
                f"{pretrained_model_name_or_path} does not match its block_configs ({'; '.join(problems)})"
            )
        return (model, info) if want_info else model


__all__ = ["DeciLMDecoderLayer", "DeciLMForCausalLM", "NoOpAttention", "NoOpMLP"]
