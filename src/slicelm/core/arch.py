"""Architecture knowledge as data.

Every module of a decoder-only transformer either *reads* the residual stream (q/k/v, gate/up, the
head), *writes* it (o, down, the embeddings) or *normalises* it. An :class:`ArchSpec` names those
modules by path for one family, keyed by ``config.model_type`` — never by the model's name, so local
checkpoints work as well as hub ids. A Llama-shaped family costs one line in :data:`REGISTRY`.

:func:`resolve` checks a spec against a loaded model and returns a :class:`Layout`: plain,
JSON-serialisable data that is saved with the sliced model and drives both slicing and loading.

Support comes in two tiers. *Structure-local* steps (MLP channels with their refit, per expert in a
mixture of experts) run each decoder layer as it is and never touch the residual stream: they need
only the roles to resolve. The *rotation* (stream slicing, SliceGPT, the plain basis) also needs
computational invariance; a family or configuration that breaks it carries the reason in
``ArchSpec.rotation`` / ``Layout.rotation`` (None: the rotation is allowed). A ``model_type`` that is
not registered but whose layers resolve to the Llama-style roles gets the local tier with a note.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from torch import nn

from slicelm.errors import SlicelmError
from slicelm.modeling.modeling_slicelm import get_module, stream_bias

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
    # Why this family's structure breaks computational invariance (None: the rotation holds). The
    # structure-local steps (MLP channels) still apply.
    rotation: str | None = None
    # Configurations whose structure breaks computational invariance: returns a reason (as above).
    refuse: Callable[[Any], str | None] | None = field(default=None, compare=False)
    # A decoder-layer attribute (and config field of the same name) scaling every branch output
    # before the residual add (Granite's residual_multiplier). Fusion folds it into the writers.
    residual_scale: str | None = None
    # Mixture of experts, block-level paths. ``experts``: a module holding fused expert weights
    # ``gate_up_proj`` (E, 2I, D) and ``down_proj`` (E, D, I), called as
    # ``experts(x (N, D), top_k_index (N, k), top_k_weights (N, k))``; I is config.<expert_field>.
    # A layer without it (Qwen-MoE's mlp_only_layers) has a dense Llama-style MLP at ``mlp``.
    experts: str | None = None
    expert_field: str = "intermediate_size"
    # A dense Llama-style MLP beside the experts whose output is scaled per token by
    # sigmoid(shared_expert_gate(x)) (Qwen2-MoE); its width is config.<shared_field>.
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    shared_field: str = "shared_expert_intermediate_size"


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
    # Experts have their own channels (a router decides between them): the rotation path does not
    # prune them; the structure-local path (slicelm.steps.local) prunes each expert on its routed tokens.
    mlp_chunks=None,
    experts="mlp.experts",
)


def _refuse_dense_moe_layers(config: Any) -> str | None:
    sparse = getattr(config, "decoder_sparse_step", 1) or 1
    if getattr(config, "mlp_only_layers", None) or sparse != 1:
        return (
            "some of its layers have a dense MLP instead of experts (mlp_only_layers / decoder_sparse_step), "
            "and the rotation's roles assume one MLP structure in every layer"
        )
    return None


QWEN3_MOE = replace(MIXTRAL, expert_field="moe_intermediate_size", refuse=_refuse_dense_moe_layers)

# Families whose blocks break computational invariance: the roles resolve (for the local steps),
# and ``rotation`` says why the stream cannot be rotated.
_SANDWICH = (
    "its blocks normalise each branch's output before the residual add (post_attention_layernorm and "
    "post_feedforward_layernorm), so branch outputs cannot be rotated into the stream's basis"
)
_POST_NORM = (
    "its blocks normalise each branch's output before the residual add and the branches read the stream "
    "unnormalised (post_attention_layernorm and post_feedforward_layernorm, no pre-norm), so no norm "
    "can be folded and branch outputs cannot be rotated into the stream's basis"
)
GEMMA2 = replace(
    LLAMA,
    mlp_norm="pre_feedforward_layernorm",  # post_attention_layernorm normalises the attention output
    norm_offset=1.0,
    scaled_embedding=True,
    rotation=_SANDWICH,
)
# OLMo 2 has no norm before its branches; the roles name the norms after them.
OLMO2 = replace(LLAMA, attn_norm="post_attention_layernorm", mlp_norm="post_feedforward_layernorm", rotation=_POST_NORM)
QWEN2_MOE = replace(
    QWEN3_MOE,
    shared_expert="mlp.shared_expert",
    shared_expert_gate="mlp.shared_expert_gate",
    rotation=(
        "slicelm's rotation has no entry for its gated shared expert (shared_expert and shared_expert_gate "
        "read the stream beside the router)"
    ),
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
    "qwen3_moe": QWEN3_MOE,  # Mixtral's structure, experts config.moe_intermediate_size wide
    "smollm3": LLAMA,  # NoPE layers only change attention's positions, not the stream
    "granite": replace(LLAMA, residual_scale="residual_multiplier"),  # embedding/logit scalars commute
    "starcoder2": replace(LAYER_NORM, mlp_inputs=("mlp.c_fc",), mlp_outputs=("mlp.c_proj",)),  # biases, no gate
    "opt": OPT,
    "gpt2": GPT2,
    "gpt_neox": GPT_NEOX,
    "phi": PHI,
}

# Families served by the structure-local steps only (``spec.rotation`` says why). Kept apart from
# REGISTRY, whose every entry the invariance tests rotate.
LOCAL_ONLY: dict[str, ArchSpec] = {
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA2,
    "olmo2": OLMO2,
    "qwen2_moe": QWEN2_MOE,
}

# model_types refused outright: model_type -> why.
REFUSED: dict[str, str] = {
    "gemma3": (
        "it is the multimodal wrapper (Gemma3ForConditionalGeneration); load its text model "
        "(model_type gemma3_text) to prune its MLP channels"
    ),
}

# Recognising an unregistered family: the Llama roles, with the MLP shapes other families use.
_RECOGNISABLE = (
    LLAMA,
    replace(LLAMA, mlp_inputs=("mlp.fc1",), mlp_outputs=("mlp.fc2",)),
    replace(LLAMA, mlp_inputs=("mlp.c_fc",), mlp_outputs=("mlp.c_proj",)),
)


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
    # Why this model cannot be rotated (stream slicing, SliceGPT, the plain basis); None: it can.
    rotation: str | None = None
    # Set for a model_type that is not registered but was recognised by its roles (one line).
    note: str | None = None
    residual_scale: str | None = None
    experts: str | None = None
    expert_field: str = "intermediate_size"
    intermediate_field: str = "intermediate_size"
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    shared_field: str = "shared_expert_intermediate_size"

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
    """Every registered family: with the rotation (REGISTRY) and structure-local only (LOCAL_ONLY)."""
    return sorted({*REGISTRY, *LOCAL_ONLY})


def rotation_model_types() -> list[str]:
    """Registered families whose structure admits the rotation (some configurations may not)."""
    return sorted(t for t, spec in REGISTRY.items() if spec.rotation is None)


def register(model_type: str, spec: ArchSpec = LLAMA, **changes: Any) -> ArchSpec:
    """Add (or replace) a family: ``register("mytype", LLAMA, head="output")``."""
    REGISTRY[model_type] = replace(spec, **changes) if changes else spec
    LOCAL_ONLY.pop(model_type, None)
    return REGISTRY[model_type]


def _unsupported(model_type: Any, why: str = "") -> SlicelmError:
    return SlicelmError(
        f"model_type {model_type!r} is not supported{why}; supported: {', '.join(supported_model_types())} "
        "(docs/architectures.md explains how to add one)"
    )


def spec_for(config: Any) -> ArchSpec:
    """The registered spec of ``config.model_type`` (refusing unregistered and refused types).

    The rotation's refusals are not raised here: see :func:`rotation_reason`.
    """
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise SlicelmError(f"cannot slice {model_type} models: {REFUSED[model_type]}")
    spec = REGISTRY.get(model_type) or LOCAL_ONLY.get(model_type)
    if spec is None:
        raise _unsupported(model_type)
    return spec


def rotation_reason(spec: ArchSpec, config: Any) -> str | None:
    """Why the rotation does not apply to this family or configuration (None: it does)."""
    return spec.rotation or (spec.refuse(config) if spec.refuse else None)


def rotation_refusal(layout: Layout) -> str:
    """The one-line refusal of a rotation (``--sparsity``, ``--layout`` bases) on ``layout``'s model."""
    local = (
        "; MLP channel pruning needs no rotation: give --mlp-sparsity (with --sparsity 0) or a --target-params budget"
    )
    model_type = layout.model_type
    if layout.note is not None:
        return f"model_type {model_type!r} is not supported by the rotation: {layout.rotation}{local}"
    spec = REGISTRY.get(model_type) or LOCAL_ONLY.get(model_type)
    if spec is not None and spec.rotation is not None:
        return f"cannot slice the stream of {model_type} models: {layout.rotation}{local}"
    return f"cannot slice this {model_type} model: {layout.rotation}{local}"


