"""Streaming second-moment accumulation and PCA, in float64.

Activations arrive batch by batch from forward passes; only the (D, D) sum of outer products is
kept, never the activations themselves. Like SliceGPT, the moment is not mean-centred: the basis
must preserve ``x`` itself, not its deviation from a mean.

Precision: the running sum is float64. Each block of at most ``BLOCK_ROWS`` tokens is multiplied in
the activations' own precision when that is float32 (relative error ~1e-6 on a block of 8k tokens)
and added to it in float64: on a 2-core CPU that halves the cost of the statistics that dominate
slicing (an MLP's (I, I) moment over 65k tokens is ~0.3 TFLOP per layer), while no error ever
accumulates across blocks. Float64 inputs are multiplied in float64; half precision is upcast.
"""

from __future__ import annotations

import torch

BLOCK_ROWS = 8192  # tokens per partial product (see the module docstring)


class CovarianceAccumulator:
    """Accumulates ``sum_t x_t x_t^T`` over the non-padding tokens of many batches."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.dim = dim
        self.sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """x: (B, T, D) or (N, D); mask: (B, T) bool, True for real tokens. ``x`` is not modified."""
        rows = x[mask] if mask is not None else x.reshape(-1, x.shape[-1])  # (N, D)
        if rows.shape[-1] != self.dim:
            raise ValueError(f"expected width {self.dim}, got {rows.shape[-1]}")
        rows = rows.to(device=self.sum.device)
        if rows.dtype != torch.float64:
            rows = rows.to(torch.float32)
        for start in range(0, rows.shape[0], BLOCK_ROWS):
            block = rows[start : start + BLOCK_ROWS]  # (n, D)
            self.sum += (block.T @ block).to(torch.float64)
        self.count += rows.shape[0]

    def covariance(self) -> torch.Tensor:
        """(D, D) float64 second moment per token."""
        if self.count == 0:
            raise ValueError("no tokens were accumulated")
        return self.sum / self.count


def pca(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition sorted by descending variance.

    Returns ``(eigenvalues (D,), Q (D, D))`` in float64 with orthonormal columns: ``Q[:, :d]`` spans
    the d directions of largest variance. The sign of each column is fixed (largest entry positive)
    so results do not depend on the LAPACK build.
    """
    cov = cov.to(torch.float64)
    eigenvalues, vectors = torch.linalg.eigh((cov + cov.T) / 2)  # ascending
    order = torch.argsort(eigenvalues, descending=True)
    eigenvalues, vectors = eigenvalues[order], vectors[:, order]
    pivot = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[pivot, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return eigenvalues.clamp_min(0), vectors * signs


def random_orthogonal(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random (D, D) orthogonal matrix in float64 (for invariance tests and baselines)."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r))
