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
from slicelm.modeling_slicelm import get_module

NormKind = Literal["rms", "layer"]


@dataclass(frozen=True)
class ArchSpec:
    """Where the stream's readers, writers and norms live in one model family.

    Model-level paths are relative to the ``*ForCausalLM`` model; block-level paths are relative to
    one decoder layer. Defaults describe the Llama family.
    """

    embeddings: tuple[str, ...] = ("model.embed_tokens",)  # write the stream at its start
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    attn_norm: str = "input_layernorm"
    attn: str = "self_attn"
    attn_inputs: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_outputs: tuple[str, ...] = ("self_attn.o_proj",)
    mlp_norm: str | None = "post_attention_layernorm"  # None: the MLP reads attn_norm's output
    mlp: str = "mlp"
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_outputs: tuple[str, ...] = ("mlp.down_proj",)
    parallel: bool = False  # attention and MLP both read the block input (GPT-J/NeoX/Phi-2 style)
    returns_tuple: bool = False  # the decoder layer returns (hidden_states, ...)
    norm: NormKind = "rms"
    norm_offset: float = 0.0  # Gemma stores norm scales as (w - 1)
    # Refuses configurations whose structure breaks computational invariance: returns a reason.
    refuse: Callable[[Any], str | None] | None = field(default=None, compare=False)


LLAMA = ArchSpec()

# model_type -> spec. Families that are Llama-shaped share the default spec.
REGISTRY: dict[str, ArchSpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,  # q/k/v carry biases; the rotation handles biases generically
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
    mlp: str
    attn_inputs: tuple[str, ...]
    attn_outputs: tuple[str, ...]
    mlp_inputs: tuple[str, ...]
    mlp_outputs: tuple[str, ...]
    parallel: bool
    returns_tuple: bool
    norm: NormKind
    norm_offset: float

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
        for key in ("embeddings", "attn_inputs", "attn_outputs", "mlp_inputs", "mlp_outputs"):
            fields[key] = tuple(fields[key])
        return cls(**fields)


def supported_model_types() -> list[str]:
    return sorted(REGISTRY)


def register(model_type: str, spec: ArchSpec = LLAMA, **changes: Any) -> ArchSpec:
    """Add (or replace) a family: ``register("mytype", LLAMA, head="output")``."""
    REGISTRY[model_type] = replace(spec, **changes) if changes else spec
    return REGISTRY[model_type]


def spec_for(config: Any) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    spec = REGISTRY.get(model_type)
    if spec is None:
        raise SlicelmError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())} "
            "(see README 'Adding an architecture')"
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
    block_roles = [(spec.attn_norm, "attention norm"), (spec.attn, "attention"), (spec.mlp, "MLP")]
    if spec.mlp_norm:
        block_roles.append((spec.mlp_norm, "MLP norm"))
    block_roles += [(p, "attention input") for p in spec.attn_inputs]
    block_roles += [(p, "attention output") for p in spec.attn_outputs]
    block_roles += [(p, "MLP input") for p in spec.mlp_inputs]
    block_roles += [(p, "MLP output") for p in spec.mlp_outputs]
    for path, role in block_roles:
        check(layer, path, role)

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
        parallel=spec.parallel,
        returns_tuple=spec.returns_tuple,
        norm=spec.norm,
        norm_offset=spec.norm_offset,
    )


def norm_eps(module: nn.Module) -> float:
    """The epsilon of a norm module, whatever the family calls it."""
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (float, int)):
            return float(value)
    raise SlicelmError(f"cannot find the epsilon of norm {type(module).__name__}")
