"""The slicing plan: the width of every point of the residual stream, separate from the algorithm.

The stream is expressed in its own basis at each point where it is written: after the embeddings,
after each attention branch (sequential blocks) and after each block. A plan gives the number of
basis vectors kept at each of those points. It is saved with the model, so a checkpoint can be
rebuilt from its config alone, and other schedules (per-layer sparsity, ...) only have to produce
a different plan.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slicelm.errors import SlicelmError


@dataclass(frozen=True)
class LayerWidths:
    """Widths of one decoder layer. ``mid`` (the stream after attention) is None for parallel blocks;
    ``mlp`` is the MLP's intermediate width after channel pruning (None: unchanged)."""

    mid: int | None
    out: int
    mlp: int | None = None


@dataclass(frozen=True)
class SlicingPlan:
    hidden_size: int  # D, the original width
    embedding: int  # width after the embeddings = input width of layer 0
    layers: tuple[LayerWidths, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        widths = [self.embedding] + [w for lw in self.layers for w in (lw.mid, lw.out) if w is not None]
        bad = [w for w in widths if not 0 < w <= self.hidden_size]
        if bad:
            raise SlicelmError(f"slicing plan has widths outside 1..{self.hidden_size}: {bad[:5]}")
        if any(lw.mlp is not None and lw.mlp < 1 for lw in self.layers):
            raise SlicelmError("slicing plan has an MLP width below 1")

    @property
    def is_uniform(self) -> bool:
        """One stream width everywhere and one MLP width in every layer (what a stock config can hold)."""
        return len(self._stream_widths()) == 1 and len({lw.mlp for lw in self.layers}) == 1

    @property
    def keeps_stream(self) -> bool:
        """Every residual-stream width is the original one (only MLP channels, if anything, are removed)."""
        return self._stream_widths() == {self.hidden_size}

    def _stream_widths(self) -> set[int]:
        return {self.embedding} | {w for lw in self.layers for w in (lw.mid, lw.out) if w is not None}

    def with_mlp(self, widths: list[int | None]) -> SlicingPlan:
        """The same plan with these MLP intermediate widths, one per layer."""
        layers = tuple(LayerWidths(lw.mid, lw.out, m) for lw, m in zip(self.layers, widths, strict=True))
        return SlicingPlan(self.hidden_size, self.embedding, layers)

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
        layers = [{k: v for k, v in asdict(w).items() if k != "mlp" or v is not None} for w in self.layers]
        return {"hidden_size": self.hidden_size, "embedding": self.embedding, "layers": layers}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlicingPlan:
        layers = tuple(LayerWidths(w.get("mid"), w["out"], w.get("mlp")) for w in data["layers"])
        return cls(int(data["hidden_size"]), int(data["embedding"]), layers)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SlicingPlan:
        return cls.from_dict(json.loads(Path(path).read_text()))


def uniform_width(hidden_size: int, sparsity: float, round_to: int = 8) -> int:
    if not 0.0 <= sparsity < 1.0:
        raise SlicelmError(f"sparsity must be in [0, 1), got {sparsity}")
    if round_to < 1:
        raise SlicelmError(f"--round-to must be a positive integer, got {round_to}")
    if sparsity == 0.0:
        return hidden_size
    width = int(hidden_size * (1.0 - sparsity)) // round_to * round_to
    if width == 0:
        raise SlicelmError(
            f"sparsity {sparsity} with widths in steps of {round_to} leaves no width of the {hidden_size}-wide "
            f"stream (the step must be at most {int(hidden_size * (1.0 - sparsity))}); "
            f"lower --round-to {round_to} or the sparsity"
        )
    return width
