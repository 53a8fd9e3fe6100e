"""Where a basis of the residual stream comes from: one table, used wherever a basis is chosen.

A basis is an orthogonal (D, D) matrix whose first k columns are kept when the stream is sliced to
width k. The slicegpt layout chooses one at every point of the stream, from that point's
covariance; the plain layout chooses one for the whole stream, from every point's statistics.
Each entry of :data:`BASES` says how to do both, and whether it needs the statistics pass at all.

Adding a basis is one :func:`register_basis` call (and its name in :data:`slicelm.core.plan.BASES`,
which a test keeps in step); the executor never changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from slicelm.core.pca import pca, random_orthogonal
from slicelm.core.statistics import ModelStatistics, channel_basis, global_basis


@dataclass(frozen=True)
class Basis:
    """One way to choose bases.

    at_point(cov (D, D) float64, generator) -> (D, D): the basis at one point of the stream from
    its covariance (slicegpt layout). whole(stats or None, dim, generator) -> (D, D): one basis for
    the whole stream (plain layout). data: whole() reads the stream statistics (a statistics pass
    runs first). full_width_identity: at full width every basis of this kind gives the same
    function, so the identity is used and no statistics pass is needed.
    """

    at_point: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    whole: Callable[[ModelStatistics | None, int, torch.Generator], torch.Tensor]
    data: bool
    full_width_identity: bool = False
    help: str = ""


BASES: dict[str, Basis] = {}


def register_basis(name: str, basis: Basis) -> None:
    BASES[name] = basis


def _eye(dim: int, device: torch.device | None = None) -> torch.Tensor:
    return torch.eye(dim, dtype=torch.float64, device=device)


def _energy_order(cov: torch.Tensor) -> torch.Tensor:
    """The permutation (D, D) sorting coordinates by their energy (no rotation)."""
    order = torch.argsort(torch.diagonal(cov), descending=True)
    return _eye(cov.shape[0], cov.device)[:, order]


register_basis(
    "pca",
    Basis(
        at_point=lambda cov, _g: pca(cov)[1],
        whole=lambda stats, _dim, _g: global_basis(stats)[1],
        data=True,
        full_width_identity=True,
        help="principal components of the stream (the paper)",
    ),
)
register_basis(
    "channels",
    Basis(
        at_point=lambda cov, _g: _energy_order(cov),
        whole=lambda stats, _dim, _g: channel_basis(stats),
        data=True,
        help="keep the most energetic coordinates, no rotation",
    ),
)
register_basis(
    "identity",
    Basis(
        at_point=lambda cov, _g: _eye(cov.shape[0], cov.device),
        whole=lambda _stats, dim, _g: _eye(dim),
        data=False,
        help="the stream's own coordinates (keeps the first ones)",
    ),
)
register_basis(
    "random",
    Basis(
        at_point=lambda cov, g: random_orthogonal(cov.shape[0], g).to(cov.device),
        whole=lambda _stats, dim, g: random_orthogonal(dim, g),
        data=False,
        help="a Haar-random rotation (invariance tests, baselines)",
    ),
)


def basis_for(name: str) -> Basis:
    return BASES[name]


def needs_moments(plan_basis: str, one_basis: bool, keeps_stream: bool) -> bool:
    """A one-basis plan's statistics pass is needed: its basis is chosen from data and the stream
    is narrowed (or the basis is not the same function at every choice)."""
    basis = BASES[plan_basis]
    return one_basis and basis.data and not (basis.full_width_identity and keeps_stream)
