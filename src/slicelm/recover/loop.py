"""The training loop: AdamW and a cosine schedule over the training windows in a fixed order, the KD or LM loss
per micro-batch (split across data-parallel processes), held-out evaluation points, and checkpoints."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from slicelm.core.calibration import pad_batches
from slicelm.core.resources import PeakMemory
from slicelm.errors import SlicelmError
from slicelm.io.streaming_io import map_large_allocations
from slicelm.recover.checkpoints import (
    checkpoint_state,
    load_checkpoint,
    save_checkpoint,
    weights_digest,
    windows_digest,
)
from slicelm.recover.config import FinetuneConfig
from slicelm.recover.losses import (
    BlockTargets,
    Head,
    TopK,
    WithLoss,
    chunked_loss,
    forward_hidden,
    kd_loss,
    kd_top_k_loss,
    lm_loss,
)
from slicelm.recover.parallel import Processes, gather_into, meta_twin
from slicelm.recover.report import FinetuneReport
from slicelm.recover.student import (
    decoder_layers,
    enable_checkpointing,
    merged,
    needs_checkpointing,
    prepare_student,
)
from slicelm.recover.teacher import TeacherTargets, TeacherTopK, teacher_device, teacher_targets
from slicelm.recover.windows import own_batches


class Diverged(SlicelmError):
    """The training loss became non-finite after ``step`` updates (a learning rate too high)."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"the training loss became non-finite at step {step}; lower --lr")


def first_non_finite(model: nn.Module) -> str | None:
    """The name of a parameter or buffer holding NaN or infinity, if any."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def _heldout_losses(hidden, head, *, ids, mask, kd_targets: BlockTargets | None):
    """A held-out batch's mean next-token loss and (against ``kd_targets``) KD loss."""
    lm = lm_loss(hidden, ids, mask, head)
    if kd_targets is None:
        return lm, None
    return lm, chunked_loss(hidden[:, :-1][mask[:, 1:].bool()], head, kd_targets, None)


def _training_loss(
    hidden,
    head: Head,
    *,
    ids,
    mask,
    temperature: float,
    top_k: TopK | None = None,
    teacher: tuple[torch.Tensor, Head] | None = None,
):
    """A training micro-batch's loss: KD against the teacher's cached ``top_k`` or its (hidden states, head),
    else next-token."""
    if top_k is not None:
        return kd_top_k_loss(hidden[:, :-1], top_k, mask[:, 1:], temperature, student_head=head)
    if teacher is not None:
        t_hidden, t_head = teacher
        return kd_loss(
            hidden[:, :-1], t_hidden[:, :-1], mask[:, 1:], temperature, student_head=head, teacher_head=t_head
        )
    return lm_loss(hidden, ids, mask, head)