def require_rotation(layout: Layout) -> None:
    """Refuse (one line) a rotation of a model whose structure breaks computational invariance."""
    if layout.rotation is not None:
        raise SlicelmError(rotation_refusal(layout))


def _missing_role(model: nn.Module, spec: ArchSpec) -> tuple[str, str] | None:
    """The first (role, path) of ``spec`` that ``model`` lacks, or None when every role resolves."""

    def has(root: nn.Module, path: str) -> bool:
        try:
            get_module(root, path)
        except AttributeError:
            return False
        return True

    model_roles = [(p, "embedding") for p in spec.embeddings]
    model_roles += [(spec.layers, "decoder layers"), (spec.final_norm, "final norm"), (spec.head, "head")]
    for path, role in model_roles:
        if not has(model, path):
            return role, path
    layers = get_module(model, spec.layers)
    if len(layers) == 0:
        return "decoder layers", spec.layers
    layer = layers[0]
    if spec.experts:  # a MoE model's first layers may have a dense MLP (Qwen-MoE's mlp_only_layers)
        layer = next((candidate for candidate in layers if has(candidate, spec.experts)), layer)
    mlp_chain = (spec.mlp,) if isinstance(spec.mlp, str) else spec.mlp
    block_roles = [(spec.attn_norm, "attention norm"), (spec.attn, "attention")]
    block_roles += [(p, "MLP") for p in mlp_chain]
    if spec.mlp_norm:
        block_roles.append((spec.mlp_norm, "MLP norm"))
    block_roles += [(p, "attention input") for p in spec.attn_inputs]
    block_roles += [(p, "attention output") for p in spec.attn_outputs]
    block_roles += [(p, "MLP input") for p in spec.mlp_inputs]
    block_roles += [(p, "MLP output") for p in spec.mlp_outputs]
    if spec.shared_expert:
        block_roles += [(spec.shared_expert, "shared expert"), (spec.shared_expert_gate, "shared expert gate")]
    for path, role in block_roles:
        if not has(layer, path):
            return role, path
    return None


