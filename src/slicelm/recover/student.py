"""The student: what trains (LoRA adapters through peft on the decoder blocks' linears, or every weight),
activation checkpointing when memory asks for it, and the adapters merged back into the weights at the end."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slicelm.core.arch import Layout, resolve
from slicelm.core.resources import available_memory_bytes
from slicelm.errors import SlicelmError
from slicelm.modeling.modeling_slicelm import get_module
from slicelm.recover.config import FinetuneConfig
from slicelm.recover.losses import LOGIT_BLOCK


def lora_targets(model: nn.Module, extra: Sequence[str] = ()) -> list[str]:
    """Names of the linears LoRA adapts: every linear of the decoder blocks' attention and MLP;
    with ``extra``, also the shortcut matrices (``shortcuts``) and a kept tie's final projection
    (``final``) of a sliced model."""
    layout = _layout(model)
    prefix = layout.layers + "."
    names = []
    for name, module in model.named_modules():
        linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
        if not linear:
            continue
        shortcut = name.endswith(("attn_shortcut", "ffn_shortcut"))
        if name.startswith(prefix) and (not shortcut or "shortcuts" in extra):
            names.append(name)
        elif "final" in extra and name == f"{layout.final_norm}.proj":
            names.append(name)
    if "shortcuts" in extra and not any(n.endswith(("attn_shortcut", "ffn_shortcut")) for n in names):
        raise SlicelmError(
            "--lora-extra shortcuts: this model has no shortcut matrices (only slicegpt-layout folders do)"
        )
    if "final" in extra and f"{layout.final_norm}.proj" not in names:
        raise SlicelmError(
            "--lora-extra final: this model has no final projection (only a slicegpt-layout folder that keeps "
            "its tied head has one)"
        )
    return sorted(names)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of ``model`` (through a peft wrapper): the units a sharded run gathers one at a time."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(get_module(base, _layout(base).layers))


def _layout(model: nn.Module) -> Layout:
    """A sliced model's recorded layout, else the family's."""
    info = getattr(model.config, "slicelm", None)
    return Layout.from_dict(info["layout"]) if isinstance(info, dict) else resolve(model)


def prepare_student(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    """Make the trainable parameters trainable: LoRA adapters (peft) or every weight."""
    for param in model.parameters():
        param.requires_grad_(config.full)
    if config.full:
        return model
    from peft import LoraConfig, get_peft_model  # heavy, and only LoRA needs it

    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,  # no randomness: resumed runs equal uninterrupted ones
        target_modules=lora_targets(model, config.extra_targets),
        bias="none",
    )
    with torch.random.fork_rng():  # the adapters' initialisation depends on the seed alone
        torch.manual_seed(config.seed)
        return get_peft_model(model, lora)


def merged(model: nn.Module) -> nn.Module:
    """The plain model with LoRA adapters merged into its weights (itself for full fine-tuning)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (newer transformers name the method activation_*)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def needs_checkpointing(model: nn.Module, config: FinetuneConfig) -> bool:
    """Whether one micro-batch's activations (a rough upper estimate) exceed half the free memory."""
    available = available_memory_bytes()
    if available is None:
        return False
    c = model.config
    intermediate = getattr(c, "intermediate_size", None) or 4 * c.hidden_size
    per_token = c.num_hidden_layers * (16 * c.hidden_size + 4 * intermediate) * 4
    losses = 8 * LOGIT_BLOCK * 4  # the losses' blocks of logits (teacher and student), whatever the batch
    return config.batch_size * config.seqlen * per_token + losses > available / 2
