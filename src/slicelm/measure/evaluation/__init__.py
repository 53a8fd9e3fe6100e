"""Zero-shot evaluation with lm-evaluation-harness, on dense or sliced models, online or offline."""

from slicelm.measure.evaluation.tasks import PAPER_METRICS, PAPER_TASKS, offline_task_config, resolve_tasks
from slicelm.measure.evaluation.zeroshot import evaluate_zeroshot, make_lm, run_lm_eval, summarize, task_specs

__all__ = [
    "PAPER_METRICS",
    "PAPER_TASKS",
    "evaluate_zeroshot",
    "make_lm",
    "offline_task_config",
    "resolve_tasks",
    "run_lm_eval",
    "summarize",
    "task_specs",
]
