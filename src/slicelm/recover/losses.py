"""Losses in bounded memory: the model's head is bypassed (its forward returns the final hidden states) and
the next-token (``lm``) or distillation (``kd``) loss projects them through the head block by block, so the
full logits never exist; the gradient is exact. Distillation can also be against the teacher's top-k
next tokens (:class:`TopK`, ``FinetuneConfig.kd_top_k``), an approximation that is exact at k = vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slicelm.core.arch import REGISTRY

# One (rows, vocab) float32 block of logits is at most this many elements (64 MiB): a block's
# softmaxes and gradient (about six such blocks) are the only vocabulary-wide tensors a loss ever
# holds, whatever the batch. Above glibc's largest mmap threshold (32 MiB) on purpose: smaller blocks
# come from its heap once one was freed, and fragment it (measured: 16 MiB blocks raised a KD step's
# peak from 5.9 to 8.8 GiB on SmolLM2 at 4 x 512).
LOGIT_BLOCK = 2**24


@dataclass(frozen=True)
class Head:
    """A model's output projection, ``logits = hidden @ weight.T + bias``: weight (V, H), bias (V,).

    ``weight=None`` means the hidden states already are the logits (a model whose head could not be
    bypassed, see :func:`forward_hidden`).
    """

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) in float32 (float64 for float64 inputs)."""
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        if self.weight is None:
            return hidden.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(hidden.to(dtype), self.weight.to(dtype), bias)

    def to(self, device) -> Head:
        """This head with its weight and bias on ``device`` (the same tensors where they already are)."""
        if self.weight is None:
            return self
        return Head(self.weight.to(device), None if self.bias is None else self.bias.to(device))


LOGITS = Head()


@dataclass(frozen=True)
class TopK:
    """Next-token distributions reduced to their ``k`` most likely tokens and one bucket for the rest.

    Per row (one real token position): ``ids`` (N, k) int32, ``log_p`` (N, k) their log-probabilities
    (float32, float64 for float64 inputs) and ``log_tail`` (N,) the log of the mass of every other token
    (-inf when k is the vocabulary). A distribution over k + 1 outcomes, exact at k = vocabulary.
    """

    ids: torch.Tensor
    log_p: torch.Tensor
    log_tail: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ids, self.log_p, self.log_tail))

    def rows(self, i: int, j: int) -> TopK:
        return TopK(self.ids[i:j], self.log_p[i:j], self.log_tail[i:j])

    def to(self, device) -> TopK:
        return TopK(self.ids.to(device), self.log_p.to(device), self.log_tail.to(device))


