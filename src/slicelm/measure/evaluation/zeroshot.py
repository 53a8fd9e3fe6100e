"""Zero-shot accuracy with lm-evaluation-harness, on an already loaded (dense or sliced) model.

The model is handed to lm-eval as ``HFLM(pretrained=model, tokenizer=tokenizer)`` and scored by
``lm_eval.simple_evaluate``; slicelm only chooses where the task documents come from (local folder
or the hub, see :mod:`slicelm.measure.evaluation.tasks`) and condenses lm-eval's output to the metric the
SliceGPT paper reports for each task.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from slicelm.errors import SlicelmError, first_line
from slicelm.measure.evaluation.tasks import (
    PAPER_METRICS,
    offline_task_config,
    resolve_tasks,
    stock_task_manager,
)

NUM_FEWSHOT = 0  # SliceGPT's zero-shot protocol


def task_specs(tasks: list[str], data_dir: str | Path | None) -> tuple[list[Any], Any]:
    """What to hand ``simple_evaluate``: ``(task specs, task manager)``.

    With a data folder, inline configs that read local files (checked now, so a missing file fails
    before the model runs); without one, lm-eval's stock task names (documents from the hub).
    """
    from lm_eval.tasks import TaskManager  # optional dependency (the eval extra): imported when used

    if data_dir is None:
        return list(tasks), stock_task_manager(tasks)
    specs = [offline_task_config(task, data_dir) for task in tasks]
    # Inline configs need no index; an empty manager avoids indexing all of lm-eval's tasks.
    return specs, TaskManager(include_defaults=False)


def make_lm(model: torch.nn.Module, tokenizer, *, batch_size: int = 1, max_length: int | None = None):
    """Wrap a loaded causal LM for lm-eval (its device is the model's)."""
    from lm_eval.models.huggingface import HFLM  # optional dependency (the eval extra): imported when used

    return HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        backend="causal",  # sliced models have their own config class; never guess seq2seq
        batch_size=batch_size,
        max_length=max_length,
    )


def run_lm_eval(
    lm,
    specs: list[Any],
    task_manager,
    *,
    limit: int | float | None = None,
    bootstrap_iters: int = 100000,
    log_samples: bool = False,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` with slicelm's fixed protocol (zero-shot, no chat template).

    ``log_samples`` keeps every request and its log-likelihoods in ``results["samples"]``.
    """
    # optional dependency (the eval extra): imported when used
    import lm_eval
    import lm_eval.evaluator

    # lm-eval records `git describe` of the working directory; outside a git checkout git prints
    # "fatal: not a git repository" on our stderr. Ask git the same question with its stderr discarded.
    recorded = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = quiet_git_commit_hash
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=specs,
            num_fewshot=NUM_FEWSHOT,
            limit=limit,
            task_manager=task_manager,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
        )
    finally:
        lm_eval.evaluator.get_git_commit_hash = recorded
    if results is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    return results


def quiet_git_commit_hash() -> str | None:
    """The working directory's ``git describe --always`` (what lm-eval records), or None; never prints."""
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def summarize(results: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """lm-eval's results -> ``{"tasks": {task: {metric, <metric>, <metric>_stderr, samples}}, "average"}``.

    Values are lm-eval's own numbers, unrounded; ``average`` is the plain mean over tasks of each
    task's paper metric (as in the SliceGPT tables).
    """
    per_task: dict[str, dict[str, Any]] = {}
    for task in tasks:
        metric = PAPER_METRICS[task]
        row = results["results"][task]
        value = float(row[f"{metric},none"])
        stderr = row.get(f"{metric}_stderr,none")
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        per_task[task] = {
            "metric": metric,
            metric: value,
            f"{metric}_stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "samples": samples,
        }
    values = [row[row["metric"]] for row in per_task.values()]
    return {"tasks": per_task, "average": sum(values) / len(values)}


def evaluate_zeroshot(
    model: torch.nn.Module,
    tokenizer,
    tasks: str | list[str],
    *,
    limit: int | float | None = None,
    batch_size: int = 1,
    data_dir: str | Path | None = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Score ``model`` on ``tasks`` with lm-eval; returns the summary dict ``slicelm eval`` prints.

    ``data_dir`` reads task documents from a local folder (offline); ``None`` lets lm-eval download
    its stock datasets from the Hugging Face hub. ``limit`` is lm-eval's: the first N documents of
    each task (or a fraction if < 1).
    """
    import lm_eval  # optional dependency (the eval extra): imported when used

    names = resolve_tasks(tasks)
    check_limit(limit)
    specs, manager = task_specs(names, data_dir)
    start = time.perf_counter()
    lm = make_lm(model, tokenizer, batch_size=batch_size)
    try:
        results = run_lm_eval(lm, specs, manager, limit=limit)
    except (ConnectionError, OSError) as exc:
        if data_dir is None:
            raise SlicelmError(
                f"could not download the task data from the Hugging Face hub ({first_line(exc)}); "
                "pass --data-dir (or SLICELM_DATA_DIR) pointing to an offline data folder"
            ) from None
        raise
    summary = summarize(results, names)
    name = model_name or getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
    return {
        "model": name,
        "data": str(Path(data_dir).expanduser().resolve()) if data_dir is not None else "huggingface-hub",
        "limit": limit,
        "num_fewshot": NUM_FEWSHOT,
        "batch_size": batch_size,
        **summary,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "seconds": round(time.perf_counter() - start, 1),
    }


def check_limit(limit: int | float | None) -> None:
    """lm-eval reads an int as a count of documents and a float below 1 as a fraction of them."""
    count = isinstance(limit, int) and limit > 0
    if limit is None or count or (isinstance(limit, float) and 0 < limit < 1):
        return
    raise SlicelmError(f"--limit must be a positive whole number or a fraction in (0, 1), got {limit}")
