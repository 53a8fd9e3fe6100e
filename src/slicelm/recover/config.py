"""How to fine-tune: :class:`FinetuneConfig`, the loss, the LoRA or full training, the budget and the schedule,
validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from slicelm.errors import SlicelmError

Loss = Literal["lm", "kd"]
EXTRA_TARGETS = ("shortcuts", "final")  # LoRA targets beyond the blocks' linears (see recover.student.lora_targets)


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune. Validated on construction.

    loss: ``lm`` (next-token cross-entropy) or ``kd`` (distillation from ``teacher``).
    temperature: of the KD softmaxes.
    kd_top_k: distil against the teacher's ``k`` most likely next tokens and one bucket for the rest
        (:func:`slicelm.recover.losses.kd_top_k_loss`) instead of the whole vocabulary: the teacher's top k
        on every training batch is computed once, before the first step, and kept (with the checkpoints,
        for a resumed run). None (the default): the exact KL over the vocabulary. ``kd`` only.
    teacher_device: where the teacher is held and run (``cpu``, ``cuda:1`` ...); its outputs are moved to
        the student's device, where the loss is computed (:func:`slicelm.recover.teacher.teacher_device`).
        None (the default): beside the student. Only ``cpu`` with several processes. ``kd`` only; not a
        setting of the run (a resumed run may place its teacher elsewhere).
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
    kd_top_k: int | None = None
    teacher_device: str | None = None
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
        for flag, value in (("--kd-top-k", self.kd_top_k), ("--teacher-device", self.teacher_device)):
            if value is not None and self.loss != "kd":
                raise SlicelmError(
                    f"{flag} is only used by --loss kd, not --loss {self.loss}; drop it or use --loss kd"
                )
        checks = {
            "--tokens": self.tokens if self.steps is None else 1,
            "--steps": self.steps if self.steps is not None else 1,
            "--seqlen": self.seqlen - 1,
            "--batch-size": self.batch_size,
            "--grad-accum": self.grad_accum,
            "--eval-windows": self.eval_windows + 1,
            "--kd-top-k": self.kd_top_k if self.kd_top_k is not None else 1,
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
