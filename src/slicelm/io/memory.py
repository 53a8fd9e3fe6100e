"""How much memory slicing a model needs, estimated from its config before any weight is loaded.

In memory, slicing holds the weights once (each module is replaced as it is rotated), the
calibration stream at two points (before and after the branch being processed), and the runtime.
The estimate decides whether ``slicelm slice`` streams layers from disk by itself.
"""

from __future__ import annotations

from typing import Any

import torch

from slicelm.core.meta import meta_model

RUNTIME_BYTES = 1 * 2**30  # Python, torch, tokenizers and the calibration ids, measured ~0.7 GiB


def parameter_count(model_config: Any) -> int:
    """Parameters of the model ``model_config`` describes (tied weights once), built on the meta device."""

    return sum(p.numel() for p in meta_model(model_config).parameters())


def estimate_in_memory_bytes(model_config: Any, dtype: torch.dtype, calibration_tokens: int) -> int:
    """Peak bytes of in-memory slicing: weights once, two copies of the calibration stream, runtime."""
    element = torch.empty((), dtype=dtype).element_size()
    weights = parameter_count(model_config) * element
    activations = 2 * calibration_tokens * model_config.hidden_size * element
    return weights + activations + RUNTIME_BYTES


def forward_bytes_per_token(model_config: Any, dtype: torch.dtype, seqlen: int) -> int:
    """Peak bytes per token of a no-grad forward pass scored by a loss over the vocabulary (``ppl``,
    ``eval``): the logits, their float32 copy and log-softmax; one layer's activations; and the
    attention scores of a row (CPU attention materialises them)."""
    element = torch.empty((), dtype=dtype).element_size()
    c = model_config
    hidden = c.hidden_size
    intermediate = getattr(c, "intermediate_size", None) or 4 * hidden
    heads = getattr(c, "num_attention_heads", None) or 1
    logits = c.vocab_size * (element + 2 * 4)
    return logits + (8 * hidden + 3 * intermediate) * element + heads * seqlen * 4


def estimate_forward_bytes(model_config: Any, dtype: torch.dtype, batch: int, seqlen: int) -> int:
    """Peak bytes of scoring ``batch`` windows of ``seqlen`` tokens: weights, one batch's pass, runtime."""
    element = torch.empty((), dtype=dtype).element_size()
    per_token = forward_bytes_per_token(model_config, dtype, seqlen)
    return parameter_count(model_config) * element + batch * seqlen * per_token + RUNTIME_BYTES


def weight_bytes(model_config: Any, dtype: torch.dtype) -> int:
    """Bytes of the weights of the model ``model_config`` describes, held in ``dtype``."""
    return parameter_count(model_config) * torch.empty((), dtype=dtype).element_size()
