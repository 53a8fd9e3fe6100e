"""What a slicing run is asked to do: :class:`SliceConfig`, validated on construction.

This is the one home of the range checks (the CLI and the plan rely on them). The names of the
allocators are listed here so the config can be checked before anything heavier is imported; the
allocators themselves live in :mod:`slicelm.allocate.budget` (``ALLOCATORS``) and :mod:`slicelm.allocate.measured`,
and a test keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from slicelm.core.plan import BASES, LAYOUTS, STREAM_LAYOUTS, StreamLayout
from slicelm.errors import SlicelmError

Basis = Literal["pca", "random", "identity", "channels"]
LayoutKind = Literal["slicegpt", "plain"]
# auto: the measured allocator (candidates scored end to end on held-out calibration windows);
# uniform: stream only (the paper); mlp: MLP channels, the same width in every layer; mlp-global and
# proxy: per-layer allocations by a calibration proxy; mlp-levels: per-layer widths along measured KL
# removal curves (all three measured to lose, kept as named options; see docs/results);
# heads / attn-blocks: one new removal step with the MLPs (the steps alone, as named options).
# layers: the least sensitive 1/16 of the decoder layers removed whole, the rest from every MLP (the
# structure-local step alone; auto scores it on families without the rotation).
SCHEDULES = ("auto", "uniform", "mlp", "mlp-global", "proxy", "mlp-levels", "heads", "attn-blocks", "layers")
# Schedules that only the structure-local path plans (slicelm.allocate.local), with no executor allocator.
LOCAL_SCHEDULES = ("layers",)
DEFAULT_SCHEDULE = "auto"


@dataclass(frozen=True)
class SliceConfig:
    """How to slice. Validated on construction.

    sparsity: fraction of the hidden width removed at every point of the stream, in [0, 1).
    mlp_sparsity: fraction of every MLP's intermediate channels removed (structured OBS with a
        least-squares refit of the MLP's output, :mod:`slicelm.steps.channels`), in [0, 1).
    target_params: instead of the two above, the wanted fraction of the dense model's true
        parameter count, in (0, 1): slicelm chooses the widths (see :mod:`slicelm.allocate.budget` and
        ``schedule``).
    schedule: how ``target_params`` is spent (:data:`SCHEDULES`): ``auto`` (default: scores the
        simple plans and per-layer allocations measured end to end on held-out calibration windows,
        keeps the best), ``uniform`` (the paper: stream only), ``mlp`` (MLP channels only, the same
        number per layer), ``mlp-global`` / ``proxy`` (per-layer allocations by a calibration
        proxy; measured to lose, kept as named options), ``heads`` / ``attn-blocks`` (one head fewer
        per KV group in every layer, or some attention sub-blocks removed, the rest from every MLP).
        ``layers`` removes the least sensitive 1/16 of the decoder layers whole (stock config with fewer
        layers), the rest from every MLP, on any family. On a model without the rotation
        (:mod:`slicelm.steps.local`) ``auto`` scores uniform MLP channels, heads with MLPs and whole
        layers with MLPs (:mod:`slicelm.allocate.local`) and keeps the best.
    layout: ``slicegpt`` (a PCA basis per point of the stream, shortcut matrices on the residuals,
        loads with remote code) or ``plain`` (one basis for the whole stream: no shortcuts, the
        original architecture with smaller widths, loads in stock transformers, vLLM, llama.cpp).
    round_to: widths are rounded down to a multiple of this (GEMM-friendly shapes).
    slice_head: also slice the input of the LM head (the last block's output). For a kept tie the
        head is the embedding, so without slice_head the shared matrix keeps its full width. The
        plain layout always slices it (the stream has one width).
    untie_head: for models whose head is tied to the embedding, give the head its own weight (the
        paper's method). By default the tie is kept: the head reads the embedding's basis and the
        final norm becomes a small (d_L, d_0) projection, so the vocabulary matrix is stored once.
        LayerNorm families are always untied (mean-centring the embedding would change the head).
    basis: ``pca`` (SliceGPT); ``random`` (a Haar-random rotation: an exactness check and a
        baseline), ``identity`` (plain truncation of the original coordinates, a baseline) or
        ``channels`` (keep the stream channels with the most calibration energy, no rotation:
        Minitron-style channel selection). A plain layout whose stream stays whole (MLP channels
        only) keeps the identity for ``pca``: at full width any basis gives the same function.
    batch_size: calibration sequences per forward pass.
    seed: for the random basis.
    """

    sparsity: float = 0.25
    round_to: int = 8
    slice_head: bool = False
    untie_head: bool = False
    basis: Basis = "pca"
    batch_size: int = 8
    seed: int = 0
    mlp_sparsity: float = 0.0
    layout: LayoutKind = "slicegpt"
    target_params: float | None = None
    schedule: str = DEFAULT_SCHEDULE

    def __post_init__(self) -> None:
        for name in ("sparsity", "mlp_sparsity"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise SlicelmError(f"{name.replace('_', '-')} must be in [0, 1), got {value}")
        if self.target_params is not None and not 0.0 < self.target_params < 1.0:
            raise SlicelmError(
                f"target-params is a fraction of the dense model's parameters in (0, 1), got {self.target_params}"
            )
        if int(self.round_to) < 1:
            raise SlicelmError(f"round_to must be a positive integer, got {self.round_to}")
        if self.basis not in BASES:
            raise SlicelmError(f"basis must be one of {', '.join(BASES)}, got {self.basis!r}")
        if self.layout not in LAYOUTS:
            raise SlicelmError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.schedule not in SCHEDULES:
            raise SlicelmError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if int(self.batch_size) < 1:
            raise SlicelmError(f"batch size must be a positive integer, got {self.batch_size}")

    @property
    def stream(self) -> StreamLayout:
        """The registered stream layout ``layout`` names."""
        return STREAM_LAYOUTS[self.layout]

    @property
    def prunes_mlp(self) -> bool:
        """The plan may narrow MLPs: an explicit MLP sparsity, or a budget spent by a schedule that can."""
        return self.mlp_sparsity > 0 or (self.target_params is not None and self.schedule != "uniform")
