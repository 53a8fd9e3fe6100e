"""Recovery fine-tuning: win back what slicing lost, by next-token loss or by distillation.

* ``loss="lm"`` is the SliceGPT paper's recovery fine-tuning (RFT): next-token cross-entropy.
* ``loss="kd"`` distils the dense teacher: KL divergence between the teacher's and the student's
  next-token distributions (temperature ``T``, scaled by T^2), as Minitron does after pruning.

Both ignore padding. Training is LoRA through peft on every linear of the decoder blocks (or
``full`` fine-tuning), with AdamW and a cosine schedule; LoRA adapters are merged into the weights
at the end, so the output is the same kind of folder the input was (a sliced folder, a plain
stock folder, or a dense one) and loads without peft or slicelm.

Long runs checkpoint their trainable weights, optimizer, schedule and data position into a work
folder; :func:`finetune` with ``resume=True`` continues to the same result an uninterrupted run
gives (the data order is fixed by the seed, and nothing else is random). An interrupted run keeps
its last checkpoint and writes no output folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from slicelm.errors import SlicelmError, first_line
from slicelm.recover.parallel import Processes

Loss = Literal["lm", "kd"]
CHECKPOINT = "checkpoint"  # folder in the work dir: state.safetensors + state.json
WORK_KIND = "finetune-work"  # manifest kind of a work folder (see slicelm.io.outputs)


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune. Validated on construction.

    loss: ``lm`` (next-token cross-entropy) or ``kd`` (distillation from ``teacher``).
    temperature: of the KD softmaxes.
    lora_rank: LoRA rank on every linear of the decoder blocks; None for full fine-tuning.
    lora_alpha: LoRA scaling numerator (scale = alpha / rank).
    tokens / steps: the training budget; ``tokens`` is converted to whole steps of
        ``batch_size * grad_accum * seqlen`` tokens. ``steps`` wins when both are given.
    seqlen: tokens per training window. batch_size, grad_accum: windows per step = their product.
    lr: peak learning rate (default 2e-4 for LoRA, 2e-5 for full fine-tuning); warmup: fraction of
        the steps spent warming up linearly before the cosine decay.
    eval_windows: held-out windows of the training source (never trained on) scored during training.
    eval_every / checkpoint_every: in steps (defaults: about ten of each per run).
    seed: the training windows' order and the LoRA initialisation (nothing else is random).
    gradient_checkpointing: recompute each block's activations in the backward pass instead of
        keeping them (about a third more compute); None turns it on only when the estimated
        activations of one micro-batch exceed half of the memory available.
    extra_targets: LoRA on more than the blocks' attention and MLP linears: ``shortcuts`` (a sliced
        model's shortcut matrices) and ``final`` (a kept tie's final projection).
    """

    loss: Loss = "kd"
    temperature: float = 1.0
    lora_rank: int | None = 32
    lora_alpha: float = 64.0
    tokens: int | None = 200_000
    steps: int | None = None
    seqlen: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None
    warmup: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_windows: int = 8
    eval_every: int | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    extra_targets: tuple[str, ...] = ()
    gradient_checkpointing: bool | None = None  # None: when the activations would not fit in memory

    def __post_init__(self) -> None:
        bad = [t for t in self.extra_targets if t not in EXTRA_TARGETS]
        if bad:
            raise SlicelmError(f"unknown LoRA targets {bad}; use {', '.join(EXTRA_TARGETS)}")
        if self.loss not in ("lm", "kd"):
            raise SlicelmError(f"--loss must be lm or kd, got {self.loss!r}")
        checks = {
            "--tokens": self.tokens if self.steps is None else 1,
            "--steps": self.steps if self.steps is not None else 1,
            "--seqlen": self.seqlen - 1,
            "--batch-size": self.batch_size,
            "--grad-accum": self.grad_accum,
            "--eval-windows": self.eval_windows + 1,
        }
        for flag, value in checks.items():
            if value is None or value < 1:
                raise SlicelmError(f"{flag} must be a positive integer")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise SlicelmError("--lora-rank must be a positive integer")
        for name in ("temperature", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise SlicelmError(f"--{name.replace('_', '-')} must be positive")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise SlicelmError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise SlicelmError("--warmup is a fraction of the steps in [0, 1)")

    @property
    def full(self) -> bool:
        return self.lora_rank is None

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (2e-5 if self.full else 2e-4)

    @property
    def windows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.tokens / (self.windows_per_step * self.seqlen)))