def _recognise(model: nn.Module, model_type: Any) -> tuple[ArchSpec, str]:
    """The spec of an unregistered family from its roles, with its one-line note; else a refusal."""
    for candidate in _RECOGNISABLE:
        if _missing_role(model, candidate) is None:
            note = (
                f"model_type {model_type!r} is not registered: recognised by its roles (Llama-style q/k/v/o, "
                f"{'/'.join(p.rsplit('.', 1)[-1] for p in candidate.mlp_inputs + candidate.mlp_outputs)}, "
                "input and post-attention norms); the rotation needs a registry entry"
            )
            return candidate, note
    role, path = _missing_role(model, _RECOGNISABLE[0])
    raise _unsupported(model_type, f": its layers do not resolve to the usual roles (no {role} at {path!r})")


def resolve(model: nn.Module) -> Layout:
    """Check that every role of the family's spec exists in ``model`` and return its layout."""
    model_type = getattr(model.config, "model_type", None)
    note = None
    if model_type in REFUSED or model_type in REGISTRY or model_type in LOCAL_ONLY:
        spec = spec_for(model.config)
        missing = _missing_role(model, spec)
        if missing is not None:
            raise SlicelmError(
                f"{model_type} model has no {missing[0]} at {missing[1]!r}; "
                "its ArchSpec in slicelm.core.arch needs fixing"
            )
        rotation = rotation_reason(spec, model.config)
    else:
        spec, note = _recognise(model, model_type)
        rotation = "it is not in slicelm's registry (recognised by its roles; the rotation needs a registry entry)"
    layer = get_module(model, spec.layers)[0]

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
        rotation=rotation,
        note=note,
        residual_scale=spec.residual_scale,
        experts=spec.experts,
        expert_field=spec.expert_field,
        intermediate_field=spec.intermediate_field,
        shared_expert=spec.shared_expert,
        shared_expert_gate=spec.shared_expert_gate,
        shared_field=spec.shared_field,
    )


def norm_eps(module: nn.Module) -> float:
    """The epsilon of a norm module, whatever the family calls it."""
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (float, int)):
            return float(value)
    raise SlicelmError(f"cannot find the epsilon of norm {type(module).__name__}")
