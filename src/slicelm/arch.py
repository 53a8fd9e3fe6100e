"""Architecture knowledge as data.

Every module of a decoder-only transformer either *reads* the residual stream (q/k/v, gate/up, the
head), *writes* it (o, down, the embeddings) or *normalises* it. An :class:`ArchSpec` names those
modules by path for one family, keyed by ``config.model_type`` — never by the model's name, so local
checkpoints work as well as hub ids. A Llama-shaped family costs one line in :data:`REGISTRY`.

:func:`resolve` checks a spec against a loaded model and returns a :class:`Layout`: plain,
JSON-serialisable data that is saved with the sliced model and drives both slicing and loading.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from torch import nn

from slicelm.errors import SlicelmError
from slicelm.modeling_slicelm import get_module, stream_bias

NormKind = Literal["rms", "layer"]


@dataclass(frozen=True)
class ArchSpec:
    """Where the stream's readers, writers and norms live in one model family.

    Model-level paths are relative to the ``*ForCausalLM`` model; block-level paths are relative to
    one decoder layer. Defaults describe the Llama family. A reader or writer path names a module
    (``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Embedding``, or any module with a Linear-style 2-D
    ``weight`` such as a MoE router) or a bare parameter holding a stack of Linear-style weights
    ``(..., out, in)``, such as fused MoE experts ``(E, 2I, D)``.
    """

    embeddings: tuple[str, ...] = ("model.embed_tokens",)  # write the stream at its start (tokens, positions)
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    attn_norm: str = "input_layernorm"
    attn: str = "self_attn"
    attn_inputs: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_outputs: tuple[str, ...] = ("self_attn.o_proj",)
    mlp_norm: str | None = "post_attention_layernorm"  # None: the MLP reads attn_norm's output
    # The MLP branch: one module, or a chain of modules applied in order (OPT: fc1, activation, fc2).
    mlp: str | tuple[str, ...] = "mlp"
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_outputs: tuple[str, ...] = ("mlp.down_proj",)
    parallel: bool = False  # attention and MLP both read the block input (GPT-J/NeoX/Phi-2 style)
    parallel_if: str | None = None  # config flag that decides ``parallel`` per model (GPT-NeoX)
    # The MLP returns a tensor as wide as its input (fused MoE experts allocate their output like
    # their input), so the stream must keep one width across the MLP of every layer.
    mlp_same_width: bool = False
    # The model reshapes the final stream with the embeddings' width (GPT2Model's output view), so
    # the stream must end as wide as it starts.
    ends_same_width: bool = False
    returns_tuple: bool = False  # the decoder layer returns (hidden_states, ...)
    norm: NormKind = "rms"
    norm_offset: float = 0.0  # Gemma stores norm scales as (w - 1)
    # MLP channel pruning: each MLP reader's outputs hold this many equal blocks of intermediate
    # channels (Phi-3's fused gate_up_proj: 2). None: the MLP cannot be pruned per channel (MoE).
    mlp_chunks: int | None = 1
    # Config fields of a stock checkpoint with other widths (the plain layout writes one).
    intermediate_field: str = "intermediate_size"
    scaled_embedding: bool = False  # the embedding multiplies by sqrt(config.hidden_size) (Gemma)
    # Refuses configurations whose structure breaks computational invariance: returns a reason.
    refuse: Callable[[Any], str | None] | None = field(default=None, compare=False)


def _refuse_opt(config: Any) -> str | None:
    if not getattr(config, "do_layer_norm_before", True):
        return (
            "it normalises after the residual add (post-LayerNorm, do_layer_norm_before=False, e.g. "
            "opt-350m); a norm on the stream itself does not commute with the rotation"
        )
    proj = getattr(config, "word_embed_proj_dim", None)
    if proj not in (None, config.hidden_size):
        return (
            f"its embeddings are {proj} wide and projected to the {config.hidden_size}-wide stream by "
            "project_in/project_out, which slicelm does not rotate"
        )
    if getattr(config, "_remove_final_layer_norm", False):
        return "it has no final LayerNorm (_remove_final_layer_norm=True), so the stream is never re-centred"
    return None


def _refuse_gpt2(config: Any) -> str | None:
    if getattr(config, "add_cross_attention", False):
        return "its blocks have cross-attention (add_cross_attention=True), which slicelm does not rotate"
    return None


LLAMA = ArchSpec()
LAYER_NORM = ArchSpec(norm="layer")  # base of LayerNorm families: every writer is centred

OPT = replace(
    LAYER_NORM,
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    layers="model.decoder.layers",
    final_norm="model.decoder.final_layer_norm",
    attn_norm="self_attn_layer_norm",
    attn_outputs=("self_attn.out_proj",),
    mlp_norm="final_layer_norm",
    mlp=("fc1", "activation_fn", "fc2"),  # the MLP is not a submodule: three modules on the layer
    mlp_inputs=("fc1",),
    mlp_outputs=("fc2",),
    intermediate_field="ffn_dim",
    refuse=_refuse_opt,
)

GPT2 = replace(
    LAYER_NORM,
    embeddings=("transformer.wte", "transformer.wpe"),
    layers="transformer.h",
    final_norm="transformer.ln_f",
    attn_norm="ln_1",
    attn="attn",
    attn_inputs=("attn.c_attn",),  # one Conv1D producing q, k and v
    attn_outputs=("attn.c_proj",),
    mlp_norm="ln_2",
    mlp_inputs=("mlp.c_fc",),
    mlp_outputs=("mlp.c_proj",),
    ends_same_width=True,
    intermediate_field="n_inner",
    refuse=_refuse_gpt2,
)

GPT_NEOX = replace(
    LAYER_NORM,
    embeddings=("gpt_neox.embed_in",),
    layers="gpt_neox.layers",
    final_norm="gpt_neox.final_layer_norm",
    attn="attention",
    attn_inputs=("attention.query_key_value",),
    attn_outputs=("attention.dense",),
    mlp_inputs=("mlp.dense_h_to_4h",),
    mlp_outputs=("mlp.dense_4h_to_h",),
    parallel_if="use_parallel_residual",  # two norms, both reading the block input
)

PHI = replace(
    LAYER_NORM,
    final_norm="model.final_layernorm",
    mlp_norm=None,  # one LayerNorm feeds attention and MLP
    attn_outputs=("self_attn.dense",),
    mlp_inputs=("mlp.fc1",),
    mlp_outputs=("mlp.fc2",),
    parallel=True,
)

PHI3 = replace(LLAMA, attn_inputs=("self_attn.qkv_proj",), mlp_inputs=("mlp.gate_up_proj",), mlp_chunks=2)

MIXTRAL = replace(
    LLAMA,
    # The router and the fused experts read the normalised stream; the experts write it.
    mlp_inputs=("mlp.gate", "mlp.experts.gate_up_proj"),
    mlp_outputs=("mlp.experts.down_proj",),
    mlp_same_width=True,
    mlp_chunks=None,  # experts have their own channels; a router decides between them
)

# model_type -> spec. Families that are Llama-shaped share the default spec.
REGISTRY: dict[str, ArchSpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,  # q/k/v carry biases; the rotation handles biases generically
    "qwen3": LLAMA,  # q_norm/k_norm act on head dimensions, not on the stream: left alone
    "gemma": replace(LLAMA, norm_offset=1.0, scaled_embedding=True),  # sqrt(d) scale commutes with rotations
    "phi3": PHI3,
    "mixtral": MIXTRAL,
    "opt": OPT,
    "gpt2": GPT2,
    "gpt_neox": GPT_NEOX,
    "phi": PHI,
}

# Families whose structure breaks computational invariance: model_type -> why.
_SANDWICH = (
    "its blocks normalise each branch's output before the residual add (post_attention_layernorm and "
    "post_feedforward_layernorm), so branch outputs cannot be rotated into the stream's basis"
)
REFUSED: dict[str, str] = {
    "gemma2": _SANDWICH,
    "gemma3_text": _SANDWICH,
    "gemma3": _SANDWICH,
}


@dataclass(frozen=True)
class Layout:
    """A spec resolved against one model: everything needed to slice or rebuild it."""

    model_type: str
    embeddings: tuple[str, ...]
    layers: str
    final_norm: str
    head: str
    attn_norm: str
    attn: str
    mlp_norm: str | None
    mlp: str | tuple[str, ...]
    attn_inputs: tuple[str, ...]
    attn_outputs: tuple[str, ...]
    mlp_inputs: tuple[str, ...]
    mlp_outputs: tuple[str, ...]
    parallel: bool
    mlp_same_width: bool
    ends_same_width: bool
    returns_tuple: bool
    norm: NormKind
    norm_offset: float
    mlp_chunks: int | None = 1
    # Readers without a bias whose norm has one: folding the norm gives them a bias, so the sliced
    # structure must have one too. Block-level paths, plus ``head`` when the final norm has a bias.
    new_biases: tuple[str, ...] = ()

    @property
    def norms(self) -> tuple[str, ...]:
        """Block-level norms that read the stream (one for parallel blocks with a shared norm)."""
        return tuple(dict.fromkeys(p for p in (self.attn_norm, self.mlp_norm) if p))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["norms"] = list(self.norms)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("embeddings", "attn_inputs", "attn_outputs", "mlp_inputs", "mlp_outputs", "new_biases"):
            fields[key] = tuple(fields[key])
        if isinstance(fields["mlp"], list):
            fields["mlp"] = tuple(fields["mlp"])
        return cls(**fields)


def supported_model_types() -> list[str]:
    return sorted(REGISTRY)


def register(model_type: str, spec: ArchSpec = LLAMA, **changes: Any) -> ArchSpec:
    """Add (or replace) a family: ``register("mytype", LLAMA, head="output")``."""
    REGISTRY[model_type] = replace(spec, **changes) if changes else spec
    return REGISTRY[model_type]


def spec_for(config: Any) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise SlicelmError(f"cannot slice {model_type} models: {REFUSED[model_type]}")
    spec = REGISTRY.get(model_type)
    if spec is None:
        raise SlicelmError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())} "
            "(docs/architectures.md explains how to add one)"
        )
    reason = spec.refuse(config) if spec.refuse else None
    if reason:
        raise SlicelmError(f"cannot slice this {model_type} model: {reason}")
    return spec


def resolve(model: nn.Module) -> Layout:
    """Check that every role of the family's spec exists in ``model`` and return its layout."""
    spec = spec_for(model.config)
    model_type = model.config.model_type

    def check(root: nn.Module, path: str, role: str) -> None:
        try:
            get_module(root, path)
        except AttributeError:
            raise SlicelmError(
                f"{model_type} model has no {role} at {path!r}; its ArchSpec in slicelm.arch needs fixing"
            ) from None

    for path in spec.embeddings:
        check(model, path, "embedding")
    for path, role in ((spec.layers, "decoder layers"), (spec.final_norm, "final norm"), (spec.head, "head")):
        check(model, path, role)
    layer = get_module(model, spec.layers)[0]
    mlp_chain = (spec.mlp,) if isinstance(spec.mlp, str) else spec.mlp
    block_roles = [(spec.attn_norm, "attention norm"), (spec.attn, "attention")]
    block_roles += [(p, "MLP") for p in mlp_chain]
    if spec.mlp_norm:
        block_roles.append((spec.mlp_norm, "MLP norm"))
    block_roles += [(p, "attention input") for p in spec.attn_inputs]
    block_roles += [(p, "attention output") for p in spec.attn_outputs]
    block_roles += [(p, "MLP input") for p in spec.mlp_inputs]
    block_roles += [(p, "MLP output") for p in spec.mlp_outputs]
    for path, role in block_roles:
        check(layer, path, role)

    def gains_bias(root: nn.Module, norm: str, readers: tuple[str, ...]) -> list[str]:
        if getattr(get_module(root, norm), "bias", None) is None:
            return []
        return [p for p in readers if stream_bias(get_module(root, p)) is None]

    shared = spec.attn_inputs + (spec.mlp_inputs if spec.mlp_norm is None else ())
    new_biases = gains_bias(layer, spec.attn_norm, shared)
    if spec.mlp_norm:
        new_biases += gains_bias(layer, spec.mlp_norm, spec.mlp_inputs)
    new_biases += gains_bias(model, spec.final_norm, (spec.head,))

    return Layout(
        model_type=model_type,
        embeddings=spec.embeddings,
        layers=spec.layers,
        final_norm=spec.final_norm,
        head=spec.head,
        attn_norm=spec.attn_norm,
        attn=spec.attn,
        mlp_norm=spec.mlp_norm,
        mlp=spec.mlp,
        attn_inputs=spec.attn_inputs,
        attn_outputs=spec.attn_outputs,
        mlp_inputs=spec.mlp_inputs,
        mlp_outputs=spec.mlp_outputs,
        parallel=bool(getattr(model.config, spec.parallel_if)) if spec.parallel_if else spec.parallel,
        mlp_same_width=spec.mlp_same_width,
        ends_same_width=spec.ends_same_width,
        returns_tuple=spec.returns_tuple,
        norm=spec.norm,
        norm_offset=spec.norm_offset,
        mlp_chunks=spec.mlp_chunks,
        new_biases=tuple(new_biases),
    )


def norm_eps(module: nn.Module) -> float:
    """The epsilon of a norm module, whatever the family calls it."""
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (float, int)):
            return float(value)
    raise SlicelmError(f"cannot find the epsilon of norm {type(module).__name__}")