@dataclass
class FinetuneReport:
    """What fine-tuning did: the ``finetune`` section of the output's report."""

    config: dict[str, Any]
    data: dict[str, Any]
    steps: int
    tokens: int
    trainable_params: int
    curve: list[dict[str, float]] = field(default_factory=list)  # step, train loss, held-out losses
    seconds: float = 0.0
    teacher: str | None = None
    teacher_seconds: float = 0.0  # time spent in the teacher's forward passes
    peak_memory: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None
    gradient_checkpointing: bool = False
    processes: int = 1  # data-parallel processes (accelerate); the batch is split across them
    global_batch: int = 0  # windows per micro-batch, all processes together (--batch-size)
    tokens_per_process: list[int] = field(default_factory=list)  # real tokens each process trained on
    distributed: str = "single"  # accelerate's distributed type (multi_cpu, multi_gpu, fsdp ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Losses, in bounded memory
# --------------------------------------------------------------------------------------------------
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


LOGITS = Head()


class _BlockTargets:
    """What one block of logits is scored against: ``kd`` (the teacher's hidden states and head) or
    ``lm`` (next-token ids). ``score(s, i, j)`` returns the summed loss of rows ``i:j`` of the
    student's raw float32 logits ``s`` and its gradient with respect to them."""

    def __init__(self, kind: str, target: torch.Tensor, head: Head = LOGITS, temperature: float = 1.0):
        self.kind, self.target, self.head, self.temperature = kind, target, head, temperature

    def score(self, s: torch.Tensor, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    def forward(ctx, hidden, weight, bias, targets: _BlockTargets, rows: int):  # hidden (N, H)
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


def _apply_chunked(hidden: torch.Tensor, head: Head, targets: _BlockTargets, rows: int | None) -> torch.Tensor:
    vocab = hidden.shape[-1] if head.weight is None else head.weight.shape[0]
    rows = rows or max(1, LOGIT_BLOCK // vocab)
    return _ChunkedLoss.apply(hidden, head.weight, head.bias, targets, rows)


def lm_loss(
    hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, head: Head = LOGITS, *, rows: int | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy over real tokens. hidden (B, T, H) (logits when ``head`` is
    :data:`LOGITS`), ids/mask (B, T). Computed in blocks of ``rows`` tokens (default: 64 MiB of logits)."""
    keep = mask[:, 1:].bool()
    targets = _BlockTargets("lm", ids[:, 1:][keep])
    return _apply_chunked(hidden[:, :-1][keep], head, targets, rows)


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
    targets = _BlockTargets("kd", teacher[keep].detach(), teacher_head, temperature)
    return _apply_chunked(student[keep], student_head, targets, rows)


# --------------------------------------------------------------------------------------------------
# Model preparation
# --------------------------------------------------------------------------------------------------
EXTRA_TARGETS = ("shortcuts", "final")


def lora_targets(model: nn.Module, extra: Sequence[str] = ()) -> list[str]:
    """Names of the linears LoRA adapts: every linear of the decoder blocks' attention and MLP;
    with ``extra``, also the shortcut matrices (``shortcuts``) and a kept tie's final projection
    (``final``) of a sliced model."""
    from slicelm.core.arch import Layout, resolve

    info = getattr(model.config, "slicelm", None)
    layout = Layout.from_dict(info["layout"]) if isinstance(info, dict) else resolve(model)
    prefix = layout.layers + "."
    names = []
    for name, module in model.named_modules():
        linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
        if not linear:
            continue
        shortcut = name.endswith(("attn_shortcut", "ffn_shortcut"))
        if name.startswith(prefix) and (not shortcut or "shortcuts" in extra):
            names.append(name)
        elif "final" in extra and name == f"{layout.final_norm}.proj":
            names.append(name)
    if "shortcuts" in extra and not any(n.endswith(("attn_shortcut", "ffn_shortcut")) for n in names):
        raise SlicelmError(
            "--lora-extra shortcuts: this model has no shortcut matrices (only slicegpt-layout folders do)"
        )
    if "final" in extra and f"{layout.final_norm}.proj" not in names:
        raise SlicelmError(
            "--lora-extra final: this model has no final projection (only a slicegpt-layout folder that keeps "
            "its tied head has one)"
        )
    return sorted(names)


def prepare_student(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    """Make the trainable parameters trainable: LoRA adapters (peft) or every weight."""
    for param in model.parameters():
        param.requires_grad_(config.full)
    if config.full:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,  # no randomness: resumed runs equal uninterrupted ones
        target_modules=lora_targets(model, config.extra_targets),
        bias="none",
    )
    with torch.random.fork_rng():  # the adapters' initialisation depends on the seed alone
        torch.manual_seed(config.seed)
        return get_peft_model(model, lora)


def output_head(model: nn.Module) -> nn.Linear | None:
    """The model's head when its logits are exactly ``head(final hidden states)``: a plain linear in a
    family slicelm knows (:data:`slicelm.core.arch.REGISTRY`; none of them scales or caps its logits).
    None otherwise: such a model's logits are taken as it computes them."""
    from slicelm.core.arch import REGISTRY

    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    known = getattr(config, "model_type", None) in REGISTRY
    capped = any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return head if known and not capped and type(head) is nn.Linear else None


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def forward_hidden(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, owner: nn.Module | None = None
) -> tuple[torch.Tensor, Head]:
    """The model's final hidden states (B, T, H) and its :class:`Head`, without computing the logits.

    The head's forward is swapped for the identity during the call, so the model returns what its
    head would have read (the (B, T, V) logits are what fills memory at a large vocabulary; the
    losses project block by block). A model without a bypassable head returns its logits and
    :data:`LOGITS`. owner: the model whose head it is when ``model`` wraps it (DDP).
    """
    head = output_head(owner if owner is not None else model)
    if head is None:
        return model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits, LOGITS
    head.forward = _identity
    try:
        hidden = model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits
    finally:
        del head.forward
    return hidden, Head(head.weight, head.bias)


def merged(model: nn.Module) -> nn.Module:
    """The plain model with LoRA adapters merged into its weights (itself for full fine-tuning)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's tensors (names, dtypes, shapes, bytes): what a checkpoint was trained from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        if tensor.numel():
            digest.update(tensor.view(-1).view(torch.uint8).numpy())  # the buffer itself, not a copy
    return digest.hexdigest()


def windows_digest(*groups: Sequence[torch.Tensor]) -> str:
    """SHA-256 of token windows (training, held-out): the data a run reads, whatever flag chose it."""
    digest = hashlib.sha256()
    for group in groups:
        digest.update(f"group:{len(group)};".encode())
        for window in group:
            digest.update(window.to(torch.int64).contiguous().numpy().tobytes() + b";")
    return digest.hexdigest()


def first_non_finite(model: nn.Module) -> str | None:
    """The name of a parameter or buffer holding NaN or infinity, if any."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def _batches(windows: Sequence[torch.Tensor], pad_id: int, size: int):
    from slicelm.core.calibration import pad_batches

    yield from pad_batches(windows, size, pad_id)


@dataclass
class TeacherTargets:
    """The teacher's outputs on the held-out windows: per batch, its final hidden states on the
    real next-token positions, (N, H) on the CPU, and its head (projected block by block when scored)."""

    hidden: list[torch.Tensor]
    head: Head


def _own_batches(windows, pad_id: int, config: FinetuneConfig, processes: Processes):
    """The held-out batches this process scores: every ``world``-th, from its rank on."""
    for index, batch in enumerate(_batches(windows, pad_id, config.batch_size)):
        if index % processes.world == processes.rank:
            yield batch


@torch.no_grad()
def teacher_targets(
    teacher, windows, config: FinetuneConfig, pad_id: int, device, processes: Processes | None = None
) -> TeacherTargets:
    """The teacher's held-out outputs, computed once per run (the teacher never changes), on this
    process's share of the held-out batches.

    Its final hidden states are kept rather than its logits: H numbers per token instead of V (576
    against 49,152 on SmolLM2), exact, and the KD loss projects them block by block.
    """
    out, head = [], LOGITS
    for ids, mask in _own_batches(windows, pad_id, config, processes or Processes()):
        ids, mask = ids.to(device), mask.to(device)
        hidden, head = forward_hidden(teacher, ids, mask)
        out.append(hidden[:, :-1][mask[:, 1:].bool()].cpu())
    return TeacherTargets(out, head)


@torch.no_grad()
def evaluate(
    model,
    windows,
    config: FinetuneConfig,
    pad_id: int,
    device,
    targets: TeacherTargets | None = None,
    processes: Processes | None = None,
) -> dict[str, float]:
    """Held-out next-token loss (and KD loss against ``targets``, the teacher's cached
    :func:`teacher_targets`), mean over the windows' real tokens (of all processes together)."""
    processes = processes or Processes()
    was = model.training
    model.eval()
    totals = {"heldout_lm": 0.0, "heldout_kd": 0.0}
    count = 0
    for index, (ids, mask) in enumerate(_own_batches(windows, pad_id, config, processes)):
        ids, mask = ids.to(device), mask.to(device)
        hidden, head = forward_hidden(model, ids, mask)
        n = int(mask[:, 1:].sum())
        totals["heldout_lm"] += lm_loss(hidden, ids, mask, head).item() * n
        if targets is not None:
            keep = mask[:, 1:].bool()
            kd_targets = _BlockTargets("kd", targets.hidden[index].to(device), targets.head, config.temperature)
            kd = _apply_chunked(hidden[:, :-1][keep], head, kd_targets, None)
            totals["heldout_kd"] += kd.item() * n
        count += n
    model.train(was)
    totals["heldout_lm"], totals["heldout_kd"], count = processes.sum([*totals.values(), count])
    out = {"heldout_lm": totals["heldout_lm"] / max(count, 1)}
    if targets is not None:
        out["heldout_kd"] = totals["heldout_kd"] / max(count, 1)
    return out


def train(
    model: nn.Module,
    train_windows: Sequence[torch.Tensor],
    heldout_windows: Sequence[torch.Tensor],
    config: FinetuneConfig,
    *,
    teacher: nn.Module | None = None,
    pad_id: int = 0,
    work_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: torch.device | str = "cpu",
    stop_after: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    monitor: Callable[[nn.Module], dict[str, float]] | None = None,
    data: dict[str, Any] | None = None,
    processes: Processes | None = None,
) -> tuple[nn.Module, FinetuneReport]:
    """Fine-tune ``model`` (in place) and return ``(merged model, report)``.

    processes: data-parallel processes (:class:`slicelm.recover.parallel.Accelerated`, under accelerate's
    launcher); ``config.batch_size`` is the global micro-batch, split evenly across them, and each
    process's loss is weighted by its share of the batch's real tokens, so N processes train the
    same run as one (up to the order of float sums). Only rank 0 writes checkpoints.
    work_dir: where checkpoints go (none without it). resume: continue from its checkpoint.
    stop_after: end (with a checkpoint) after this many steps of this call, as an interruption would.
    monitor: extra measurements added to each evaluation point (e.g. test perplexity); for curves
    only — nothing is chosen by them. data: the description of the windows, for the report.

    Resuming verifies that the checkpoint was taken with the same settings and from the same
    student, teacher and windows (digests of their weights and tokens).
    """
    from transformers import get_cosine_schedule_with_warmup

    from slicelm.core.resources import PeakMemory
    from slicelm.io.streaming_io import map_large_allocations

    if config.loss == "kd" and teacher is None:
        raise SlicelmError("--loss kd needs a teacher model")
    processes = processes or Processes()
    if not (processes.kind in ("single", "no") or processes.kind.startswith("multi_")):
        raise SlicelmError(
            f"accelerate's {processes.kind} mode is not supported by finetune yet (the blocked losses read the "
            "head's weight outside the model's forward, which sharding splits); launch data-parallel (DDP): "
            "accelerate launch --multi_gpu ..."
        )
    device = processes.device or device
    world, rank = processes.world, processes.rank
    if config.batch_size % world:
        raise SlicelmError(
            f"--batch-size {config.batch_size} is the global batch; it must split evenly across {world} processes"
        )
    local_batch = config.batch_size // world
    total = config.total_steps()
    per_step = config.windows_per_step
    if total * per_step > len(train_windows):
        raise SlicelmError(
            f"{total} steps of {per_step} windows need {total * per_step} training windows, "
            f"the data gives {len(train_windows)}; lower --tokens/--steps or give more data"
        )
    for role, module in (("model", model), ("teacher", teacher)):
        bad = first_non_finite(module) if module is not None else None
        if bad is not None:
            raise SlicelmError(
                f"the {role}'s weights hold NaN or infinity ({bad}): the folder is damaged, not the settings; "
                "re-create or re-download it"
            )
    identity = {  # what a checkpoint continues: resuming verifies all three
        "student": weights_digest(model),
        "teacher": weights_digest(teacher) if teacher is not None else None,
        "data": windows_digest(train_windows, heldout_windows),
    }
    student = prepare_student(model, config).to(device)
    student.train()
    checkpointing = config.gradient_checkpointing
    if checkpointing is None:
        checkpointing = needs_checkpointing(model, config)
    if checkpointing:  # memory before speed: also give freed blocks back to the OS (see there; CPU time)
        base = student.get_base_model() if hasattr(student, "get_base_model") else student
        enable_checkpointing(base)
        map_large_allocations()
    run = processes.prepare(student)  # what the training forward goes through (DDP under accelerate)
    if teacher is not None:
        teacher.eval().to(device)
        for param in teacher.parameters():
            param.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.peak_lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup * total), total)
    order = torch.randperm(len(train_windows), generator=torch.Generator().manual_seed(config.seed)).tolist()
    work = Path(work_dir) if work_dir is not None else None
    report = FinetuneReport(
        config=asdict(config) | {"peak_lr": config.peak_lr},
        data=dict(data or {}),
        steps=total,
        tokens=0,
        trainable_params=sum(p.numel() for p in params),
        gradient_checkpointing=bool(checkpointing),
        processes=world,
        global_batch=config.batch_size,
        tokens_per_process=[0] * world,
        distributed=processes.kind,
    )
    start_step = 0
    if resume:
        start_step = _load_checkpoint(work, student, optimizer, scheduler, report, config, identity)
    eval_every = config.eval_every or max(1, total // 10)
    checkpoint_every = config.checkpoint_every or max(1, total // 10)
    memory = PeakMemory()
    t0 = time.perf_counter() - report.seconds
    targets = None
    if teacher is not None and heldout_windows:
        t_start = time.perf_counter()
        with processes.autocast():
            targets = teacher_targets(teacher, heldout_windows, config, pad_id, device, processes)
        report.teacher_seconds += time.perf_counter() - t_start

    def held_out() -> dict[str, float]:
        if not heldout_windows:
            return {}
        with processes.autocast():
            return evaluate(student, heldout_windows, config, pad_id, device, targets, processes)

    def measured() -> dict[str, float]:  # the monitor runs on rank 0, whose report is written
        return monitor(student) if monitor is not None and processes.main else {}

    def checkpoint() -> None:
        report.seconds = time.perf_counter() - t0
        if processes.main:
            _save_checkpoint(work, student, optimizer, scheduler, report, step, identity)

    step = start_step
    bar = tqdm(total=total, initial=start_step, desc=f"finetune ({config.loss})", disable=not progress)
    try:
        if start_step == 0 and heldout_windows:
            point = {"step": 0, "tokens": 0, **held_out()}
            report.curve.append(point | measured())
        while step < total:
            if stop_after is not None and step - start_step >= stop_after:
                raise KeyboardInterrupt
            loss_value = 0.0
            for micro in range(config.grad_accum):
                first = (step * config.grad_accum + micro) * config.batch_size + rank * local_batch
                chunk = [train_windows[i] for i in order[first : first + local_batch]]
                ids, mask = next(_batches(chunk, pad_id, len(chunk)))
                ids, mask = ids.to(device), mask.to(device)
                hidden, head = forward_hidden(run, ids, mask, student)  # the logits exist one block at a time
                if config.loss == "kd":
                    t_start = time.perf_counter()
                    with torch.no_grad(), processes.autocast():
                        t_hidden, t_head = forward_hidden(teacher, ids, mask)
                    report.teacher_seconds += time.perf_counter() - t_start
                    loss = kd_loss(
                        hidden[:, :-1],
                        t_hidden[:, :-1],
                        mask[:, 1:],
                        config.temperature,
                        student_head=head,
                        teacher_head=t_head,
                    )
                else:
                    loss = lm_loss(hidden, ids, mask, head)
                value, tokens = loss.item(), int(mask.sum())
                if world > 1:  # the batch's mean over all processes' tokens; DDP averages the gradients
                    n = int(mask[:, 1:].sum())
                    mine = [0.0] * world
                    mine[rank] = tokens
                    loss_sum, count, *tokens_each = processes.sum([value * n, n, *mine])
                    value = loss_sum / count
                    loss = loss * (n * world / count)
                if not math.isfinite(value):
                    if step == 0:  # no update yet: not the learning rate
                        raise SlicelmError("the training loss is non-finite before any update: check the data")
                    raise Diverged(step)
                with processes.sync(run, last=micro == config.grad_accum - 1):
                    (loss / config.grad_accum).backward()
                loss_value += value / config.grad_accum
                if world > 1:
                    report.tokens += int(sum(tokens_each))
                    seen = zip(report.tokens_per_process, tokens_each, strict=True)
                    report.tokens_per_process = [a + int(b) for a, b in seen]
                else:
                    report.tokens += tokens
                    report.tokens_per_process = [report.tokens]
            if config.max_grad_norm:
                processes.clip(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            memory.sample()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if on_step is not None:
                on_step(step, loss_value)
            if step % eval_every == 0 or step == total:
                point = {"step": step, "tokens": report.tokens, "train_loss": loss_value}
                point |= held_out()
                report.curve.append(point | measured())
            if work is not None and (step % checkpoint_every == 0) and step < total:
                checkpoint()
    except KeyboardInterrupt:
        if work is not None:
            checkpoint()
        raise
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    report.peak_memory = memory.as_dict()
    return merged(student.to("cpu")), report


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (newer transformers name the method activation_*)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def needs_checkpointing(model: nn.Module, config: FinetuneConfig) -> bool:
    """Whether one micro-batch's activations (a rough upper estimate) exceed half the free memory."""
    from slicelm.core.resources import available_memory_bytes

    available = available_memory_bytes()
    if available is None:
        return False
    c = model.config
    intermediate = getattr(c, "intermediate_size", None) or 4 * c.hidden_size
    per_token = c.num_hidden_layers * (16 * c.hidden_size + 4 * intermediate) * 4
    losses = 8 * LOGIT_BLOCK * 4  # the losses' blocks of logits (teacher and student), whatever the batch
    return config.batch_size * config.seqlen * per_token + losses > available / 2


def _save_checkpoint(work: Path, student, optimizer, scheduler, report: FinetuneReport, step: int, identity) -> None:
    """Atomically replace the work folder's checkpoint: trainable weights and optimizer moments as
    safetensors, step, schedule and report as JSON (nothing pickled)."""
    from safetensors.torch import save_file

    from slicelm.io.outputs import to_json, write_manifest

    created = not work.exists()
    if created:
        work.mkdir(parents=True)
        write_manifest(work, WORK_KIND)
    tensors = {f"param.{n}": t.contiguous() for n, t in trainable_state(student).items()}
    optim = optimizer.state_dict()
    for index, entry in optim["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().clone().contiguous()
    meta = {
        "step": step,
        "processes": report.processes,  # a checkpoint resumes with as many processes as took it
        "identity": identity,
        "param_groups": optim["param_groups"],
        "scheduler": scheduler.state_dict(),
        "report": report.to_dict(),
    }
    tmp = work / f".{CHECKPOINT}.tmp{os.getpid()}"
    try:
        tmp.mkdir(exist_ok=True)
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(to_json(meta) + "\n")
    except BaseException:  # a full disk: the last good checkpoint stays; a work folder without one goes
        shutil.rmtree(work if created else tmp, ignore_errors=True)
        raise
    old = work / f".{CHECKPOINT}.old{os.getpid()}"
    if (work / CHECKPOINT).exists():
        (work / CHECKPOINT).rename(old)
    tmp.rename(work / CHECKPOINT)
    if old.exists():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


class Diverged(SlicelmError):
    """The training loss became non-finite after ``step`` updates (a learning rate too high)."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"the training loss became non-finite at step {step}; lower --lr")


def check_processes(recorded: Any, processes: int) -> None:
    """A checkpoint resumes with the number of processes that took it (their data shares and the
    order of their float sums are part of the run)."""
    if recorded != processes:
        raise SlicelmError(
            f"--resume: the checkpoint was taken with {recorded} process(es), this run has {processes}; resume "
            f"with --num-processes {recorded} (or accelerate launch --num_processes {recorded}), or --restart"
        )


class DamagedCheckpoint(SlicelmError):
    """A work folder's checkpoint that cannot be read or does not fit this run."""


IDENTITY_CHANGES = {
    "student": "another student (the model's weights differ from the ones it was trained from)",
    "teacher": "another teacher (the teacher's weights differ: a changed folder or another --teacher)",
    "data": "other training data (--data, --data-dir, --seqlen or the source's text differ)",
}


def _load_checkpoint(
    work: Path | None, student, optimizer, scheduler, report: FinetuneReport, config, identity: dict
) -> int:
    """Restore a checkpoint into this run's student, optimizer, schedule and report; the step reached.

    Refused (:class:`SlicelmError`) when it was taken with other settings, another student, teacher or
    data; :class:`DamagedCheckpoint` when it cannot be read or does not fit the run.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = work / CHECKPOINT if work is not None else None
    if folder is None or not work.is_dir():
        raise SlicelmError(f"--resume: no checkpoint in {work}; run without --resume to start")

    def damaged(why: str) -> DamagedCheckpoint:
        return DamagedCheckpoint(f"--resume: the checkpoint in {folder} is damaged ({why}); start again with --restart")

    if not (folder / "state.json").is_file():  # the work folder exists, so a checkpoint was written
        raise damaged("state.json is missing")

    try:
        meta = json.loads((folder / "state.json").read_text())
        saved = meta["report"]["config"]
        step = meta["step"]
        recorded = meta.get("identity")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise damaged(f"state.json: {type(exc).__name__}") from None
    total = config.total_steps()
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= total:
        raise damaged(f"step {step!r} outside this run's 0..{total}")
    scheduled = meta.get("scheduler", {}).get("last_epoch") if isinstance(meta.get("scheduler"), dict) else None
    if scheduled != step:  # the schedule advances once per step: a step edited by hand disagrees with it
        raise damaged(f"step {step} but its learning-rate schedule is at step {scheduled!r}")
    check_processes(meta.get("processes", 1), report.processes)
    wanted = json.loads(json.dumps(asdict(config) | {"peak_lr": config.peak_lr}))
    if saved != wanted:
        changed = sorted(k for k in wanted if not isinstance(saved, dict) or saved.get(k) != wanted[k])
        raise SlicelmError(
            f"--resume with other settings than the checkpoint ({', '.join(changed)}); use the same flags, "
            "or --restart to discard the checkpoint and start over"
        )
    if not isinstance(recorded, dict):
        raise damaged("it records no digest of the student, teacher and data")
    for key, what in IDENTITY_CHANGES.items():
        if recorded.get(key) != identity[key]:
            raise SlicelmError(f"--resume: the checkpoint was taken with {what}; resume the same run, or --restart")
    try:
        tensors = load_file(folder / "state.safetensors")
    except (OSError, SafetensorError) as exc:
        raise damaged(f"state.safetensors: {first_line(exc)}") from None
    names = {n: p for n, p in student.named_parameters() if p.requires_grad}
    params = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("param.")}
    if set(params) != set(names):
        raise damaged(f"{len(set(names) ^ set(params))} trainable weights missing or unexpected")
    wrong = next((n for n, v in params.items() if v.shape != names[n].shape), None)
    if wrong is not None:
        raise damaged(f"{wrong} is {tuple(params[wrong].shape)}, the model's is {tuple(names[wrong].shape)}")
    state: dict[int, dict[str, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for name, value in params.items():
                names[name].copy_(value)
            for key, value in tensors.items():
                kind, rest = key.split(".", 1)
                if kind == "optim":
                    index, name = rest.split(".", 1)
                    state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        scheduler.load_state_dict(meta["scheduler"])
        for key in ("curve", "tokens", "teacher_seconds", "seconds", "data"):
            setattr(report, key, meta["report"][key])
        report.tokens_per_process = meta["report"].get("tokens_per_process") or [report.tokens]
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise damaged(f"{type(exc).__name__}: {first_line(exc)}") from None
    report.resumed_from = step
    return step


def finetune(
    model: nn.Module,
    tokenizer,
    data: str = "c4",
    config: FinetuneConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    data_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: torch.device | str = "cpu",
    windows: tuple[list[torch.Tensor], list[torch.Tensor], dict[str, Any]] | None = None,
    monitor: Callable[[nn.Module], dict[str, float]] | None = None,
    processes: Processes | None = None,
) -> tuple[nn.Module, FinetuneReport]:
    """Fine-tune ``model`` on ``data`` (c4, alpaca, ptb or a file) and return ``(merged model, report)``.

    The public front door: ``slicelm.finetune(model, tokenizer, "c4", FinetuneConfig(loss="kd"),
    teacher=dense)``. Save the result with :func:`slicelm.save_sliced` (sliced models) or
    ``save_pretrained`` (plain and dense ones).

    windows: :func:`training_windows`' result when already made (the command reads the data before
    it loads the models, so that bad data is refused first). monitor, processes: see :func:`train`.
    """
    config = config or FinetuneConfig()
    train_windows, heldout, description = windows or training_windows(data, tokenizer, config, data_dir)
    model, report = train(
        model,
        train_windows,
        heldout,
        config,
        teacher=teacher,
        pad_id=int(tokenizer.pad_token_id or 0),
        work_dir=work_dir,
        resume=resume,
        progress=progress,
        device=device,
        monitor=monitor,
        data=description,
        processes=processes,
    )
    report.data = description
    return model, report


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def training_windows(
    source: str,
    tokenizer,
    config: FinetuneConfig,
    data_dir: str | Path | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, Any]]:
    """(training windows, held-out windows, description). Disjoint windows of one source.

    The WikiText-2 test text is refused, by name and by content (a file that contains it).
    """
    from slicelm.io.data import describe_calibration_source, load_calibration

    check_not_test_text(source, data_dir)
    train_count = config.total_steps() * config.windows_per_step
    try:
        windows = load_calibration(
            source,
            tokenizer,
            n_samples=train_count + config.eval_windows,
            seqlen=config.seqlen,
            seed=config.seed,
            data_dir=data_dir,
            packed=True,
        )
    except SlicelmError as exc:  # slicelm.io.data speaks of calibration; here the text is training data
        raise SlicelmError(_as_training(str(exc))) from None
    heldout, train_windows = windows[: config.eval_windows], windows[config.eval_windows :]
    data = {
        "source": source,
        "text": describe_calibration_source(source, data_dir),
        "train_windows": len(train_windows),
        "heldout_windows": len(heldout),
        "seqlen": config.seqlen,
        "seed": config.seed,
    }
    return train_windows, heldout, data


def _as_training(message: str) -> str:
    """A data-loading message in the words of training rather than calibration."""
    for old, new in (("calibration", "training"), ("calibrate on", "train on"), ("calibrating", "training")):
        message = message.replace(old, new)
    return message


def check_not_test_text(source: str, data_dir: str | Path | None) -> None:
    """Refuse training on WikiText-2 test text (the evaluation text): named, or inside a file."""
    if source.lower() in ("wikitext2-test", "wikitext2_test", "wiki.test.raw"):
        raise SlicelmError("the WikiText-2 test split is the evaluation text; train on c4, alpaca, ptb or a file")
    path = Path(source).expanduser()
    if not path.is_file():
        return
    from slicelm.io.data import eval_text, resolve_data_dir

    root = resolve_data_dir(data_dir)
    if root is None:
        return  # no local copy of the test text to compare with
    try:
        test = eval_text("wikitext2", root)
    except SlicelmError:
        return
    with contextlib.suppress(UnicodeDecodeError):
        text = path.read_text(encoding="utf-8")
        if _overlaps(text, test):
            raise SlicelmError(
                f"{path} contains WikiText-2 test text, the evaluation text; train on c4, alpaca, ptb or other text"
            )


def _overlaps(text: str, reference: str, probes: int = 32, width: int = 80) -> bool:
    """Whether most of ``probes`` evenly spaced ``width``-character pieces of ``text`` occur in ``reference``."""
    pieces = [text[i : i + width] for i in range(0, max(len(text) - width, 1), max(len(text) // probes, 1))]
    pieces = [p for p in pieces if len(p.strip()) >= width // 2]
    if not pieces:
        return False
    return sum(p in reference for p in pieces) >= max(3, len(pieces) // 4)


def recorded_source(folder: str | Path) -> str | None:
    """The dense model a slicelm output was made from (its config section or report), if recorded."""
    folder = Path(folder)
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((folder / "config.json").read_text())
        section = config.get("slicelm")
        if isinstance(section, dict) and section.get("source_model"):
            return section["source_model"]
    with contextlib.suppress(OSError, ValueError):
        report = json.loads((folder / "slicelm_report.json").read_text())
        for key in ("source_model", "model"):
            value = (report.get("provenance") or {}).get(key) or report.get(key)
            if value:
                return value
    return None
