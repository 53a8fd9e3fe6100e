"""What fine-tuning did: :class:`FinetuneReport`, the ``finetune`` section of the output's report (and the
part of a checkpoint that a resumed run continues)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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
    teacher_top_k: dict[str, Any] = field(default_factory=dict)  # kd_top_k: k, batches, loaded, bytes
    peak_memory: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None
    gradient_checkpointing: bool = False
    processes: int = 1  # data-parallel processes (accelerate); the batch is split across them
    global_batch: int = 0  # windows per micro-batch, all processes together (--batch-size)
    tokens_per_process: list[int] = field(default_factory=list)  # real tokens each process trained on
    distributed: str = "single"  # accelerate's distributed type (multi_cpu, multi_gpu, fsdp ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
