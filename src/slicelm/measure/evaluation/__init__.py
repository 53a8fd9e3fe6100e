"""Zero-shot evaluation with lm-evaluation-harness, on dense or sliced models, online or offline."""

from slicelm.lazy import lazy_exports
from slicelm.measure.evaluation.tasks import PAPER_METRICS, PAPER_TASKS, offline_task_config, resolve_tasks

# the harness's side (torch, lm-eval) loads on first use: the command line reads the task names without it
_ZEROSHOT = ("evaluate_zeroshot", "make_lm", "run_lm_eval", "summarize", "task_specs")
__getattr__, __dir__ = lazy_exports(
    __name__, globals(), dict.fromkeys(_ZEROSHOT, "slicelm.measure.evaluation.zeroshot")
)

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
