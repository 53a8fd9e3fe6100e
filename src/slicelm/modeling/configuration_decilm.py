"""Configuration of DeciLM / Nemotron-NAS folders (``model_type: "nemotron-nas"``), for any reader.

This file is copied verbatim into every DeciLM folder slicelm writes, beside ``modeling_decilm.py``;
``auto_map`` in ``config.json`` names it, so ``AutoConfig.from_pretrained(folder,
trust_remote_code=True)`` works without slicelm, and vLLM's ``DeciLMForCausalLM`` reads the same
object. It imports nothing but ``transformers``.

A DeciLM model is a Llama model whose decoder layers differ: ``block_configs`` holds one entry per
layer, ``{"attention": {...}, "ffn": {...}}``. The keys, as vLLM 0.32 (``nemotron_nas.py``) and
llama.cpp's ``deci`` converter read them:

* ``attention.no_op``: the layer has no attention sub-block (and no ``input_layernorm``);
  ``attention.n_heads_in_group``: query heads per KV head, so the layer has
  ``num_attention_heads // n_heads_in_group`` KV heads and always ``num_attention_heads`` query
  heads (null for a no-op: llama.cpp reads only this key); ``attention.replace_with_linear`` is
  written false (vLLM 0.32 has no linear stand-in).
* ``ffn.no_op``: no MLP sub-block (and no ``post_attention_layernorm``); ``ffn.intermediate_size``:
  the layer's MLP width, which vLLM reads only when ``ffn`` has no ``ffn_mult`` attribute;
  ``ffn.ffn_mult``: present only when ``find_multiple(int(2 * ffn_mult * hidden_size / 3), 256)``
  reproduces the width exactly (llama.cpp reads only this key; null for a no-op).

Each section is a :class:`BlockSection`: a ``dict`` (so it serialises to JSON unchanged) whose keys
are also attributes, as vLLM reads them (``block.attention.no_op``, ``hasattr(block.ffn,
"ffn_mult")``).
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig


class BlockSection(dict):
    """One ``attention`` or ``ffn`` entry of a block: a dict whose keys read as attributes.

    A missing key raises AttributeError, so ``hasattr`` tells present from absent (vLLM decides
    between ``ffn_mult`` and ``intermediate_size`` that way).
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


class BlockConfig(dict):
    """One entry of ``block_configs``: ``{"attention": BlockSection, "ffn": BlockSection}``."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        data = dict(data or {})
        super().__init__(data)
        for key in ("attention", "ffn"):
            self[key] = BlockSection(data.get(key) or {})

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DeciLMConfig(LlamaConfig):
    """``LlamaConfig`` plus per-layer ``block_configs`` (see the module docstring).

    The Llama fields keep their meaning: ``hidden_size`` is the one residual-stream width,
    ``num_attention_heads`` every attention layer's query-head count, ``head_dim`` explicit,
    ``intermediate_size`` the widest MLP. ``qkv_bias`` (when set) gives q/k/v biases apart from
    ``attention_bias``, which then governs ``o_proj`` alone, as vLLM reads it.
    """

    model_type = "nemotron-nas"

    def __post_init__(self, **kwargs: Any) -> None:
        blocks = kwargs.pop("block_configs", None)
        super().__post_init__(**kwargs)
        self.block_configs = [BlockConfig(b) for b in (blocks or [])]


__all__ = ["BlockConfig", "BlockSection", "DeciLMConfig"]
