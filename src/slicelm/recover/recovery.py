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

This module is the front door, :func:`finetune`. The parts, one idea a module:
:mod:`~slicelm.recover.config` (how), :mod:`~slicelm.recover.windows` (the data),
:mod:`~slicelm.recover.student` (what trains), :mod:`~slicelm.recover.teacher`, :mod:`~slicelm.recover.losses`
(in bounded memory), :mod:`~slicelm.recover.loop`, :mod:`~slicelm.recover.checkpoints` (``--resume``) and
:mod:`~slicelm.recover.report`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slicelm.recover.config import FinetuneConfig
from slicelm.recover.loop import train
from slicelm.recover.parallel import Processes
from slicelm.recover.report import FinetuneReport
from slicelm.recover.windows import training_windows


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
