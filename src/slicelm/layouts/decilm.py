"""Writing a heterogeneous Llama-family model as a DeciLM / Nemotron-NAS folder.

The input is an in-memory stock model (Llama, Mistral or Qwen2 module names) in which each decoder
layer may have been shrunk on its own: fewer MLP channels (gate/up rows, down columns), fewer query
heads or KV heads (q/k/v rows, o columns, in whole heads of ``head_dim``), or a sub-block removed,
represented by :class:`~slicelm.modeling.modeling_decilm.NoOpAttention` /
:class:`~slicelm.modeling.modeling_decilm.NoOpMLP` (any module with ``no_op = True``) or by the
executor's :class:`~slicelm.modeling.modeling_slicelm.ZeroBranch` in place of ``self_attn`` /
``mlp``. The residual stream keeps one width everywhere (no shortcut matrices). Widths are read
from the weight shapes.

The output is what vLLM's ``DeciLMForCausalLM`` and llama.cpp's ``deci`` converter read:
``config.json`` with ``model_type: "nemotron-nas"`` and ``block_configs`` (keys documented in
``configuration_decilm.py``), safetensors under the stock Llama names (no tensors at all for a
no-op sub-block, its norm included), plus ``configuration_decilm.py`` and ``modeling_decilm.py`` for
``transformers`` with ``trust_remote_code=True``.

What the two engines can hold, and how the writer maps the model onto it (exactly, in every case):

* **Query heads.** Both engines give every attention layer ``num_attention_heads`` (H) query heads
  and ``H // n_heads_in_group`` KV heads. A layer with fewer query heads is written with zero
  padding: each KV group is filled up to ``H / kv`` query heads whose q rows and o columns are zero,
  and, if ``kv`` does not divide H, all-zero KV groups are added up to the next divisor. A zero
  query head attends uniformly but its o columns are zero, so it adds nothing. Padding costs stored
  parameters (reported per layer); it saves nothing but the KV cache of the removed groups.
* **MLP widths.** vLLM reads ``ffn.intermediate_size`` (exact widths). llama.cpp reads only
  ``ffn_mult`` through ``find_multiple(int(2 * ffn_mult * D / 3), 256)``: multiples of 256 only.
  ``ffn_mult`` is written whenever it reproduces a width exactly; ``llama_cpp=True`` pads every
  width with zero channels up to a multiple of 256 so that all of them are (``silu(0) * 0 = 0``).
* **llama.cpp's FFN-free layers.** llama.cpp 0.3.36's ``deci`` graph skips the rest of a layer
  whose MLP is absent, discarding that layer's attention output too; with ``llama_cpp=True`` such a
  layer gets a 256-channel zero MLP instead.
* **vLLM's first layer.** vLLM 0.32 fails on a model whose first non-empty layer has an MLP but no
  attention (its fused residual norm gets no residual); the writer refuses that plan.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from slicelm.errors import SlicelmError
from slicelm.io.outputs import OutputClaim, staged_output, to_json
from slicelm.io.streaming_io import ShardWriter, check_finite
from slicelm.modeling import configuration_decilm, modeling_decilm
from slicelm.modeling.configuration_decilm import DeciLMConfig
from slicelm.modeling.modeling_slicelm import ZeroBranch

OUTPUT_KIND = "decilm-model"
CONFIG_FILE = "configuration_decilm.py"
MODELING_FILE = "modeling_decilm.py"
REPORT_FILE = "slicelm_report.json"
PLAN_FILE = "slicing_plan.json"
MAX_SHARD_BYTES = 4 * 2**30
LLAMA_CPP_MULTIPLE = 256  # the granularity of llama.cpp's ffn_mult formula

# Families whose stock layers are Llama's (same module names, RMSNorm ``w * x / rms(x)``, gated SiLU
# MLP, RoPE attention), with the config flag that would turn on a sliding window neither engine's
# DeciLM class applies. (Architecture knowledge as data; Qwen3's q/k norms or Gemma's (1 + w) norms
# have no place in block_configs.)
DECI_FAMILIES: dict[str, str | None] = {
    "llama": None,
    "mistral": "sliding_window",
    "qwen2": "use_sliding_window",
    "nemotron-nas": None,  # a DeciLM model loaded back (re-saving it writes the same folder)
}
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
# Llama fields copied from the source config (the rest of a DeciLM config is per layer).
COPIED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "attention_dropout",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


@dataclass(frozen=True)
class DeciBlock:
    """The widths of one decoder layer as it is in memory (None: that sub-block is removed).

    query_heads / kv_heads: heads of ``head_dim`` in q_proj / k_proj; mlp: MLP channels.
    """

    query_heads: int | None
    kv_heads: int | None
    mlp: int | None

    @property
    def attention(self) -> bool:
        return self.query_heads is not None


def is_no_op(module: nn.Module | None) -> bool:
    """A removed sub-block: absent, a module marked ``no_op`` (NoOpAttention / NoOpMLP) or a ZeroBranch."""
    return module is None or bool(getattr(module, "no_op", False)) or isinstance(module, ZeroBranch)


def _layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise SlicelmError(f"{type(model).__name__} has no model.layers; a DeciLM folder needs a Llama-family model")
    return layers


def head_dim_of(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def check_family(config: Any) -> None:
    """Refuse families and settings that a DeciLM folder cannot hold (one line)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in DECI_FAMILIES:
        families = ", ".join(sorted(DECI_FAMILIES))
        raise SlicelmError(f"a DeciLM folder holds Llama-style models ({families}), not {model_type}")
    window = DECI_FAMILIES[model_type]
    if window is not None and getattr(config, window, None):
        raise SlicelmError(
            f"{model_type} with {window}={getattr(config, window)!r}: vLLM's and llama.cpp's DeciLM apply no "
            "sliding window, so the folder would compute another function"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise SlicelmError(f"a DeciLM folder needs SiLU MLPs; this model uses {config.hidden_act}")


def family_refusal(config: Any) -> str | None:
    """Why a DeciLM folder cannot hold this family (one line), or None when it can."""
    try:
        check_family(config)
    except SlicelmError as exc:
        return str(exc)
    return None


def deci_blocks(model: nn.Module) -> list[DeciBlock]:
    """Each decoder layer's widths, read from its weight shapes (q_proj (q hd, D), gate_proj (m, D))."""
    check_family(model.config)
    head_dim = head_dim_of(model.config)
    blocks = []
    for index, layer in enumerate(_layers(model)):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        query = kv = width = None
        if not is_no_op(attn):
            shapes = {p: tuple(getattr(attn, p).weight.shape) for p in ATTENTION_PARTS}
            query, kv = shapes["q_proj"][0] // head_dim, shapes["k_proj"][0] // head_dim
            if (
                shapes["q_proj"][0] != query * head_dim
                or shapes["k_proj"] != shapes["v_proj"]
                or shapes["o_proj"][1] != shapes["q_proj"][0]
                or kv < 1
                or query % kv
            ):
                raise SlicelmError(f"layer {index}: attention shapes {shapes} are not whole heads of {head_dim}")
        if not is_no_op(mlp):
            width = mlp.gate_proj.weight.shape[0]
            if mlp.up_proj.weight.shape[0] != width or mlp.down_proj.weight.shape[1] != width:
                raise SlicelmError(f"layer {index}: gate/up/down disagree on the MLP width")
        blocks.append(DeciBlock(query, kv, width))
    return blocks


# --------------------------------------------------------------------------------------------------
# block_configs
# --------------------------------------------------------------------------------------------------
def ffn_mult_for(width: int, hidden: int) -> float | None:
    """An ``ffn_mult`` that vLLM's and llama.cpp's formula turns back into exactly ``width``, or None.

    The formula ``find_multiple(int(2 * ffn_mult * hidden / 3), 256)`` yields multiples of 256 only;
    aiming at the middle of the interval that rounds up to ``width`` keeps float error far away.
    """
    if width <= 0 or width % LLAMA_CPP_MULTIPLE:
        return None
    mult = round(1.5 * (width - LLAMA_CPP_MULTIPLE / 2) / hidden, 6)
    return mult if ffn_mult_width(mult, hidden) == width else None


def ffn_mult_width(ffn_mult: float, hidden: int) -> int:
    """The width both engines derive from ``ffn_mult`` (their ``_ffn_mult_to_intermediate_size``)."""
    width = int(2 * ffn_mult * hidden / 3)
    return width if width % LLAMA_CPP_MULTIPLE == 0 else width + LLAMA_CPP_MULTIPLE - width % LLAMA_CPP_MULTIPLE


@dataclass(frozen=True)
class ServedBlock:
    """One layer as written: the engines' view of it (None: removed) and the zero padding it needs."""

    n_heads_in_group: int | None
    kv_heads: int | None  # including all-zero padding groups
    mlp: int | None  # including zero padding channels

    def block_config(self, hidden: int) -> dict[str, Any]:
        attention = {"no_op": self.n_heads_in_group is None, "replace_with_linear": False}
        attention["n_heads_in_group"] = self.n_heads_in_group
        ffn: dict[str, Any] = {"no_op": self.mlp is None, "replace_with_linear": False}
        if self.mlp is None:
            ffn["ffn_mult"] = None  # llama.cpp's FFN-free layer
        else:
            ffn["intermediate_size"] = self.mlp
            mult = ffn_mult_for(self.mlp, hidden)
            if mult is not None:  # absent otherwise: vLLM then reads intermediate_size
                ffn["ffn_mult"] = mult
        return {"attention": attention, "ffn": ffn}


def served_block(block: DeciBlock, heads: int, *, llama_cpp: bool = False, index: int = 0) -> ServedBlock:
    """How a layer is written: every attention layer gets ``heads`` query heads (see the module doc)."""
    group = kv = None
    if block.attention:
        per_group = block.query_heads // block.kv_heads
        # the fewest KV groups (at least the real ones) whose group size still holds the real heads
        fits = [d for d in range(block.kv_heads, heads + 1) if heads % d == 0 and heads // d >= per_group]
        if not fits:
            raise SlicelmError(
                f"layer {index}: {block.kv_heads} KV heads of {per_group} query heads cannot be padded to "
                f"{heads} query heads in equal groups; keep another head count"
            )
        kv = fits[0]
        group = heads // kv
    width = block.mlp
    if llama_cpp:
        if width is not None:
            width = math.ceil(width / LLAMA_CPP_MULTIPLE) * LLAMA_CPP_MULTIPLE
        elif block.attention:  # llama.cpp drops the attention of an FFN-free layer
            width = LLAMA_CPP_MULTIPLE
    return ServedBlock(group, kv, width)


def serving_problems(config: dict[str, Any]) -> dict[str, list[str]]:
    """What each engine cannot run faithfully in a DeciLM ``config.json`` (``{"vllm": [...], "llama.cpp": [...]}``)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    problems: dict[str, list[str]] = {"vllm": [], "llama.cpp": []}
    blocks = config["block_configs"]
    first = next((i for i, b in enumerate(blocks) if not (b["attention"]["no_op"] and b["ffn"]["no_op"])), None)
    if first is not None and blocks[first]["attention"]["no_op"]:
        problems["vllm"].append(f"layer {first}, the first that computes anything, has no attention")
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim != hidden // heads:
        problems["llama.cpp"].append(f"head_dim {head_dim} is not hidden_size / num_attention_heads")
    for index, block in enumerate(blocks):
        ffn = block["ffn"]
        if ffn["no_op"] and not block["attention"]["no_op"]:
            problems["llama.cpp"].append(f"layer {index}: an FFN-free layer loses its attention output")
        elif not ffn["no_op"] and ffn.get("ffn_mult") is None:
            problems["llama.cpp"].append(
                f"layer {index}: MLP width {ffn['intermediate_size']} is not a multiple of 256"
            )
    return problems


def decilm_config(source: Any, served: Sequence[ServedBlock], biases: dict[str, bool]) -> DeciLMConfig:
    """The DeciLM config: the source's Llama fields, explicit head_dim, and one block per layer."""
    fields = {k: getattr(source, k) for k in COPIED_FIELDS if getattr(source, k, None) is not None}
    widths = [s.mlp for s in served if s.mlp is not None]
    config = DeciLMConfig(
        **fields,
        head_dim=head_dim_of(source),
        intermediate_size=max(widths, default=getattr(source, "intermediate_size", 1)),
        attention_bias=biases["o"],
        qkv_bias=biases["qkv"],
        mlp_bias=biases["mlp"],
        block_configs=[s.block_config(source.hidden_size) for s in served],
    )
    config.architectures = ["DeciLMForCausalLM"]
    config.auto_map = {
        "AutoConfig": f"{Path(CONFIG_FILE).stem}.DeciLMConfig",
        "AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.DeciLMForCausalLM",
    }
    dtype = getattr(source, "dtype", None)
    if dtype is not None:
        config.dtype = dtype
    return config


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------
def _pad_rows(weight: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """A (rows, ...) zero tensor with ``weight``'s rows placed at ``index``."""
    out = weight.new_zeros(rows, *weight.shape[1:])
    out[index] = weight
    return out


def _bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def pad_attention_tensor(
    part: str, tensor: torch.Tensor, block: DeciBlock, served: ServedBlock, heads: int, head_dim: int
) -> torch.Tensor:
    """One q/k/v/o tensor (``part``: ``q_proj.weight``, ``o_proj.bias``...) zero-padded to ``heads``
    query heads in ``served.kv_heads`` groups; each tensor on its own (the streamed writer's shards).

    Real KV group j (0 <= j < kv) keeps its place; its r real query heads go to the first r slots
    of group j, which holds H / kv'' heads after padding. o_proj's columns follow the query heads.
    """
    per_group, group = block.query_heads // block.kv_heads, served.n_heads_in_group
    slots = torch.tensor([j * group + i for j in range(block.kv_heads) for i in range(per_group)])
    q_rows = (slots[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)  # (q hd,)
    kv_rows = torch.arange(block.kv_heads * head_dim)
    q_out, kv_out = heads * head_dim, served.kv_heads * head_dim
    module, _, kind = part.partition(".")
    if module == "o_proj":
        return tensor if kind == "bias" else _pad_rows(tensor.T, q_rows, q_out).T.contiguous()
    rows, size = (q_rows, q_out) if module == "q_proj" else (kv_rows, kv_out)
    return _pad_rows(tensor, rows, size)


def attention_tensors(attn: nn.Module, block: DeciBlock, served: ServedBlock, heads: int, head_dim: int):
    """q/k/v/o weights and biases of one layer, zero-padded (:func:`pad_attention_tensor`)."""
    out = {}
    for name in ATTENTION_PARTS:
        for kind in ("weight", "bias"):
            tensor = getattr(getattr(attn, name), kind, None)
            if tensor is not None:
                part = f"{name}.{kind}"
                out[part] = pad_attention_tensor(part, tensor.detach(), block, served, heads, head_dim)
    return out


def mlp_tensors(
    mlp: nn.Module | None, width: int, hidden: int, like: torch.Tensor, bias: bool
) -> dict[str, torch.Tensor]:
    """gate/up (width, D) and down (D, width), real channels first, zero channels after."""
    if mlp is None:  # a zero MLP standing in for an absent one (llama.cpp's FFN-free layers)
        zero = like.new_zeros(width, hidden)
        out = {"gate_proj.weight": zero, "up_proj.weight": zero.clone(), "down_proj.weight": zero.T.contiguous()}
        if bias:  # the config's mlp_bias gives every MLP biases
            out.update({f"{p}.bias": like.new_zeros(n) for p, n in zip(MLP_PARTS, (width, width, hidden), strict=True)})
        return out
    channels = torch.arange(mlp.gate_proj.weight.shape[0])
    out = {
        "gate_proj.weight": _pad_rows(mlp.gate_proj.weight.detach(), channels, width),
        "up_proj.weight": _pad_rows(mlp.up_proj.weight.detach(), channels, width),
        "down_proj.weight": _pad_rows(mlp.down_proj.weight.detach().T, channels, width).T.contiguous(),
    }
    for name in ("gate_proj", "up_proj"):
        if _bias(getattr(mlp, name)) is not None:
            out[f"{name}.bias"] = _pad_rows(getattr(mlp, name).bias.detach(), channels, width)
    if _bias(mlp.down_proj) is not None:
        out["down_proj.bias"] = mlp.down_proj.bias.detach()
    return out


def bias_flags(model: nn.Module, blocks: Sequence[DeciBlock]) -> dict[str, bool]:
    """Which biases the model has; one flag each for q/k/v, o and the MLP must hold for all layers."""
    found: dict[str, set[bool]] = {"qkv": set(), "o": set(), "mlp": set()}
    for layer, block in zip(_layers(model), blocks, strict=True):
        if block.attention:
            found["qkv"] |= {_bias(getattr(layer.self_attn, p)) is not None for p in ("q_proj", "k_proj", "v_proj")}
            found["o"].add(_bias(layer.self_attn.o_proj) is not None)
        if block.mlp is not None:
            found["mlp"] |= {_bias(getattr(layer.mlp, p)) is not None for p in MLP_PARTS}
    mixed = [k for k, v in found.items() if len(v) > 1]
    if mixed:
        raise SlicelmError(f"some {', '.join(mixed)} projections have biases and others not; DeciLM needs one flag")
    return {k: bool(v and v.pop()) for k, v in found.items()}


def decilm_tensors(
    model: nn.Module, blocks: Sequence[DeciBlock], served: Sequence[ServedBlock], mlp_bias: bool
) -> dict[str, torch.Tensor]:
    """The folder's tensors under stock Llama names; every source tensor must be accounted for."""
    config = model.config
    heads, head_dim, hidden = config.num_attention_heads, head_dim_of(config), config.hidden_size
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": state["model.embed_tokens.weight"]}
    dropped: set[str] = set()  # the norms of removed sub-blocks: nothing reads them
    for index, (layer, block, serve) in enumerate(zip(_layers(model), blocks, served, strict=True)):
        prefix = f"model.layers.{index}."
        parts: dict[str, torch.Tensor] = {}
        if block.attention:
            parts["input_layernorm.weight"] = layer.input_layernorm.weight.detach()
            attn = attention_tensors(layer.self_attn, block, serve, heads, head_dim)
            parts.update({f"self_attn.{k}": v for k, v in attn.items()})
        else:
            dropped.add(prefix + "input_layernorm.weight")
        if serve.mlp is not None:
            norm = layer.post_attention_layernorm.weight.detach()
            parts["post_attention_layernorm.weight"] = norm
            mlp = layer.mlp if block.mlp is not None else None
            parts.update({f"mlp.{k}": v for k, v in mlp_tensors(mlp, serve.mlp, hidden, norm, mlp_bias).items()})
        else:
            dropped.add(prefix + "post_attention_layernorm.weight")
        out.update({prefix + k: v for k, v in parts.items()})
    out["model.norm.weight"] = state["model.norm.weight"]
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    stray = sorted(k for k in state if k not in out and k not in dropped and not (k == "lm_head.weight"))
    if stray:  # e.g. Qwen3's q_norm: a tensor no DeciLM layer has
        raise SlicelmError(f"the model has tensors a DeciLM folder cannot hold (e.g. {stray[0]})")
    return {k: v.detach() for k, v in out.items()}


def decilm_structure(model: nn.Module, source: Any) -> nn.Module:
    """The DeciLM model :func:`save_decilm` writes for ``model``, on the meta device (for exact counts).

    model: any Llama-named structure whose shapes give the widths (meta weights will do); source:
    the stock config of its stream (one ``hidden_size``, explicit ``head_dim``). Zero padding of
    query heads and KV groups is part of the structure, as it is of the folder.
    """
    blocks = deci_blocks(model)
    heads = model.config.num_attention_heads
    served = [served_block(b, heads, index=i) for i, b in enumerate(blocks)]
    config = decilm_config(source, served, bias_flags(model, blocks))
    with torch.device("meta"):
        deci = modeling_decilm.DeciLMForCausalLM(config)
    deci.tie_weights()
    return deci


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def is_decilm_folder(folder: str | Path) -> bool:
    """A DeciLM / Nemotron-NAS folder (``model_type: "nemotron-nas"`` in its config.json)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == DeciLMConfig.model_type
    except (OSError, ValueError, AttributeError):
        return False


def load_decilm_config(folder: str | Path) -> DeciLMConfig:
    """The folder's config through slicelm's copy of ``configuration_decilm.py`` (no remote code run)."""
    try:
        return DeciLMConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise SlicelmError(f"cannot read the DeciLM config of {folder}: {str(exc).strip().splitlines()[0]}") from None


def load_decilm(folder: str | Path, dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """A DeciLM folder loaded with slicelm's copy of its modeling file (the folder's own code is not run)."""
    config = load_decilm_config(folder)
    try:
        model = modeling_decilm.DeciLMForCausalLM.from_pretrained(folder, config=config, dtype=dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise SlicelmError(f"cannot load the DeciLM folder {folder}: {str(exc).strip().splitlines()[0]}") from None
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------
def save_decilm(
    model: nn.Module,
    out: str | Path | OutputClaim,
    tokenizer: Any = None,
    *,
    blocks: Sequence[DeciBlock] | None = None,
    llama_cpp: bool = False,
    overwrite: bool = False,
    plan: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
) -> Path:
    """Write a heterogeneous Llama-family model as a DeciLM folder (atomically). Returns the folder.

    model: a stock Llama/Mistral/Qwen2 causal LM whose layers may differ in width (see the module
    docstring); removed sub-blocks are ``NoOpAttention`` / ``NoOpMLP`` (``no_op = True``).
    blocks: the widths the caller expects (:func:`deci_blocks` of the model); refused if they differ.
    llama_cpp: zero-pad MLP widths to multiples of 256 (and FFN-free layers with attention to 256
    zero channels) so that llama.cpp's converter reads every layer; the function is unchanged.
    The report (``slicelm_report.json``) records the blocks as written, the parameters stored
    against those in memory, and :func:`serving_problems`.
    """
    found = deci_blocks(model)
    if blocks is not None and list(blocks) != found:
        raise SlicelmError("the blocks given differ from the model's weight shapes; nothing was written")
    heads = model.config.num_attention_heads
    served = [served_block(b, heads, llama_cpp=llama_cpp, index=i) for i, b in enumerate(found)]
    biases = bias_flags(model, found)
    config = decilm_config(model.config, served, biases)
    raw = config.to_dict()
    if raw["block_configs"] and serving_problems(raw)["vllm"]:
        raise SlicelmError(
            f"vLLM cannot run this plan ({serving_problems(raw)['vllm'][0]}); keep that layer's attention"
        )
    tensors = decilm_tensors(model, found, served, biases["mlp"])
    for name, tensor in tensors.items():
        check_finite(name, tensor)
    state = model.state_dict()
    stored = sum(t.numel() for t in tensors.values())
    kept = sum(state[k].numel() for k in tensors if k in state)  # the same tensors before zero padding
    full = {
        **(report or {}),
        "format": "decilm",
        "blocks": [asdict(b) for b in found],
        "parameters": {"kept": kept, "stored": stored, "zero_padding": stored - kept},
        "serving": serving_problems(raw),
    }
    with staged_output(out, overwrite, kind=OUTPUT_KIND) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes=MAX_SHARD_BYTES)
        writer.write(tensors)
        writer.finish()
        config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.copyfile(configuration_decilm.__file__, tmp / CONFIG_FILE)
        shutil.copyfile(modeling_decilm.__file__, tmp / MODELING_FILE)
        if plan is not None:
            (tmp / PLAN_FILE).write_text(to_json(plan) + "\n")
        (tmp / REPORT_FILE).write_text(to_json(full) + "\n")
        pickles = [p.name for p in tmp.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        if pickles:
            raise RuntimeError(f"refusing to write pickled files: {pickles}")
    return out.out if isinstance(out, OutputClaim) else Path(out).expanduser()
