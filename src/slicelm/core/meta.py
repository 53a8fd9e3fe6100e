"""Model structures without weights: what a config describes, built on the meta device.

Low in the package so that planning can count parameters of candidate structures without importing
model loading (hub, GGUF, tokenizers).
"""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

from slicelm.modeling.configuration_decilm import DeciLMConfig
from slicelm.modeling.modeling_decilm import DeciLMForCausalLM


def meta_model(config, dtype: torch.dtype | None = None):
    """The model ``config`` describes with every parameter on the meta device (no weight memory;
    buffers such as rotary tables are real). A tied head shares its embedding's parameter."""
    options = {"dtype": dtype} if dtype is not None else {}
    with init_empty_weights(include_buffers=False):
        if isinstance(config, DeciLMConfig):  # slicelm's own class: no remote code to run for a shape
            model = DeciLMForCausalLM._from_config(config, **options)
        else:
            model = AutoModelForCausalLM.from_config(config, **options)
    # Meta initialisation leaves a tied head with its own (meta) parameter: tie it, so parameter
    # counts and a tied checkpoint's single stored matrix are right.
    model.tie_weights()
    return model.eval()
