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
* **A tied head.** The head reads the final norm's output through the shared embedding, and the
  final norm's scale ``w`` becomes ``Q^T diag(w) Q`` in the new basis — a full matrix no stock norm
  can hold. Slicing replaces it by the diagonal that best preserves the logits on the calibration
  data (:func:`calibrated_diagonal`); that is the one approximation of the plain layout, reported
  as ``tied_final_norm_error``. ``--untie-head`` (or an untied model) is exact; so is the
  ``channels`` basis, whose permutation commutes with any diagonal.

LayerNorm families are refused: their mean subtraction is baked into every writer, which a stock
LayerNorm would subtract again over the smaller width.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slicelm.arch import Layout, spec_for
from slicelm.errors import SlicelmError
from slicelm.modeling_slicelm import SLICELM_KEY, get_module
from slicelm.plan import SlicingPlan

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
    mlp = plan.layers[0].mlp
    if mlp is not None:
        setattr(new, spec.intermediate_field, mlp)
    if not hasattr(new, "rms_norm_eps"):
        raise SlicelmError(f"{layout.model_type} has no rms_norm_eps in its config; the plain layout cannot adjust it")
    new.rms_norm_eps = float(config.rms_norm_eps) * hidden / width
    for key in (SLICELM_KEY, "auto_map"):
        if hasattr(new, key):
            delattr(new, key)
    return new


def calibrated_diagonal(m: torch.Tensor, gram: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """The diagonal ``v`` (k,) that best replaces the (k, k) final-norm matrix ``m`` for a tied head.

    Logits are ``y m E^T`` for normalised final states y; with ``diag(v)`` instead the squared error
    summed over calibration tokens is ``tr((D_v - m) G (D_v - m)^T S)``, with G = E^T E the shared
    matrix's Gram and S = sum y^T y. Its minimiser solves ``(G * S) v = diag(G m^T S)`` (Hadamard
    product; positive semi-definite by the Schur product theorem). If ``m`` is diagonal, v = diag(m).
    """
    g, s, m = gram.to(torch.float64), moment.to(torch.float64), m.to(torch.float64)
    lhs = g * s
    ridge = 1e-12 * torch.diagonal(lhs).mean().clamp_min(1e-30)
    rhs = torch.diagonal(g @ m.T @ s)
    return torch.linalg.solve(lhs + ridge * torch.eye(lhs.shape[0], dtype=torch.float64, device=lhs.device), rhs)


def diagonal_error(m: torch.Tensor, v: torch.Tensor, gram: torch.Tensor, moment: torch.Tensor) -> float:
    """Relative logit error of replacing ``m`` by ``diag(v)``: sqrt(error / energy of the exact logits)."""
    g, s, m = gram.to(torch.float64), moment.to(torch.float64), m.to(torch.float64)
    delta = torch.diag(v.to(torch.float64)) - m
    error = torch.trace(delta @ g @ delta.T @ s).item()
    energy = torch.trace(m @ g @ m.T @ s).item()
    return math.sqrt(max(error, 0.0) / max(energy, 1e-30))


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
    for name, tensor in tensors.items():
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
    from accelerate import init_empty_weights

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


def save_plain(
    model: nn.Module,
    out: Any,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
) -> Path:
    """Write a plain-layout sliced model as a stock Hugging Face folder (no remote code)."""
    from slicelm.checkpoint import PLAN_FILE, REPORT_FILE
    from slicelm.outputs import OutputClaim, staged_output, to_json
    from slicelm.streaming_io import check_finite

    stock = to_stock_model(model)
    for name, tensor in stock.state_dict().items():
        check_finite(name, tensor)
    plan = model.config.slicelm["plan"]
    provenance = {k: v for k, v in (metadata or {}).items()}
    with staged_output(out, overwrite, kind=OUTPUT_KIND) as tmp:
        stock.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / PLAN_FILE).write_text(to_json(plan) + "\n")
        full = {**(report or {}), "layout": "plain", "provenance": provenance}
        (tmp / REPORT_FILE).write_text(to_json(full) + "\n")
        leftovers = [p.name for p in tmp.iterdir() if p.suffix in (".py", ".bin", ".pt", ".pth", ".pkl")]
        if leftovers:
            raise RuntimeError(f"a plain folder must hold no code or pickles, found {leftovers}")
    return out.out if isinstance(out, OutputClaim) else Path(out).expanduser()


def plain_final_norm(model: nn.Module, layout: Layout, final_moment: torch.Tensor) -> float:
    """Replace a kept tie's (k, k) final projection by its calibrated diagonal; returns the error."""
    final = get_module(model, layout.final_norm)
    embedding = get_module(model, layout.embeddings[0]).weight  # (V, k)
    m = final.proj.weight.detach().to(torch.float64).T  # y -> y m
    from slicelm.rotate import map_rows

    gram = torch.zeros(m.shape[0], m.shape[0], dtype=torch.float64, device=m.device)

    def accumulate(block: torch.Tensor) -> torch.Tensor:
        gram.addmm_(block.T, block)
        return block[:, :1]

    map_rows(embedding.detach(), accumulate, 1)  # the Gram E^T E in float64, block by block
    v = calibrated_diagonal(m, gram, final_moment)
    error = diagonal_error(m, v, gram, final_moment)
    final.proj.weight = nn.Parameter(torch.diag(v).to(final.proj.weight.dtype), requires_grad=False)
    return error
