"""Assertions and inputs shared by the test modules."""

from __future__ import annotations

import torch


def padded_batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 12) input ids with a right-padded row and a left-padded row, and the attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    ids[mask == 0] = 0
    return ids, mask


def calibration(vocab: int, lengths=(32, 20, 28, 32, 9, 32, 17, 32), seed: int = 0) -> list[torch.Tensor]:
    """Variable-length calibration sequences: the shorter ones get padded inside a batch."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]


@torch.no_grad()
def logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits


def relative_error(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> float:
    """max |Δlogit| / max |logit| over real (non-padding) positions."""
    keep = mask.bool()
    return ((reference - other)[keep].abs().max() / reference[keep].abs().max()).item()
