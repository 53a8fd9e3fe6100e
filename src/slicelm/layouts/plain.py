"""The plain layout: a sliced model in the original architecture, with smaller widths.

With one basis Q for every point of the residual stream, each shortcut matrix ``Q_k^T Q_k`` is the
identity and disappears: what remains is the original model class with ``hidden_size = k`` (and a
smaller ``intermediate_size`` when MLP channels were pruned). Stock ``transformers``, vLLM, TGI
and llama.cpp run it without remote code.

Three details keep the function exact (in float64 up to storage rounding):

* **Norms.** Slicing folds every norm's scale into its readers and leaves a weightless RMS norm
  that divides by the *original* width D. A stock RMSNorm over k dimensions divides by k, so its
  weight becomes ``sqrt(D / k)`` and its epsilon ``eps * D / k``:
  ``x / sqrt(|x|^2 / k + eps D / k) * sqrt(D / k) = x / sqrt(|x|^2 / D + eps)``.
  (Gemma stores ``w - 1`` and its embedding multiplies by ``sqrt(hidden_size)``: both adjusted.)
* **Attention shapes.** ``head_dim`` is written explicitly, since configs derive it from
  ``hidden_size / num_attention_heads`` when it is absent.
* **A tied head.** The head reads the final norm's output through the shared embedding, so the
  final norm's scale ``w`` cannot be folded into it: in the new basis it is ``Q_k^T diag(w) Q_k``,
  a full matrix in general, which no stock norm can hold. But the rotation *within* the kept
  subspace is free (it keeps the same energy and every module just sees another basis of the same
  span), so it is chosen to diagonalise that matrix (:func:`diagonalise_final_norm`): the tied
  plain model is exact too.

LayerNorm families are refused: their mean subtraction is baked into every writer, which a stock
LayerNorm would subtract again over the smaller width.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from slicelm.core.arch import Layout, spec_for
from slicelm.core.plan import LayerWidths, SlicingPlan
from slicelm.errors import SlicelmError
from slicelm.modeling.modeling_slicelm import SLICELM_KEY, ZeroBranch, get_module, set_module
from slicelm.steps.heads import head_geometry, set_head_counts

OUTPUT_KIND = "plain-model"


def check_plain(norm: str, model_type: str) -> None:
    """Refuse families whose structure a stock config cannot express after slicing (one line)."""
    if norm != "rms":
        raise SlicelmError(
            f"--layout plain needs an RMSNorm model and {model_type} uses LayerNorm, whose mean subtraction "
            "slicing bakes into the stream's writers (a stock LayerNorm over fewer dimensions would not undo "
            "it); use --layout slicegpt"
        )


def plain_config(config: Any, layout: Layout, plan: SlicingPlan) -> Any:
    """The stock config of the sliced model: smaller widths, explicit head_dim, adjusted epsilon."""
    if not plan.is_uniform:
        raise SlicelmError("a plain checkpoint needs one stream width and one MLP width for every layer")
    spec = spec_for(config)
    new = copy.deepcopy(config)
    hidden, width = plan.hidden_size, plan.embedding
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    new.hidden_size = width
    new.head_dim = head_dim
    if plan.removed_layers:  # whole layers removed: the stock architecture with fewer layers
        drop_config_layers(new, plan.removed_layers)
    kept = next(lw for lw in plan.layers if not lw.removed)
    mlp = kept.mlp
    if mlp is not None:
        setattr(new, spec.intermediate_field, mlp)
    heads = kept.heads
    if heads is not None:  # the same heads removed in every layer: stock head counts, head_dim as before
        new.num_key_value_heads = heads[0]
        new.num_attention_heads = heads[0] * heads[1]
    if not hasattr(new, "rms_norm_eps"):
        raise SlicelmError(f"{layout.model_type} has no rms_norm_eps in its config; the plain layout cannot adjust it")
    new.rms_norm_eps = float(config.rms_norm_eps) * hidden / width
    for key in (SLICELM_KEY, "auto_map"):
        if hasattr(new, key):
            delattr(new, key)
    validate = getattr(new, "validate", None)  # transformers' own checks, as at save and load time
    if validate is not None:
        try:
            validate()
        except Exception as error:  # noqa: BLE001 - any refusal by the config class is the user's answer
            reason = str(error).strip().splitlines()[-1].strip()
            raise SlicelmError(
                f"stock {type(config).__name__} refuses the plain widths (hidden_size {width}, MLP {mlp}): "
                f"{reason}; change --sparsity/--round-to or use --layout slicegpt"
            ) from None
    return new


# Config fields holding one entry per decoder layer: sliding or full attention (Gemma 2/3, Qwen2/3,
# transformers 5's layer_types) and SmolLM3's layers with or without RoPE.
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")


def drop_config_layers(config: Any, drop: Any) -> None:
    """``config`` (in place) without decoder layers ``drop``: ``num_hidden_layers`` and, when
    present, the per-layer lists of :data:`PER_LAYER_FIELDS`."""
    drop = {int(i) for i in drop}
    for name in PER_LAYER_FIELDS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == config.num_hidden_layers:
            setattr(config, name, [v for i, v in enumerate(values) if i not in drop])
    config.num_hidden_layers -= len(drop)


def diagonalise_final_norm(q: torch.Tensor, width: int, scale: torch.Tensor) -> torch.Tensor:
    """Rotate the kept subspace of ``q`` (D, D) so that a tied head's final norm stays diagonal.

    Everything but the final norm is invariant to a rotation R (k, k) *inside* the kept span
    ``U = q[:, :k]``: the same energy is kept and every reader and writer just sees another basis
    of it. The final norm's scale becomes ``R^T (U^T diag(w) U) R`` there; choosing R as the
    eigenvectors of ``U^T diag(w) U`` makes it exactly diagonal — a stock norm weight. Returns the
    basis with its first k columns replaced by ``U R``.
    """
    q = q.to(torch.float64).clone()
    u = q[:, :width]  # (D, k)
    m = u.T @ (scale.to(torch.float64).to(u.device)[:, None] * u)  # (k, k)
    _, r = torch.linalg.eigh((m + m.T) / 2)
    q[:, :width] = u @ r
    return q


def stock_tensors(tensors: dict[str, torch.Tensor], info: dict[str, Any], model_config: Any) -> dict[str, torch.Tensor]:
    """Turn (part of) a plain-layout sliced state dict into the stock architecture's tensors, exactly.

    Works on any subset of the keys (the streamed path converts one shard at a time): identity
    shortcuts are dropped, and each layer's norms, the final norm and Gemma's embedding scale are
    added or adjusted wherever their module's tensors appear.
    """
    layout = Layout.from_dict(info["layout"])
    plan = SlicingPlan.from_dict(info["plan"])
    hidden, width = plan.hidden_size, plan.embedding
    scale = math.sqrt(hidden / width)
    tied = bool(info.get("tied_head"))
    scaled_embedding = spec_for(model_config).scaled_embedding
    dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    eye = torch.eye(width, dtype=torch.float64)

    def norm_weight(effective: torch.Tensor) -> torch.Tensor:  # Gemma stores w - 1
        return (effective.to(torch.float64) - layout.norm_offset).to(dtype)

    out: dict[str, torch.Tensor] = {}
    layers_seen: set[int] = set()
    final = None
    # Whole removed layers hold no tensors and are left out: the kept ones are renumbered.
    renumber = {old: new for new, old in enumerate(i for i in range(len(plan.layers)) if not plan.layers[i].removed)}
    prefix = f"{layout.layers}."
    for name, tensor in tensors.items():
        if name.startswith(prefix) and plan.removed_layers:
            index, rest = name[len(prefix) :].split(".", 1)
            name = f"{prefix}{renumber[int(index)]}.{rest}"
        if name.endswith(("attn_shortcut.weight", "ffn_shortcut.weight")):
            if not torch.allclose(tensor.double().cpu(), eye, atol=1e-6):
                raise SlicelmError(f"{name} is not the identity: the model does not have one basis")
            continue
        if name.startswith(f"{layout.layers}."):
            layers_seen.add(int(name[len(layout.layers) + 1 :].split(".")[0]))
        if name == f"{layout.final_norm}.proj.weight":
            proj = tensor.double().cpu()
            diag = torch.diagonal(proj)
            if not torch.allclose(proj, torch.diag(diag), atol=1e-6 * max(diag.abs().max().item(), 1e-30)):
                raise SlicelmError("the tied final projection is not diagonal: not sliced for the plain layout")
            final = scale * diag
            continue
        if name == f"{layout.final_norm}.proj.bias":
            raise SlicelmError("a tied head with a final-norm bias cannot be written in the plain layout")
        if tied and name == f"{layout.head}.weight":
            continue  # stored once, with the embedding
        if name == f"{layout.head}.weight":
            final = torch.full((width,), scale, dtype=torch.float64)
        if scaled_embedding and name == f"{layout.embeddings[0]}.weight":
            tensor = (tensor.double() * scale).to(tensor.dtype)  # the stock embedding multiplies by sqrt(k)
        out[name] = tensor
    for index in sorted(layers_seen):
        for norm in layout.norms:
            out[f"{layout.layers}.{index}.{norm}.weight"] = norm_weight(torch.full((width,), scale))
    if final is not None:
        if scaled_embedding and tied:  # the head shares the pre-scaled matrix: undo it in the final norm
            final = final / scale
        out[f"{layout.final_norm}.weight"] = norm_weight(final)
    return out


@torch.no_grad()
def to_stock_model(model: nn.Module) -> nn.Module:
    """The original architecture holding a plain-layout sliced model's weights (exactly).

    ``model`` was sliced with ``layout="plain"``: one width, identity shortcuts, and for a tied head
    a diagonal final projection. Shortcuts are checked to be identities (else this is not plain).
    """
    from accelerate import init_empty_weights  # heavy dependency: imported when used

    info = getattr(model.config, SLICELM_KEY, None)
    if not isinstance(info, dict) or info.get("kind") != "plain":
        raise SlicelmError("this model was not sliced with --layout plain")
    layout = Layout.from_dict(info["layout"])
    state = stock_tensors(dict(model.state_dict()), info, model.config)
    config = plain_config(model.config, layout, SlicingPlan.from_dict(info["plan"]))
    config.architectures = [model._slicelm_base.__name__]
    with init_empty_weights(include_buffers=False):
        stock = model._slicelm_base(config)
    tied = bool(info.get("tied_head"))
    missing, unexpected = stock.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (tied and k == f"{layout.head}.weight")]
    if missing or unexpected:
        raise RuntimeError(f"plain export does not fit the stock structure: missing {missing}, unexpected {unexpected}")
    if tied:
        stock.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        stock.generation_config = copy.deepcopy(model.generation_config)
    return stock.eval()


def stream_plan_of(plan: SlicingPlan) -> SlicingPlan:
    """``plan`` with its stream widths and whole removed layers only (what one stock config holds)."""
    layers = tuple(
        LayerWidths(lw.mid, lw.out, 0, 0, 0) if lw.removed else LayerWidths(lw.mid, lw.out) for lw in plan.layers
    )
    return replace(plan, layers=layers)


def stream_widths(plan: SlicingPlan) -> set[int]:
    """Every width the residual stream has in ``plan`` (one, in a plan a stock-named model can hold)."""
    return {plan.embedding} | {w for lw in plan.layers for w in (lw.mid, lw.out) if w is not None}


@torch.no_grad()
def to_shaped_model(model: nn.Module) -> nn.Module:
    """The original architecture class holding a one-basis model whose layers differ, exactly.

    Like :func:`to_stock_model`, but each layer keeps its own shapes: MLP widths and head counts are
    read from the tensors (every module takes the shape of the tensor it holds), a removed sub-block
    stays a :class:`~slicelm.modeling.modeling_slicelm.ZeroBranch` (its norm ``nn.Identity``), and whole
    removed layers are left out. The stream has one width (one basis), which the config holds; the
    config's ``intermediate_size`` is the original one and describes no layer: this model is for
    writers that describe each layer themselves (:func:`slicelm.layouts.decilm.save_decilm`), not for
    ``save_pretrained``.
    """
    from accelerate import init_empty_weights  # heavy dependency: imported when used

    info = getattr(model.config, SLICELM_KEY, None)
    if not isinstance(info, dict) or info.get("kind") != "plain":
        raise SlicelmError("this model was not sliced with one basis (--layout plain)")
    layout = Layout.from_dict(info["layout"])
    plan = SlicingPlan.from_dict(info["plan"])
    if len(stream_widths(plan)) != 1:
        raise SlicelmError(f"the plan gives the stream several widths {sorted(stream_widths(plan))}; one is needed")
    state = stock_tensors(dict(model.state_dict()), info, model.config)  # whole removed layers left out
    config = plain_config(model.config, layout, stream_plan_of(plan))
    config.architectures = [model._slicelm_base.__name__]
    with init_empty_weights(include_buffers=False):
        stock = model._slicelm_base(config)
    kept = [layer for layer, lw in zip(get_module(model, layout.layers), plan.layers, strict=True) if not lw.removed]
    pairs = list(zip(kept, get_module(stock, layout.layers), strict=True))
    mlp_path = layout.mlp if isinstance(layout.mlp, str) else layout.mlp[-1]
    for source, target in pairs:
        cache_index = getattr(get_module(target, layout.attn), "layer_idx", None)  # kept layers are renumbered
        for path in (layout.attn, mlp_path, *layout.norms):  # removed branches and the norms that fed them
            module = get_module(source, path)
            if isinstance(module, (ZeroBranch, nn.Identity)):
                set_module(target, path, copy.deepcopy(module))
        if isinstance(get_module(target, layout.attn), ZeroBranch):
            get_module(target, layout.attn).layer_idx = cache_index
    unexpected = [n for n, t in state.items() if not _assign(stock, n, t) and not _feeds_nothing(stock, n)]
    tied = bool(info.get("tied_head"))
    missing = [n for n, p in stock.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    missing = [k for k in missing if not (tied and k == f"{layout.head}.weight")]
    if missing or unexpected:
        raise RuntimeError(f"the model does not fit its own architecture: missing {missing}, unexpected {unexpected}")
    if len(layout.attn_inputs) == 3:  # separate q/k/v: the attention reads its head counts from the shapes
        for source, target in pairs:
            if not isinstance(get_module(source, layout.attn), ZeroBranch):
                set_head_counts(get_module(target, layout.attn), head_geometry(source, layout))
    if tied:
        stock.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        stock.generation_config = copy.deepcopy(model.generation_config)
    return stock.eval()


def _feeds_nothing(root: nn.Module, name: str) -> bool:
    """``name`` belongs to a norm that fed only a removed branch (now ``nn.Identity``)."""
    try:
        return isinstance(get_module(root, name.rpartition(".")[0]), nn.Identity)
    except AttributeError:
        return False


def _assign(root: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """Put ``tensor`` at ``name`` in ``root``, giving a linear layer the tensor's shape. False: no such slot."""
    path, _, attr = name.rpartition(".")
    try:
        module = get_module(root, path)
    except AttributeError:
        return False
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        return False
    if isinstance(module, nn.Linear) and attr == "weight":
        module.out_features, module.in_features = tensor.shape
    return True
