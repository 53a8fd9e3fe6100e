"""Perplexity over non-overlapping windows of a long token stream (the GPTQ / SliceGPT protocol).

The test text is cut into ``W = len(ids) // seqlen`` windows of exactly ``seqlen`` tokens; the
ragged tail is dropped. Each window is scored independently (no context carried over), every
next-token prediction inside a window counts (``seqlen - 1`` per window), and

    ppl = exp( sum of NLL over all predictions / number of predictions ).

Because all windows have the same length this equals GPTQ's ``exp(mean of per-window mean loss)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slicelm.errors import SlicelmError


@dataclass(frozen=True)
class PerplexityResult:
    """Outcome of `perplexity`.

    ppl: ``exp(nll)``. nll: mean negative log-likelihood per predicted token, in nats.
    tokens: number of predicted tokens (``windows * (seqlen - 1)``). windows: windows scored.
    seqlen: tokens per window.
    """

    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int


def count_windows(n_tokens: int, seqlen: int, max_windows: int | None = None) -> int:
    """How many non-overlapping windows of ``seqlen`` tokens `perplexity` scores."""
    n = n_tokens // seqlen
    return n if max_windows is None else min(n, max_windows)


def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    *,
    seqlen: int,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    score_from: int = 0,
) -> PerplexityResult:
    """Perplexity of a causal LM on the token stream ``ids``.

    Args:
        model: a Hugging Face causal LM (``model(input_ids).logits`` of shape ``(B, T, V)``). It is
            run in eval mode on the device of its first parameter; its train/eval mode is restored.
        ids: the whole test text, shape ``(N,)`` (a ``(1, N)`` batch is accepted too).
        seqlen: tokens per window, ``T``; at least 2 (one prediction per window needs two tokens).
        max_windows: score only the first ``max_windows`` windows (all if None).
        batch_size: windows per forward pass, ``B``; changes speed and memory, not the result
            (up to float rounding).
        progress: show a tqdm bar on stderr.
        score_from: predictions of positions before this index in each window are context only,
            not scored (llama.cpp's ``llama-perplexity`` scores the second half: ``seqlen // 2``).
    """
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"ids must have shape (N,) or (1, N), got {tuple(ids.shape)}")
    if seqlen < 2:
        raise SlicelmError(f"the perplexity window length must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise SlicelmError(f"the number of windows must be at least 1, got {max_windows}")
    if batch_size < 1:
        raise SlicelmError(f"the batch size must be at least 1, got {batch_size}")
    if not 0 <= score_from < seqlen - 1:
        raise SlicelmError(f"--score-from must be in [0, {seqlen - 1}), got {score_from}")
    n_windows = count_windows(ids.numel(), seqlen, max_windows)
    if n_windows == 0:
        raise SlicelmError(
            f"the text has {ids.numel():,} tokens, fewer than one window of {seqlen}; lower the window length"
        )

    device = next(model.parameters()).device
    windows = ids[: n_windows * seqlen].reshape(n_windows, seqlen)  # (W, T)
    total_nll = torch.zeros((), dtype=torch.float64)  # float64: W*T terms, float32 would drift
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            tqdm(total=n_windows, desc="perplexity", unit="win", disable=not progress) as bar,
        ):
            for start in range(0, n_windows, batch_size):
                batch = windows[start : start + batch_size].to(device)  # (B, T)
                logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
                # Position t predicts token t+1; float32 log-softmax even for bf16/fp16 models.
                nll = F.cross_entropy(
                    logits[:, score_from:-1].flatten(0, 1).float(),  # (B*(T-1-s), V)
                    batch[:, score_from + 1 :].flatten(),  # (B*(T-1-s),)
                    reduction="sum",
                )
                total_nll += nll.double().cpu()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)

    tokens = n_windows * (seqlen - 1 - score_from)
    mean_nll = total_nll.item() / tokens
    return PerplexityResult(ppl=math.exp(mean_nll), nll=mean_nll, tokens=tokens, windows=n_windows, seqlen=seqlen)
