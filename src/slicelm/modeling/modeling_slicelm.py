"""Modeling code for sliced models, shared by slicelm and by plain ``transformers``.

This file is copied verbatim into every sliced checkpoint, so that
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` works on a machine without
slicelm. It therefore imports nothing but ``torch`` and ``transformers``; slicelm imports the same
file, so there is exactly one definition of what a sliced model is.

A sliced model is the original Hugging Face model with three structural changes, all described by
the ``slicelm`` section of ``config.json`` (the *layout*, naming the modules by role, and the *plan*,
giving every width):

* every norm that reads the residual stream is replaced by :class:`RMSN`, a weightless RMS norm
  (its scale was folded into the linears that read it);
* the modules that read or write the stream have fewer input or output features;
* each decoder layer gets *shortcut* matrices on its residual connections, because consecutive
  points of the stream are expressed in different (PCA) bases. The layer's ``forward`` is replaced
  by :func:`sliced_block_forward`, which calls the layer's own attention, MLP and norm modules.

The original architecture class stays in charge of everything else (masks, rotary embeddings,
KV cache, generation), which is why no transformers version is pinned by copying its forwards.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from typing import Any, Literal

import torch
import transformers
from torch import nn

SLICELM_KEY = "slicelm"  # section of config.json written by slicelm


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------
class RMSN(nn.Module):
    """Weightless RMS normalisation that divides by the *original* width.

    ``y = x / sqrt(sum(x**2) / dim + eps)`` over the last axis. Slicing removes low-variance
    directions from ``x``; keeping ``dim`` at the original hidden size keeps the normalisation equal
    to the unsliced one whenever the removed directions carry no energy, and close otherwise.
    Computed in float32, like the Llama family, then cast back to the input dtype.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim = int(dim)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d), d <= dim
        x32 = x.float()
        mean_square = x32.pow(2).sum(-1, keepdim=True) / self.dim
        return (x32 * torch.rsqrt(mean_square + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


class RMSNProject(nn.Module):
    """Final norm of a sliced model that keeps its tied embedding/head: ``RMSN`` then a small linear.

    The original final norm computes ``rmsnorm(x) * w (+ b)`` in original coordinates. With the
    stream in basis Q_L (D, d_L) and the tied head reading in the embedding's basis Q_0 (D, d_0),
    that becomes ``rmsn(x~) (Q_L^T diag(w) Q_0) (+ b Q_0)``: a (d_L, d_0) matrix instead of an untied
    (vocab, d) head.
    """

    def __init__(self, dim: int, eps: float, d_in: int, d_out: int, bias: bool) -> None:
        super().__init__()
        self.norm = RMSN(dim, eps)
        self.proj = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        return self.proj(self.norm(x))


# --------------------------------------------------------------------------------------------------
# Module paths
# --------------------------------------------------------------------------------------------------
def get_module(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b.0`` style lookup; raises AttributeError naming the missing step."""
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise AttributeError(f"{type(root).__name__} has no module {path!r} (missing {part!r})")
        module = getattr(module, part)
    return module


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    setattr(parent, name, new)


# --------------------------------------------------------------------------------------------------
# Weight conventions
# --------------------------------------------------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: a linear layer whose weight is stored as (in, out)."""
    return type(module).__name__ == "Conv1D"


# A reader or writer of the stream is one of:
#   * nn.Linear, or any module with a Linear-style 2-D ``weight`` (out, in) such as a MoE router;
#   * a GPT-2 ``Conv1D``, whose weight is stored as (in, out);
#   * an nn.Embedding (writers only), weight (V, D);
#   * a bare parameter holding a stack of Linear-style weights (..., out, in), e.g. fused MoE
#     experts (E, 2I, D) (reader) or (E, D, I) (writer). It has no bias.
# Every operation slicelm needs (rotate, scale, centre, resize) acts on the *stream axis* of the
# weight, so each kind is reduced to one view with the stream axis last.
StreamTarget = nn.Module | torch.Tensor
Side = Literal["reader", "writer"]

# Integer attributes that describe a Linear-like module's input width (MoE routers reshape their
# input with ``hidden_dim``); kept equal to the weight's width whenever it changes.
_INPUT_WIDTH_ATTRS = ("in_features", "hidden_dim")


def _stored_is_stream_last(target: StreamTarget, side: Side) -> bool:
    if isinstance(target, nn.Embedding):
        if side == "reader":
            raise TypeError("embeddings do not read the stream")
        return True  # (V, D)
    if isinstance(target, torch.Tensor) or not is_conv1d(target):
        return side == "reader"  # Linear-style (..., out, in): readers have D last, writers first
    return side == "writer"  # Conv1D stores (in, out)


def stream_weight(target: StreamTarget, side: Side) -> torch.Tensor:
    """A reader's or writer's weight as a view with the stream's axis last.

    reader: (..., out, D), so the module computes ``x @ W.T`` on the last two axes;
    writer: (..., in, D), row i is the stream vector written per unit of input i (embeddings: (V, D)).
    Either way a change of basis ``q`` (D, d) of the stream is ``W @ q``.
    """
    weight = target if isinstance(target, torch.Tensor) else target.weight
    return weight if _stored_is_stream_last(target, side) else weight.transpose(-1, -2)


def stream_bias(target: StreamTarget) -> torch.Tensor | None:
    """The bias of a module (None for bare parameters and bias-free modules)."""
    return None if isinstance(target, torch.Tensor) else getattr(target, "bias", None)


def set_stream_weight(target: StreamTarget, side: Side, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Store ``weight`` (given stream-axis-last, as :func:`stream_weight` returns it) and ``bias``.

    Shapes may change; the module's width metadata (in/out features, Conv1D nx/nf, embedding dim,
    router hidden_dim) is kept consistent with the stored weight.
    """
    stored = (weight if _stored_is_stream_last(target, side) else weight.transpose(-1, -2)).contiguous()
    if isinstance(target, torch.Tensor):  # a bare parameter: replace its data in place
        if bias is not None:
            raise ValueError("a bare weight parameter has no bias")
        target.data = stored
        return
    target.weight = nn.Parameter(stored, requires_grad=False)
    if bias is not None:
        target.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    if isinstance(target, nn.Embedding):
        target.embedding_dim = stored.shape[1]
    elif is_conv1d(target):
        target.nx, target.nf = stored.shape
    else:
        if hasattr(target, "out_features"):
            target.out_features = stored.shape[0]
        for attr in _INPUT_WIDTH_ATTRS:
            if isinstance(getattr(target, attr, None), int):
                setattr(target, attr, stored.shape[-1])


def resize_reader(target: StreamTarget, width: int) -> None:
    """Give a stream reader ``width`` input features (weights uninitialised)."""
    weight = stream_weight(target, "reader")
    set_stream_weight(target, "reader", weight.new_empty(*weight.shape[:-1], width))


def add_bias(module: nn.Module) -> None:
    """Give a bias-free reader an (uninitialised) bias of its output width, as folding a norm's bias does."""
    if getattr(module, "bias", None) is None:
        out = stream_weight(module, "reader").shape[-2]
        module.bias = nn.Parameter(module.weight.new_empty(out), requires_grad=False)


def resize_channels(target: StreamTarget, side: Side, channels: int) -> None:
    """Give a reader ``channels`` outputs or a writer ``channels`` inputs (MLP channel pruning).

    That is the axis next to the stream axis in :func:`stream_weight`'s view; a reader's bias
    follows its outputs, a writer's bias is on the stream axis and keeps its size.
    """
    weight = stream_weight(target, side)
    bias = stream_bias(target)
    if side == "reader" and bias is not None:
        bias = bias.new_empty(channels)
    set_stream_weight(target, side, weight.new_empty(*weight.shape[:-2], channels, weight.shape[-1]), bias)


def resize_writer(target: StreamTarget, width: int) -> None:
    """Give a stream writer (linear, Conv1D, embedding, stacked experts) ``width`` outputs."""
    weight = stream_weight(target, "writer")
    bias = stream_bias(target)
    new_bias = bias.new_empty(width) if bias is not None else None
    set_stream_weight(target, "writer", weight.new_empty(*weight.shape[:-1], width), new_bias)


# --------------------------------------------------------------------------------------------------
# Removed sub-blocks and removed heads
# --------------------------------------------------------------------------------------------------
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # by transformers version/family
# Head-count attributes that attention modules of transformers 5.x read in their forward (names
# vary by family and version); each present integer attribute is kept consistent after a removal.
_QUERY_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads")
_KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


class ZeroBranch(nn.Module):
    """A removed branch: ``(..., d_in) -> zeros (..., width)`` in the input's dtype and device.

    attention: return ``(zeros, None)`` as attention modules do, and keep the KV cache's length for
    ``layer_idx``: transformers reads the cached length from the cache's layers (by default layer
    0) to place new tokens, and an empty cache layer would restart positions at 0, so one 1-wide
    "head" per token is recorded. No parameters, no buffers.
    """

    no_op = True  # what the DeciLM writer looks for: the sub-block holds nothing

    def __init__(self, width: int, attention: bool = False, layer_idx: int | None = None) -> None:
        super().__init__()
        self.width = int(width)
        self.attention = bool(attention)
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        x = hidden_states if hidden_states is not None else args[0]
        out = x.new_zeros(*x.shape[:-1], self.width)
        if not self.attention:
            return out
        cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
        if cache is not None and self.layer_idx is not None and hasattr(cache, "update"):
            # (B, 1, T, 1): the cache counts tokens along axis -2; one scalar per token keeps it cheap.
            stub = x.new_zeros(x.shape[0], 1, x.shape[1], 1)
            cache.update(stub, stub, self.layer_idx)
        return out, None

    def extra_repr(self) -> str:
        return f"width={self.width}, attention={self.attention}"


def remove_branch(layer: nn.Module, layout: dict[str, Any], branch: Literal["attn", "mlp"], width: int) -> None:
    """Replace a block's attention or MLP branch by :class:`ZeroBranch` of output ``width`` (in place).

    layout: the layout's dict form (roles ``attn``, ``mlp``, ``attn_norm``, ``mlp_norm``). A chain
    MLP (OPT's fc1, activation, fc2 on the layer) keeps its chain: the first modules become
    ``nn.Identity`` and the last the ZeroBranch. A norm that fed only this branch becomes
    ``nn.Identity`` (a norm shared by both branches of a parallel block stays).
    """
    if branch == "attn":
        attn = get_module(layer, layout["attn"])
        if not isinstance(attn, ZeroBranch):
            zero = ZeroBranch(width, attention=True, layer_idx=getattr(attn, "layer_idx", None))
            set_module(layer, layout["attn"], zero)
        norm, other = layout["attn_norm"], layout["mlp_norm"]
    else:
        chain = (layout["mlp"],) if isinstance(layout["mlp"], str) else tuple(layout["mlp"])
        for path in chain[:-1]:
            set_module(layer, path, nn.Identity())
        if not isinstance(get_module(layer, chain[-1]), ZeroBranch):
            set_module(layer, chain[-1], ZeroBranch(width))
        norm, other = layout["mlp_norm"], layout["attn_norm"]
    if norm is not None and other is not None and norm != other:
        set_module(layer, norm, nn.Identity())
    get_module(layer, layout["attn"] if branch == "attn" else _last(layout["mlp"])).width = int(width)
    forget_parts(layer)


def _last(chain: str | list[str] | tuple[str, ...]) -> str:
    return chain if isinstance(chain, str) else chain[-1]


def branch_removed(layer: nn.Module, layout: dict[str, Any], branch: Literal["attn", "mlp"]) -> bool:
    path = layout["attn"] if branch == "attn" else _last(layout["mlp"])
    return isinstance(get_module(layer, path), ZeroBranch)


def set_head_counts(attn: nn.Module, kv_heads: int, q_per_kv: int) -> None:
    """Make an attention module's head-count attributes match ``kv_heads`` KV heads of ``q_per_kv``
    query heads (after removal, or when building a layer with other head counts). Forwards of
    transformers 5.x reshape by ``head_dim`` and repeat KV heads ``num_key_value_groups`` times;
    older or other families read ``num_heads`` and the like: every such integer attribute present
    is set."""
    attn.num_key_value_groups = q_per_kv
    for name in _QUERY_COUNT_ATTRS:
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, kv_heads * q_per_kv)
    for name in _KV_COUNT_ATTRS:
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, kv_heads)


def resize_heads(layer: nn.Module, layout: dict[str, Any], kv_heads: int, q_per_kv: int) -> None:
    """Give a freshly built block's attention ``kv_heads`` KV heads of ``q_per_kv`` query heads
    (weights uninitialised; q/k/v rows and o_proj's inputs in whole heads of ``head_dim``)."""
    attn = get_module(layer, layout["attn"])
    head_dim = int(attn.head_dim)
    q, k, v = (get_module(layer, path) for path in layout["attn_inputs"])
    resize_channels(q, "reader", kv_heads * q_per_kv * head_dim)
    for module in (k, v):
        resize_channels(module, "reader", kv_heads * head_dim)
    resize_channels(get_module(layer, layout["attn_outputs"][0]), "writer", kv_heads * q_per_kv * head_dim)
    set_head_counts(attn, kv_heads, q_per_kv)


def apply_block_removals(layer: nn.Module, layout: dict[str, Any], entry: dict[str, Any], widths: tuple) -> None:
    """Reshape one freshly built block as its plan ``entry`` says: fewer heads, removed sub-blocks.
    widths: (attention's output width, MLP's output width)."""
    kv_heads, q_per_kv = entry.get("kv_heads"), entry.get("q_per_kv")
    if kv_heads == 0:
        remove_branch(layer, layout, "attn", widths[0])
    elif kv_heads is not None:
        resize_heads(layer, layout, int(kv_heads), int(q_per_kv))
    if entry.get("mlp") == 0:
        remove_branch(layer, layout, "mlp", widths[1])


# --------------------------------------------------------------------------------------------------
# The sliced decoder block
# --------------------------------------------------------------------------------------------------
def _first(output: Any) -> torch.Tensor:
    """Attention and MoE modules return tuples in some families; the first item is the output."""
    return output[0] if isinstance(output, tuple) else output


def _parts(layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, tuple[nn.Module, ...]]:
    """(attention norm, attention, MLP norm, MLP chain) of a block, resolved once and cached.

    Resolving dotted paths on every call costs more than a small GEMM when decoding one token at a
    time. The tuple is a plain attribute (not a registered submodule), so state dicts are unchanged.
    """
    parts = layer.__dict__.get("_slicelm_parts")
    if parts is None:
        roles = layer.slicelm_roles
        chain = roles["mlp"]
        parts = (
            get_module(layer, roles["attn_norm"]),
            get_module(layer, roles["attn"]),
            get_module(layer, roles["mlp_norm"] or roles["attn_norm"]),  # parallel blocks may share a norm
            tuple(get_module(layer, p) for p in ([chain] if isinstance(chain, str) else chain)),
        )
        layer.__dict__["_slicelm_parts"] = parts
    return parts


def forget_parts(layer: nn.Module) -> None:
    """Drop the cached branch modules (call after replacing a block's norms or branches)."""
    layer.__dict__.pop("_slicelm_parts", None)


def attention_half(layer: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Attention branch of a block, without the residual: ``attn(norm(x))``.

    x: (B, T, d_in) in the block's input basis. Returns (B, T, d_attn_out).
    """
    norm, attn, _, _ = _parts(layer)
    return _first(attn(hidden_states=norm(x), **kwargs))


def mlp_half(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MLP branch of a block, without the residual: ``mlp(norm(x))``. x: (B, T, d) -> (B, T, d_out).

    The MLP is one module, or a chain of modules applied in order (OPT keeps fc1, its activation
    and fc2 directly on the decoder layer).
    """
    _, _, norm, chain = _parts(layer)
    h = norm(x)
    for module in chain:
        h = _first(module(h))
    return h


@functools.cache
def positional_arg_names(layer_class: type) -> tuple[str, ...]:
    """Names of the parameters a decoder layer's ``forward`` accepts positionally (without self)."""
    params = list(inspect.signature(layer_class.forward).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds)


def split_layer_call(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, dict]:
    """``(hidden_states, keyword arguments)`` of a call to a decoder layer.

    Positional arguments are named after the original layer's ``forward`` parameters: GPT-2's model
    passes the cache and the attention mask positionally, and the attention module takes them by name.
    """
    names = getattr(type(layer), "_slicelm_arg_names", None) or positional_arg_names(type(layer))
    if len(args) > len(names):
        raise TypeError(f"{type(layer).__name__} takes {len(names)} positional arguments, got {len(args)}")
    named = dict(zip(names, args, strict=False))  # trailing parameters may be left to their defaults
    named.update(kwargs)
    return named.pop(names[0] if names else "hidden_states"), named


def sliced_block_forward(self: nn.Module, *args: Any, **kwargs: Any):
    """Forward of a sliced decoder layer.

    Sequential blocks:  h = x S_attn + attn(norm1(x));  y = h S_mlp + mlp(norm2(h))
    Parallel blocks:    y = x S_attn + attn(norm1(x)) + mlp(norm2(x))
    where ``x S`` is the shortcut, a (d_in, d_out) change of basis between the bases in which the
    residual stream is expressed before and after the branch (absent when the whole stream shares
    one basis: then ``x S = x``). Extra keyword arguments (masks, position embeddings, KV cache) go
    to the attention module, as the original layer does.
    """
    x, kwargs = split_layer_call(self, args, kwargs)  # x: (B, T, d_in)
    if self.slicelm_roles["parallel"]:
        y = shortcut_add(getattr(self, "attn_shortcut", None), x, attention_half(self, x, **kwargs) + mlp_half(self, x))
    else:
        h = shortcut_add(getattr(self, "attn_shortcut", None), x, attention_half(self, x, **kwargs))  # (B, T, d_mid)
        y = shortcut_add(getattr(self, "ffn_shortcut", None), h, mlp_half(self, h))  # (B, T, d_out)
    return (y,) if self.slicelm_roles.get("returns_tuple") else y


def shortcut_add(shortcut: nn.Linear | None, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``x S + branch`` as one GEMM with accumulation (BLAS beta=1) instead of a GEMM and an add.

    x: (..., d_in), branch: (..., d_out). Measured ~10% faster than ``shortcut(x) + branch`` on CPU.
    Without a shortcut (one basis for the whole stream) it is the plain residual ``x + branch``.
    """
    if shortcut is None:
        return x + branch
    weight = shortcut.weight  # (d_out, d_in)
    out = torch.addmm(branch.reshape(-1, weight.shape[0]), x.reshape(-1, weight.shape[1]), weight.t())
    return out.view(*branch.shape)


_BLOCK_CLASSES: dict[type, type] = {}


def sliced_block_class(base: type) -> type:
    """A subclass of the original decoder-layer class whose forward handles shortcuts.

    Subclassing (rather than wrapping) keeps ``isinstance`` checks and output-capturing hooks of
    transformers working, and keeps every parameter at its original state-dict key.
    """
    if getattr(base, "_slicelm_block", False):
        return base
    if base not in _BLOCK_CLASSES:
        attrs = {"forward": sliced_block_forward, "_slicelm_block": True}
        attrs["_slicelm_arg_names"] = positional_arg_names(base)  # the sliced forward takes *args
        _BLOCK_CLASSES[base] = type(f"Sliced{base.__name__}", (base,), attrs)
    return _BLOCK_CLASSES[base]


def make_sliced_block(layer: nn.Module, roles: dict[str, Any], d_in: int, d_mid: int | None, d_out: int) -> None:
    """Turn a decoder layer into a sliced block in place: new class and (uninitialised) shortcuts.

    Shortcuts are ``nn.Linear`` without bias: weight (d_out, d_in), i.e. ``x S = x @ weight.T``.
    The MLP's shortcut is ``ffn_shortcut``, not ``mlp_shortcut``: transformers' checkpoint key
    renamings are regexes with unescaped dots (Mixtral's ``.mlp.``) that would rewrite ``.mlp_shortcut``.
    """
    ref = next(layer.parameters(), None)  # None: both sub-blocks of a one-basis layer were removed
    factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    layer.__class__ = sliced_block_class(type(layer))
    layer.slicelm_roles = dict(roles)
    forget_parts(layer)
    if not roles.get("shortcuts", True):  # one basis for the whole stream: identity shortcuts, omitted
        return
    d_first = d_out if roles["parallel"] else d_mid
    layer.attn_shortcut = nn.Linear(d_in, d_first, bias=False, **factory)
    if not roles["parallel"]:
        layer.ffn_shortcut = nn.Linear(d_mid, d_out, bias=False, **factory)
    layer.attn_shortcut.requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Building the sliced structure from config (used when loading)
# --------------------------------------------------------------------------------------------------
def block_roles(layout: dict[str, Any]) -> dict[str, Any]:
    """The subset of the layout a block needs at run time."""
    keys = ("attn_norm", "attn", "mlp_norm", "mlp", "parallel", "returns_tuple")
    return {k: layout.get(k) for k in keys}


def layer_widths(plan: dict[str, Any], index: int) -> tuple[int, int | None, int]:
    """(d_in, d_mid, d_out) of decoder layer ``index``; d_mid is None for parallel blocks."""
    layers = plan["layers"]
    d_in = plan["embedding"] if index == 0 else layers[index - 1]["out"]
    return d_in, layers[index].get("mid"), layers[index]["out"]


def apply_sliced_structure(model: nn.Module, info: dict[str, Any]) -> None:
    """Reshape a freshly built original model into the sliced structure described by ``info``.

    Weights are left uninitialised: they are loaded from the checkpoint afterwards.
    """
    layout, plan = info["layout"], info["plan"]
    eps, hidden = float(info["norm_eps"]), int(plan["hidden_size"])
    for path in layout["embeddings"]:
        resize_writer(get_module(model, path), plan["embedding"])
    new_biases = [p for p in layout.get("new_biases", ()) if p != layout["head"]]
    if layout["head"] in layout.get("new_biases", ()):  # the final LayerNorm's bias, folded
        add_bias(get_module(model, layout["head"]))
    layers = get_module(model, layout["layers"])
    roles = block_roles(layout) | {"shortcuts": not info.get("one_basis", False)}
    for index, layer in enumerate(layers):
        d_in, d_mid, d_out = layer_widths(plan, index)
        branch_width = d_out if layout["parallel"] else d_mid
        for path in layout["norms"]:
            set_module(layer, path, RMSN(hidden, eps))
        for path in new_biases:
            add_bias(get_module(layer, path))
        for path in layout["attn_inputs"]:
            resize_reader(get_module(layer, path), d_in)
        for path in layout["attn_outputs"]:
            resize_writer(get_module(layer, path), branch_width)
        for path in layout["mlp_inputs"]:
            resize_reader(get_module(layer, path), d_in if layout["parallel"] else d_mid)
        for path in layout["mlp_outputs"]:
            resize_writer(get_module(layer, path), d_out)
        channels = plan["layers"][index].get("mlp")
        if channels:  # MLP channels were pruned (0: the MLP is removed below)
            for path in layout["mlp_inputs"]:
                resize_channels(get_module(layer, path), "reader", channels * (layout.get("mlp_chunks") or 1))
            for path in layout["mlp_outputs"]:
                resize_channels(get_module(layer, path), "writer", channels)
        apply_block_removals(layer, layout, plan["layers"][index], (branch_width, d_out))
        make_sliced_block(layer, roles, d_in, d_mid, d_out)
    head = get_module(model, layout["head"])
    tied = info.get("tied_head")
    if tied:  # the head stays tied to the embedding and reads the embedding's basis
        final = RMSNProject(hidden, eps, plan["layers"][-1]["out"], plan["embedding"], bias=tied.get("bias", False))
        set_module(model, layout["final_norm"], final)
        head.weight = get_module(model, layout["embeddings"][0]).weight
        head.in_features = plan["embedding"]
    else:
        set_module(model, layout["final_norm"], RMSN(hidden, eps))
        resize_reader(head, plan["layers"][-1]["out"])


# --------------------------------------------------------------------------------------------------
# Validation: a tampered or incomplete folder is refused, never run with random weights
# --------------------------------------------------------------------------------------------------
class SlicedCheckpointError(ValueError):
    """A sliced folder whose config section or tensors do not describe a consistent model."""


def section_checksum(info: dict[str, Any]) -> str:
    """sha256 of the ``slicelm`` config section (without its checksum), canonical JSON."""
    body = {k: v for k, v in info.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_section(info: Any, config: Any) -> dict[str, Any]:
    """Check the ``slicelm`` section against itself and the config; returns it as a dict.

    Raises :class:`SlicedCheckpointError` with one line saying what is wrong.
    """

    def fail(what: str) -> SlicedCheckpointError:
        return SlicedCheckpointError(f"invalid sliced checkpoint: {what}; re-create it with slicelm")

    if isinstance(info, str):
        try:
            info = json.loads(info)
        except ValueError:
            raise fail("the 'slicelm' section of config.json is not JSON") from None
    if not isinstance(info, dict):
        raise fail("the 'slicelm' section of config.json is not an object")
    if "checksum" in info and info["checksum"] != section_checksum(info):
        raise fail("the 'slicelm' section of config.json was edited (checksum mismatch)")
    for key, kind in (("layout", dict), ("plan", dict), ("norm_eps", (int, float))):
        if not isinstance(info.get(key), kind):
            raise fail(f"config.json's 'slicelm' section lacks a valid {key!r}")
    eps = float(info["norm_eps"])
    if not eps > 0 or eps != eps or eps == float("inf"):
        raise fail(f"norm_eps must be a positive number, got {info['norm_eps']!r}")
    layout, plan = info["layout"], info["plan"]
    needed = ("embeddings", "layers", "final_norm", "head", "attn_norm", "attn", "mlp", "norms", "parallel")
    missing = [k for k in needed + ("attn_inputs", "attn_outputs", "mlp_inputs", "mlp_outputs") if k not in layout]
    if missing:
        raise fail(f"the layout lacks {', '.join(missing)}")
    hidden = plan.get("hidden_size")
    if hidden != getattr(config, "hidden_size", None):
        raise fail(
            f"plan.hidden_size {hidden!r} differs from config.hidden_size {getattr(config, 'hidden_size', None)}"
        )
    layers = plan.get("layers")
    if not isinstance(layers, list) or len(layers) != getattr(config, "num_hidden_layers", None):
        count = len(layers) if isinstance(layers, list) else "no"
        raise fail(f"the plan has {count} layers, the config {getattr(config, 'num_hidden_layers', None)}")
    widths = [plan.get("embedding")]
    for entry in layers:
        if not isinstance(entry, dict) or (entry.get("mid") is None) != bool(layout["parallel"]):
            raise fail("the plan's layer widths do not match the block layout")
        widths += [entry.get("out")] if layout["parallel"] else [entry.get("mid"), entry.get("out")]
    if not all(_positive_int(w) and w <= hidden for w in widths):
        raise fail(f"the plan has widths outside 1..{hidden}")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied != bool(info.get("tied_head")):
        raise fail("tie_word_embeddings and the section's tied_head disagree")
    return info


def loading_problems(loading_info: dict[str, Any]) -> str | None:
    """What ``from_pretrained(..., output_loading_info=True)`` left missing, unexpected or mis-shaped
    (transformers only warns about those: a missing tensor stays randomly initialised), or None."""

    def example(item: Any) -> str:
        if isinstance(item, tuple) and len(item) == 3:  # mismatched: (name, stored shape, expected shape)
            return f"{item[0]} is {list(item[1])}, expected {list(item[2])}"
        return str(item)

    problems = [
        f"{len(v)} {k.replace('_', ' ')} (e.g. {sorted(map(example, v))[0]})"
        for k, v in loading_info.items()
        if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    ]
    return "; ".join(problems) or None


class _SlicedModel:
    """Mixin of every ``Sliced<Base>`` class: builds the sliced structure and loads it strictly."""

    _slicelm_model = True
    _slicelm_base: type

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        info = getattr(config, SLICELM_KEY, None)
        if info is None:
            raise SlicedCheckpointError("config has no 'slicelm' section: this is not a sliced checkpoint")
        info = validate_section(info, config)
        apply_sliced_structure(self, info)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``from_pretrained`` that fails instead of initialising missing tensors at random."""
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("ignore_mismatched_sizes", True)  # reported with their names, then refused
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        problems = loading_problems(loading_info)
        never_loaded = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
        if never_loaded and not problems:  # e.g. a tied embedding missing from the file: not reported
            problems = f"{len(never_loaded)} tensors not in the checkpoint (e.g. {never_loaded[0]})"
        if problems:
            raise SlicedCheckpointError(
                f"{pretrained_model_name_or_path} does not match its slicing plan: {problems}; "
                "re-create it with slicelm"
            )
        # slicelm never writes NaN/inf; a damaged file (a flipped bit, an edit) would give NaN logits silently.
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise SlicedCheckpointError(
                    f"{pretrained_model_name_or_path}: tensor {name} holds non-finite values (NaN/inf); the file is "
                    "damaged: re-create it with slicelm"
                )
        return (model, loading_info) if want_info else model


# --------------------------------------------------------------------------------------------------
# Model classes
# --------------------------------------------------------------------------------------------------
_MODEL_CLASSES: dict[type, type] = {}


def sliced_model_class(base: type) -> type:
    """``Sliced<Base>``: the original model class, built in the sliced structure from its config."""
    if getattr(base, "_slicelm_model", False):
        return base
    if base not in _MODEL_CLASSES:
        _MODEL_CLASSES[base] = type(f"Sliced{base.__name__}", (_SlicedModel, base), {"_slicelm_base": base})
    return _MODEL_CLASSES[base]


def __getattr__(name: str) -> type:
    """``modeling_slicelm.SlicedLlamaForCausalLM`` etc., as named by ``auto_map`` in config.json."""
    if name.startswith("Sliced"):
        base = getattr(transformers, name[len("Sliced") :], None)
        if isinstance(base, type):
            return sliced_model_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