@torch.no_grad()
def top_k(hidden: torch.Tensor, head: Head, k: int, temperature: float, *, rows: int | None = None) -> TopK:
    """The distributions ``softmax(head(hidden) / T)`` of hidden (N, H) reduced to their top ``k``
    (k above the vocabulary keeps it all), block by block like the losses: one block of logits at a time."""
    vocab = hidden.shape[-1] if head.weight is None else head.weight.shape[0]
    k = min(k, vocab)
    rows = rows or max(1, LOGIT_BLOCK // vocab)
    parts = []
    for i in range(0, hidden.shape[0], rows):
        log_p = F.log_softmax(head.logits(hidden[i : i + rows]) / temperature, dim=-1)  # (rows, V)
        top, ids = log_p.topk(k, dim=-1)  # (rows, k), most likely first
        # the rest's mass as a log-sum-exp over the other tokens: 1 - sum(top) cancels catastrophically
        tail = log_p.scatter_(1, ids, float("-inf")).logsumexp(dim=-1)  # (rows,)
        parts.append((ids.to(torch.int32), top, tail))
    if not parts:
        empty = hidden.new_zeros((0, k), dtype=torch.promote_types(hidden.dtype, torch.float32))
        return TopK(empty.to(torch.int32), empty, empty[:, 0])
    ids, top, tail = (torch.cat(column) for column in zip(*parts, strict=True))
    return TopK(ids, top, tail)


def _top_k_kl(s: torch.Tensor, target: TopK, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed ``T^2 KL`` over the k + 1 outcomes of ``target`` (the teacher's top k and the rest) between it
    and the student's logits ``s`` (rows, V) collapsed onto the same outcomes, and its gradient with respect
    to ``s``: ``T (q - p~)``, where p~ is the teacher's top-k probabilities on its ids and its tail mass
    spread over the other tokens in the student's proportions (``p_tail q_m / q_tail``)."""
    log_q = F.log_softmax(s / t, dim=-1)  # (rows, V)
    ids = target.ids.long()  # (rows, k)
    log_p, log_p_tail = target.log_p.to(log_q.dtype), target.log_tail.to(log_q.dtype)  # (rows, k), (rows,)
    log_q_top = log_q.gather(1, ids)
    q = log_q.exp_().scatter_(1, ids, 0.0)  # the student's probabilities off the top k
    q_tail = q.sum(dim=-1).clamp_min(torch.finfo(q.dtype).tiny)  # a sum of small terms: no cancellation
    p, p_tail = log_p.exp(), log_p_tail.exp()  # p_tail is 0 when k is the vocabulary
    tail = torch.where(p_tail > 0, p_tail * (log_p_tail - q_tail.log()), 0.0)
    loss = ((p * (log_p - log_q_top)).sum() + tail.sum()) * t**2
    grad = q.mul_((1 - p_tail / q_tail).unsqueeze(1)).scatter_(1, ids, log_q_top.exp() - p)
    return loss, grad.mul_(t)


class BlockTargets:
    """What one block of logits is scored against: ``kd`` (the teacher's hidden states and head), ``topk``
    (the teacher's :class:`TopK`) or ``lm`` (next-token ids). ``score(s, i, j)`` returns the summed loss
    of rows ``i:j`` of the student's raw float32 logits ``s`` and its gradient with respect to them."""

    def __init__(self, kind: str, target: torch.Tensor | TopK, head: Head = LOGITS, temperature: float = 1.0):
        self.kind, self.target, self.head, self.temperature = kind, target, head, temperature

    def score(self, s: torch.Tensor, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "topk":
            return _top_k_kl(s, self.target.rows(i, j), self.temperature)
        if self.kind == "lm":
            log_q = F.log_softmax(s, dim=-1)
            ids = self.target[i:j].unsqueeze(1)
            loss = -log_q.gather(1, ids).sum()
            grad = log_q.exp_().scatter_add_(1, ids, torch.full_like(ids, -1, dtype=s.dtype))
            return loss, grad
        # T^2 KL(p || q) at temperature T; its gradient with respect to the raw logits is T (q - p)
        t = self.temperature
        log_p = F.log_softmax(self.head.logits(self.target[i:j]) / t, dim=-1)
        log_q = F.log_softmax(s / t, dim=-1)
        p = log_p.exp()
        loss = (p * (log_p - log_q)).sum() * t**2
        return loss, log_q.exp_().sub_(p).mul_(t)


class _ChunkedLoss(torch.autograd.Function):
    """Mean loss over ``N`` rows of hidden states projected through a head, block by block.

    The forward pass computes the gradient too (the loss is a scalar, so one pass suffices): per block
    of rows, logits -> loss and d loss / d logits -> gradients of the hidden states, the head's weight
    and bias. Only one block's logits exist at a time; the backward pass scales what was kept.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets: BlockTargets, rows: int):  # hidden (N, H)
        head = Head(weight, bias)
        n = hidden.shape[0]
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if want_h else None
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # of the logits and the accumulators
        grad_w = torch.zeros_like(weight, dtype=dtype) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=dtype) if want_b else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)  # a sum of N per-token terms
        for i in range(0, n, rows):
            j = min(i + rows, n)
            loss, g = targets.score(head.logits(hidden[i:j]), i, j)  # g: (rows, V)
            total += loss.double()
            if weight is None:
                if want_h:
                    grad_h[i:j] = g
                continue
            if want_h:
                grad_h[i:j] = g @ weight.to(dtype)
            if want_w:
                grad_w.addmm_(g.T, hidden[i:j].to(dtype))
            if want_b:
                grad_b += g.sum(0)
        scale = 1.0 / max(n, 1)
        ctx.grads = [None if g is None else g.mul_(scale) for g in (grad_h, grad_w, grad_b)]
        ctx.dtypes = [None if t is None else t.dtype for t in (hidden, weight, bias)]
        return (total * scale).to(dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grads = [None if g is None else (g * grad_out).to(d) for g, d in zip(ctx.grads, ctx.dtypes, strict=True)]
        return *grads, None, None


def chunked_loss(hidden: torch.Tensor, head: Head, targets: BlockTargets, rows: int | None) -> torch.Tensor:
    vocab = hidden.shape[-1] if head.weight is None else head.weight.shape[0]
    rows = rows or max(1, LOGIT_BLOCK // vocab)
    return _ChunkedLoss.apply(hidden, head.weight, head.bias, targets, rows)


def lm_loss(
    hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, head: Head = LOGITS, *, rows: int | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy over real tokens. hidden (B, T, H) (logits when ``head`` is
    :data:`LOGITS`), ids/mask (B, T). Computed in blocks of ``rows`` tokens (default: 64 MiB of logits)."""
    keep = mask[:, 1:].bool()
    targets = BlockTargets("lm", ids[:, 1:][keep])
    return chunked_loss(hidden[:, :-1][keep], head, targets, rows)


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    *,
    student_head: Head = LOGITS,
    teacher_head: Head = LOGITS,
    rows: int | None = None,
) -> torch.Tensor:
    """Mean over real tokens of ``T^2 KL(p_teacher || p_student)`` at temperature T.

    student/teacher: (B, T, H_s) and (B, T, H_t) hidden states projected by their heads (logits with
    the default :data:`LOGITS`); mask (B, T). The KL is computed in blocks of ``rows`` tokens, so the
    two models' full logits never exist for the whole batch; the gradient is exact.
    """
    keep = mask.bool()
    targets = BlockTargets("kd", teacher[keep].detach(), teacher_head, temperature)
    return chunked_loss(student[keep], student_head, targets, rows)


def kd_top_k_loss(
    student: torch.Tensor,
    teacher: TopK,
    mask: torch.Tensor,
    temperature: float,
    *,
    student_head: Head = LOGITS,
    rows: int | None = None,
) -> torch.Tensor:
    """Mean over real tokens of ``T^2 KL`` between the teacher's top-k distribution (one row per real
    token of ``mask``, in order: :func:`top_k` of ``teacher_hidden[mask]``) and the student's, collapsed
    onto the same k ids and one bucket for every other token (its mass ``1 - sum of its top-k probabilities``).

    student: (B, T, H_s) hidden states projected by ``student_head``; mask (B, T). Blocked like
    :func:`kd_loss`, and equal to it when k is the vocabulary.
    """
    keep = mask.bool()
    if len(teacher) != int(keep.sum()):
        raise ValueError(f"{len(teacher)} teacher rows for {int(keep.sum())} real tokens")
    return chunked_loss(student[keep], student_head, BlockTargets("topk", teacher, temperature=temperature), rows)


def output_head(model: nn.Module) -> nn.Linear | None:
    """The model's head when its logits are exactly ``head(final hidden states)``: a plain linear in a
    family slicelm knows (:data:`slicelm.core.arch.REGISTRY`; none of them scales or caps its logits).
    None otherwise: such a model's logits are taken as it computes them."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    known = getattr(config, "model_type", None) in REGISTRY
    capped = any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return head if known and not capped and type(head) is nn.Linear else None


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def forward_hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Head]:
    """The model's final hidden states (B, T, H) and its :class:`Head`, without computing the logits.

    The head's forward is swapped for the identity during the call, so the model returns what its
    head would have read (the (B, T, V) logits are what fills memory at a large vocabulary; the
    losses project block by block). A model without a bypassable head returns its logits and
    :data:`LOGITS`. A wrapped model (DDP, FSDP) computes through :class:`WithLoss`, which calls this on the
    model itself.
    """
    head = output_head(model)
    if head is None:
        return model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits, LOGITS
    head.forward = _identity
    try:
        hidden = model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits
    finally:
        del head.forward
    return hidden, Head(head.weight, head.bias)


class WithLoss(nn.Module):
    """``model`` whose forward returns a loss of its final hidden states: ``loss(hidden, head)``
    (:func:`forward_hidden`), computed inside the forward. There a sharded (FSDP) model's weights are
    whole, and the head's gradient flows back through the wrapper like any other weight's (DDP, FSDP)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, loss: Callable[[torch.Tensor, Head], torch.Tensor]):
        return loss(*forward_hidden(self.model, ids, mask))