@torch.no_grad()
def evaluate(
    model,
    windows,
    config: FinetuneConfig,
    pad_id: int,
    device,
    targets: TeacherTargets | None = None,
    processes: Processes | None = None,
    run: nn.Module | None = None,
) -> dict[str, float]:
    """Held-out next-token loss (and KD loss against ``targets``, the teacher's cached
    :func:`teacher_targets`), mean over the windows' real tokens (of all processes together).

    run: a sharded (FSDP) run's wrapped :class:`WithLoss` of ``model``, which every process computes
    through together: each runs as many forwards (one with fewer batches reruns a batch and discards it).
    Otherwise each process scores its own batches on ``model`` alone, with no collective in between."""
    processes = processes or Processes()
    scored = run if run is not None else WithLoss(model)
    was = model.training
    model.eval()
    totals = {"heldout_lm": 0.0, "heldout_kd": 0.0}
    count = 0
    mine = list(own_batches(windows, pad_id, config, processes))
    rounds = max(processes.gather(len(mine))) if run is not None else len(mine)
    for index in range(rounds):
        if index >= len(mine):  # a sharded model computes on every process at once: keep in step
            ids, mask = (t.to(device) for t in next(pad_batches(windows, config.batch_size, pad_id)))
            scored(ids, mask, partial(_heldout_losses, ids=ids, mask=mask, kd_targets=None))
            continue
        ids, mask = (t.to(device) for t in mine[index])
        kd_targets = None
        if targets is not None:
            kd_targets = BlockTargets("kd", targets.hidden[index].to(device), targets.head, config.temperature)
        lm, kd = scored(ids, mask, partial(_heldout_losses, ids=ids, mask=mask, kd_targets=kd_targets))
        n = int(mask[:, 1:].sum())
        totals["heldout_lm"] += lm.item() * n
        if kd is not None:
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
    device: the student's (the process's under accelerate). The teacher runs on ``config.teacher_device``
    (default: the same); its hidden states and head come to the student's device for the loss.
    work_dir: where checkpoints go (none without it). resume: continue from its checkpoint.
    stop_after: end (with a checkpoint) after this many steps of this call, as an interruption would.
    monitor: extra measurements added to each evaluation point (e.g. test perplexity); for curves
    only — nothing is chosen by them. data: the description of the windows, for the report.

    Resuming verifies that the checkpoint was taken with the same settings and from the same
    student, teacher and windows (digests of their weights and tokens).
    """
    if config.loss == "kd" and teacher is None:
        raise SlicelmError("--loss kd needs a teacher model")
    processes = processes or Processes()
    if not (processes.sharded or processes.kind in ("single", "no") or processes.kind.startswith("multi_")):
        raise SlicelmError(
            f"accelerate's {processes.kind} mode is not supported by finetune; launch data-parallel (DDP, "
            "accelerate launch --multi_gpu ...) or sharded (FSDP, accelerate launch --use_fsdp ...)"
        )
    if processes.sharded and monitor is not None:
        raise SlicelmError("a monitor runs the model on one process, which a sharded (FSDP) run cannot; drop it")
    device = processes.device or device
    world, rank = processes.world, processes.rank
    # where the teacher runs; what the loss reads of it (hidden states, head, top k) comes to `device`
    t_device = teacher_device(config.teacher_device, device, world) if teacher is not None else None
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
    if processes.sharded:  # FSDP shards each process's own copy (DDP copies rank 0's): all must hold the same
        differs = float(processes.broadcast(identity["student"]) != identity["student"])
        if processes.sum([differs])[0]:  # every process stops, not only those that differ
            raise SlicelmError("the sharded processes loaded different student weights; launch them on one folder")
    student = prepare_student(model, config)
    if not processes.sharded:  # sharding moves each process's shards to its device (the whole may not fit)
        student = student.to(device)
    student.train()
    checkpointing = config.gradient_checkpointing
    if checkpointing is None:
        checkpointing = needs_checkpointing(model, config)
    if checkpointing:  # memory before speed: also give freed blocks back to the OS (see there; CPU time)
        base = student.get_base_model() if hasattr(student, "get_base_model") else student
        enable_checkpointing(base)
        map_large_allocations()
    # the merged output is gathered into a weightless copy of the student: a sharded one holds a part of each weight
    twin = meta_twin(student) if processes.sharded else None
    # what the training forward goes through: the loss inside the forward, DDP- or FSDP-wrapped under accelerate
    run = processes.prepare(WithLoss(student), decoder_layers(student) if processes.sharded else ())
    if teacher is not None:
        teacher.eval().to(t_device)
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
        start_step = load_checkpoint(work, student, optimizer, scheduler, report, config, identity)
    eval_every = config.eval_every or max(1, total // 10)
    checkpoint_every = config.checkpoint_every or max(1, total // 10)
    memory = PeakMemory()
    t0 = time.perf_counter() - report.seconds
    targets = None
    if teacher is not None and heldout_windows:
        t_start = time.perf_counter()
        with processes.autocast():
            targets = teacher_targets(teacher, heldout_windows, config, pad_id, t_device, processes).to(device)
        report.teacher_seconds += time.perf_counter() - t_start

    def micro_batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's share of micro-batch ``index`` (``step * grad_accum + micro``): ids/mask (b, T)."""
        first = index * config.batch_size + rank * local_batch
        chunk = [train_windows[i] for i in order[first : first + local_batch]]
        ids, mask = next(pad_batches(chunk, len(chunk), pad_id))
        return ids.to(device), mask.to(device)

    cache = None
    if config.kd_top_k is not None:  # the teacher's top k on every training batch, once, before the first step
        cache = TeacherTopK(config.kd_top_k, config.temperature)
        todo = range(start_step * config.grad_accum, total * config.grad_accum)
        if resume and world == 1:
            cache.load(work, identity, first=todo.start)
        t_start = time.perf_counter()
        with processes.autocast():
            for index in todo:
                if index not in cache:
                    cache.add(index, teacher, *(t.to(t_device) for t in micro_batch(index)))
        report.teacher_seconds += time.perf_counter() - t_start
        report.teacher_top_k = {"k": config.kd_top_k, "batches": len(todo), "loaded": cache.loaded}
        report.teacher_top_k["bytes"] = cache.nbytes

    def held_out() -> dict[str, float]:
        if not heldout_windows:
            return {}
        with processes.autocast():
            sharded = run if processes.sharded else None  # DDP's forward is a collective: score on the student
            return evaluate(student, heldout_windows, config, pad_id, device, targets, processes, sharded)

    def measured() -> dict[str, float]:  # the monitor runs on rank 0, whose report is written
        return monitor(student) if monitor is not None and processes.main else {}

    def checkpoint() -> None:
        report.seconds = time.perf_counter() - t0
        # sharded weights and moments are gathered whole by every process; rank 0 writes them
        state = checkpoint_state(student, optimizer) if processes.main or processes.sharded else None
        if processes.main:
            save_checkpoint(work, state, scheduler, report, step, identity)
            if cache is not None and world == 1 and not cache.saved:  # what is left of it, once
                cache.save(work, identity)

    teacher_head = None  # the teacher's head on the student's device: moved once, not every step
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
                index = step * config.grad_accum + micro
                ids, mask = micro_batch(index)
                targets_of = {}  # what the loss compares the student with (next tokens without them)
                if cache is not None:
                    targets_of["top_k"] = cache.take(index).to(device)
                elif config.loss == "kd":
                    t_start = time.perf_counter()
                    with torch.no_grad(), processes.autocast():
                        t_hidden, t_head = forward_hidden(teacher, ids.to(t_device), mask.to(t_device))
                    if teacher_head is None:
                        teacher_head = t_head.to(device)
                    targets_of["teacher"] = (t_hidden.to(device), teacher_head)  # (B, T, H_t)
                    report.teacher_seconds += time.perf_counter() - t_start
                # the logits exist one block at a time, inside the forward
                loss_of = partial(_training_loss, ids=ids, mask=mask, temperature=config.temperature, **targets_of)
                loss = run(ids, mask, loss_of)
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
    if processes.sharded:
        return merged(gather_into(student, twin)), report
    return merged(student.to("cpu")), report
