"""The slicing plan: every decision of a slicing run, separate from the algorithm that made it.

The stream is expressed in its own basis at each point where it is written: after the embeddings,
after each attention branch (sequential blocks) and after each block. A plan gives the number of
basis vectors kept at each of those points, each MLP's intermediate width, the layout that writes
the result, where the bases come from and whether the head stays tied. It is JSON: saved with the
model (so a checkpoint can be rebuilt from its config alone), written by ``slicelm slice
--plan-only``, edited by hand or made by another tool, and followed by ``slicelm slice --plan``.

Deciding (:func:`slicelm.allocate.planning.plan`, the allocators of :mod:`slicelm.allocate.budget`
and :mod:`slicelm.allocate.measured`) produces a plan; doing (:func:`slicelm.steps.executor.execute`)
follows one and knows nothing of schedules.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from slicelm.errors import SlicelmError


@dataclass(frozen=True)
class LayerWidths:
    """Widths of one decoder layer.

    mid: the stream after attention (None for parallel blocks). mlp: the MLP's intermediate width
    after channel pruning (None: unchanged; 0: the MLP sub-block is removed). kv_heads / q_per_kv:
    the attention's KV heads and query heads per KV head after head removal (None: unchanged;
    ``kv_heads=0``: the attention sub-block is removed). A layer with both sub-blocks removed
    computes its residual alone.
    """

    mid: int | None
    out: int
    mlp: int | None = None
    kv_heads: int | None = None
    q_per_kv: int | None = None

    @property
    def attention_removed(self) -> bool:
        return self.kv_heads == 0

    @property
    def mlp_removed(self) -> bool:
        return self.mlp == 0

    @property
    def removed(self) -> bool:
        """Both sub-blocks are gone: the layer is the identity (a stock config drops it)."""
        return self.attention_removed and self.mlp_removed

    @property
    def heads(self) -> tuple[int, int] | None:
        """(kv_heads, q_per_kv) after head removal, None when the attention keeps its heads."""
        if self.kv_heads is None and self.q_per_kv is None:
            return None
        return (self.kv_heads, self.q_per_kv)


@dataclass(frozen=True)
class StreamLayout:
    """How a plan slices the residual stream (``SlicingPlan.layout``), and what follows from it.

    one_basis: one basis for the whole stream, so every residual stays the identity and no shortcut
    matrix is stored (a stock or DeciLM folder can hold the model); otherwise a basis per point of
    the stream, each chosen from that point's covariance, and a shortcut ``Q_in^T Q_out`` on every
    residual (slicelm's own folder, remote code). stock: asking for this layout asks for the stock
    architecture, so allocators plan stock-shaped widths only (one MLP width, uniform heads) and
    stream widths a stock config accepts (multiples of the attention heads).
    A new layout is one :func:`register_layout` call; the executor reads these fields.
    """

    name: str
    one_basis: bool
    stock: bool
    help: str

    @property
    def shortcuts(self) -> bool:
        """Residuals carry shortcut matrices (a basis per point)."""
        return not self.one_basis

    def config_info(self) -> dict[str, Any]:
        """What a sliced model's config records of the layout (read back when a folder loads)."""
        return {"kind": self.name, "one_basis": True} if self.one_basis else {}


STREAM_LAYOUTS: dict[str, StreamLayout] = {}


def register_layout(layout: StreamLayout) -> None:
    STREAM_LAYOUTS[layout.name] = layout


register_layout(
    StreamLayout(
        "slicegpt",
        one_basis=False,
        stock=False,
        help="a PCA basis per point of the stream and a shortcut matrix on every residual (the paper; remote code)",
    )
)
register_layout(
    StreamLayout(
        "plain",
        one_basis=True,
        stock=True,
        help="one basis for the whole stream, no shortcuts: the original architecture (or DeciLM per layer)",
    )
)
LAYOUTS = tuple(STREAM_LAYOUTS)
# The layout a stream that stays whole is planned in: nothing to rotate, so no shortcuts.
WHOLE_STREAM_LAYOUT = "plain"
BASES = ("pca", "random", "identity", "channels")
# What a refit writer matches. ``branch``: its own branch's output on the inputs it receives
# (structured OBS, the error of this step alone). ``dense``: the dense model's stream after the
# block, so each refit also takes back what the compressed layers upstream changed.
REFITS = ("branch", "dense")
# What a plan records of the model it was made for; following it on another model is refused.
IDENTITY_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size")


@dataclass(frozen=True)
class SlicingPlan:
    """Every width of a slicing run, and how the executor must produce it.

    layout: ``slicegpt`` (a basis per point, shortcut matrices) or ``plain`` (one basis for the whole
    stream, no shortcuts). basis: where the bases come from (:data:`BASES`). refit: what the MLP
    writers' refits match (:data:`REFITS`). tied: the head stays
    tied to the embedding (None: as the model is; an RMSNorm family's tie is kept by default).
    seed: for the random basis. model: what the plan was made for (:data:`IDENTITY_KEYS` and the
    dense parameter count). planning: how it was chosen (informational; the executor ignores it).
    """

    hidden_size: int  # D, the original width
    embedding: int  # width after the embeddings = input width of layer 0
    layers: tuple[LayerWidths, ...] = field(default_factory=tuple)
    layout: str = "slicegpt"
    basis: str = "pca"
    tied: bool | None = None
    seed: int = 0
    refit: str = "branch"
    model: dict[str, Any] = field(default_factory=dict, compare=False)
    planning: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise SlicelmError(f"slicing plan: layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.basis not in BASES:
            raise SlicelmError(f"slicing plan: basis must be one of {', '.join(BASES)}, got {self.basis!r}")
        if self.refit not in REFITS:
            raise SlicelmError(f"slicing plan: refit must be one of {', '.join(REFITS)}, got {self.refit!r}")
        widths = [self.embedding] + [w for lw in self.layers for w in (lw.mid, lw.out) if w is not None]
        bad = [w for w in widths if not 0 < w <= self.hidden_size]
        if bad:
            raise SlicelmError(f"slicing plan has widths outside 1..{self.hidden_size}: {bad[:5]}")
        if any(lw.mlp is not None and lw.mlp < 0 for lw in self.layers):
            raise SlicelmError("slicing plan has a negative MLP width (0 removes the MLP)")
        for i, lw in enumerate(self.layers):
            if lw.heads is None or lw.attention_removed:
                continue
            if lw.kv_heads is None or lw.q_per_kv is None or lw.kv_heads < 1 or lw.q_per_kv < 1:
                raise SlicelmError(
                    f"slicing plan layer {i}: give kv_heads and q_per_kv together, each at least 1 "
                    "(kv_heads 0 removes the attention)"
                )

    @property
    def is_uniform(self) -> bool:
        """One stream width everywhere, and every kept layer has the same MLP width and head counts
        and both its sub-blocks (what a stock config can hold: whole removed layers are left out)."""
        kept = [lw for lw in self.layers if not lw.removed]
        shapes = {(lw.mlp, lw.heads) for lw in kept}
        partial = any(lw.attention_removed or lw.mlp_removed for lw in kept)
        return len(self._stream_widths()) == 1 and len(shapes) == 1 and not partial

    @property
    def keeps_stream(self) -> bool:
        """Every residual-stream width is the original one (only MLP channels, if anything, are removed)."""
        return self._stream_widths() == {self.hidden_size}

    def _stream_widths(self) -> set[int]:
        return {self.embedding} | {w for lw in self.layers for w in (lw.mid, lw.out) if w is not None}

    @property
    def stream(self) -> StreamLayout:
        """The registered layout this plan slices the stream with."""
        return STREAM_LAYOUTS[self.layout]

    @property
    def one_basis(self) -> bool:
        """One basis for the whole stream: no shortcut matrices (the plain layout)."""
        return self.stream.one_basis

    @property
    def is_stock_shaped(self) -> bool:
        """Written in the model's own architecture: one basis and widths a stock config can hold."""
        return self.one_basis and self.is_uniform

    @property
    def prunes_mlp(self) -> bool:
        return any(lw.mlp is not None for lw in self.layers)

    @property
    def prunes_heads(self) -> bool:
        """Some layer loses attention heads (not the whole sub-block)."""
        return any(lw.heads is not None and not lw.attention_removed for lw in self.layers)

    @property
    def removes_blocks(self) -> bool:
        """Some layer loses a sub-block (attention or MLP) or both."""
        return any(lw.attention_removed or lw.mlp_removed for lw in self.layers)

    @property
    def removed_layers(self) -> list[int]:
        return [i for i, lw in enumerate(self.layers) if lw.removed]

    def with_mlp(self, widths: list[int | None]) -> SlicingPlan:
        """The same plan with these MLP intermediate widths, one per layer."""
        layers = tuple(replace(lw, mlp=m) for lw, m in zip(self.layers, widths, strict=True))
        return replace(self, layers=layers)

    def with_heads(self, heads: list[tuple[int, int] | None]) -> SlicingPlan:
        """The same plan with these ``(kv_heads, q_per_kv)`` per layer (None: unchanged, ``(0, 0)``:
        attention removed)."""
        layers = tuple(
            replace(lw, kv_heads=h[0] if h else None, q_per_kv=h[1] if h else None)
            for lw, h in zip(self.layers, heads, strict=True)
        )
        return replace(self, layers=layers)

    @classmethod
    def uniform(
        cls,
        hidden_size: int,
        num_layers: int,
        sparsity: float,
        round_to: int = 8,
        slice_head: bool = False,
        parallel: bool = False,
    ) -> SlicingPlan:
        """Every point keeps the same width (the paper's schedule).

        The width is ``(1 - sparsity) * hidden_size`` rounded down to a multiple of ``round_to``
        (GEMM-friendly shapes). With ``slice_head=False`` the last block's output keeps the full
        width so the head is unchanged in shape.
        """
        width = uniform_width(hidden_size, sparsity, round_to)
        layers = [LayerWidths(None if parallel else width, width) for _ in range(num_layers)]
        if not slice_head:
            layers[-1] = LayerWidths(layers[-1].mid, hidden_size)
        return cls(hidden_size, width, tuple(layers))

    def layer(self, index: int) -> tuple[int, int | None, int]:
        """(d_in, d_mid, d_out) of decoder layer ``index``."""
        d_in = self.embedding if index == 0 else self.layers[index - 1].out
        return d_in, self.layers[index].mid, self.layers[index].out

    @property
    def head(self) -> int:
        """Input width of the head (= the last block's output width)."""
        return self.layers[-1].out

    def to_dict(self) -> dict[str, Any]:
        optional = ("mlp", "kv_heads", "q_per_kv")
        layers = [{k: v for k, v in asdict(w).items() if k not in optional or v is not None} for w in self.layers]
        out: dict[str, Any] = {"hidden_size": self.hidden_size, "embedding": self.embedding, "layers": layers}
        out |= {"layout": self.layout, "basis": self.basis, "tied": self.tied, "seed": self.seed}
        if self.refit != "branch":  # plans saved before refits were chosen read as ``branch``
            out["refit"] = self.refit
        if self.model:
            out["model"] = dict(self.model)
        if self.planning:
            out["planning"] = dict(self.planning)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlicingPlan:
        """A plan from its JSON form (plans saved before layout/basis were recorded read as slicegpt/pca)."""
        try:
            layers = tuple(
                LayerWidths(
                    _width(w.get("mid")),
                    _width(w["out"]),
                    _width(w.get("mlp")),
                    _width(w.get("kv_heads")),
                    _width(w.get("q_per_kv")),
                )
                for w in data["layers"]
            )
            tied = data.get("tied")
            return cls(
                int(data["hidden_size"]),
                int(data["embedding"]),
                layers,
                layout=str(data.get("layout", "slicegpt")),
                basis=str(data.get("basis", "pca")),
                tied=None if tied is None else bool(tied),
                seed=int(data.get("seed", 0)),
                refit=str(data.get("refit", "branch")),
                model=dict(data.get("model") or {}),
                planning=dict(data.get("planning") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise SlicelmError(f"not a slicing plan ({why}); write one with --plan-only") from None

    def check_model(self, identity: dict[str, Any]) -> None:
        """Refuse to follow this plan on a model other than the one it describes (one line)."""
        for key in IDENTITY_KEYS:
            mine, theirs = self.model.get(key), identity.get(key)
            if mine is not None and theirs is not None and mine != theirs:
                raise SlicelmError(
                    f"the plan was made for a model with {key} {mine}, this one has {theirs}; "
                    "plan again for this model (--plan-only)"
                )
        if self.hidden_size != identity.get("hidden_size", self.hidden_size):
            raise SlicelmError(
                f"the plan's hidden_size {self.hidden_size} is not the model's {identity['hidden_size']}"
            )
        layers = identity.get("num_hidden_layers")
        if layers is not None and len(self.layers) != layers:
            raise SlicelmError(f"the plan has {len(self.layers)} layers, the model {layers}; plan again for this model")
        inter = identity.get("intermediate_size")
        wide = [i for i, lw in enumerate(self.layers) if lw.mlp is not None and inter is not None and lw.mlp > inter]
        if wide:
            raise SlicelmError(
                f"the plan gives layer {wide[0]} an MLP width of {self.layers[wide[0]].mlp}, wider than the "
                f"model's {inter}"
            )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SlicingPlan:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _width(value: Any) -> int | None:
    return None if value is None else int(value)


def round_width(width: float, step: int) -> int:
    """``width`` rounded down to a multiple of ``step`` (the one rounding rule of every width)."""
    return int(width) // step * step


def uniform_width(hidden_size: int, sparsity: float, round_to: int = 8) -> int:
    if not 0.0 <= sparsity < 1.0:
        raise SlicelmError(f"sparsity must be in [0, 1), got {sparsity}")
    if round_to < 1:
        raise SlicelmError(f"--round-to must be a positive integer, got {round_to}")
    if sparsity == 0.0:
        return hidden_size
    width = round_width(hidden_size * (1.0 - sparsity), round_to)
    if width == 0:
        raise SlicelmError(
            f"sparsity {sparsity} with widths in steps of {round_to} leaves no width of the {hidden_size}-wide "
            f"stream (the step must be at most {int(hidden_size * (1.0 - sparsity))}); "
            f"lower --round-to {round_to} or the sparsity"
        )
    return width
