"""Zero-shot task definitions: lm-eval's stock tasks, optionally fed from a local data folder.

The prompts, choices, targets and metrics always come from lm-eval's own task YAMLs, so a local
run scores exactly what the stock task scores. Offline, only *where the documents come from*
changes: each task's config gets a ``custom_dataset`` callable that reads the local files and
returns the documents **in the hub dataset's schema**, for the one split lm-eval evaluates. Where the
local file is stored in another format (ARC/OpenBookQA as OLMES docs, PIQA as jsonl + label list,
BoolQ as HF ``boolq`` rather than ``super_glue/boolq``, LAMBADA split into context/continuation),
the loader converts it back; the conversion is lossless for everything the task's templates read.

Layout of a data folder (see the project's data ``SOURCES.md``)::

    piqa/valid.jsonl, piqa/valid-labels.lst            PIQA validation (jsonl + one label a line)
    winogrande/winogrande_xl/validation/               HF save_to_disk folder
    hellaswag/validation/                              HF save_to_disk folder
    arc_easy/test_docs.jsonl                           {id, question, choices[], gold}
    arc_challenge/test_docs.jsonl                      {id, question, choices[], gold}
    openbookqa/test_docs.jsonl                         {id, question, choices[], gold}
    boolq/validation/                                  HF save_to_disk folder (HF ``boolq``)
    lambada/lambada_openai.jsonl                       {context, continuation}
"""

from __future__ import annotations

import functools
import json
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slicelm.errors import SlicelmError

# The seven zero-shot tasks of the SliceGPT paper's tables, in the paper's order.
PAPER_TASKS: tuple[str, ...] = (
    "piqa",
    "winogrande",
    "hellaswag",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
    "boolq",
)

# The metric SliceGPT reports for each task (lm-eval's metric names). Length-normalised accuracy
# where answers differ in length, plain accuracy where they are comparable or a single token.
PAPER_METRICS: dict[str, str] = {
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "winogrande": "acc",
    "openbookqa": "acc",
    "boolq": "acc",
    "lambada_openai": "acc",
}

# Names users may type for a task -> lm-eval's task name. lm-eval's own "lambada" is a *group*
# (OpenAI + standard variants); SliceGPT means the OpenAI one.
TASK_ALIASES: dict[str, str] = {"lambada": "lambada_openai"}

# Stock YAML of each task, relative to lm_eval/tasks/ (indexing every lm-eval task takes seconds).
STOCK_YAMLS: dict[str, str] = {
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
}

SPLIT_KEYS = ("training_split", "validation_split", "test_split")


def resolve_tasks(names: str | list[str] | tuple[str, ...]) -> list[str]:
    """Comma-separated or listed task names -> lm-eval task names, validated, duplicates dropped."""
    if isinstance(names, str):
        names = names.split(",")
    tasks: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        name = TASK_ALIASES.get(name, name)
        if name not in PAPER_METRICS:
            known = ", ".join([*PAPER_TASKS, "lambada"])
            raise SlicelmError(f"unknown task {raw.strip()!r}; choose from {known}")
        if name not in tasks:
            tasks.append(name)
    if not tasks:
        raise SlicelmError(f"no task given; use e.g. --tasks {','.join(PAPER_TASKS)}")
    return tasks


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks  # optional dependency (the eval extra): imported when used

    return Path(lm_eval.tasks.__file__).parent


def stock_task_config(task: str) -> dict[str, Any]:
    """lm-eval's own config dict for ``task`` (includes and ``!function`` entries resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml  # optional dependency (the eval extra): imported when used

    path = lm_eval_tasks_dir() / STOCK_YAMLS[task]
    if not path.is_file():  # lm-eval moved its files: fall back to its (slow) full index
        from lm_eval.tasks import TaskManager  # optional dependency (the eval extra): imported when used

        entry = TaskManager().task_index.get(task)
        if entry is None or entry.yaml_path is None:
            raise SlicelmError(f"the installed lm-eval has no task {task!r}; pip install 'lm-eval>=0.4.5'")
        path = Path(entry.yaml_path)
    config = dict(load_yaml(path, resolve_func=True))
    if config.get("task") != task:
        raise SlicelmError(f"{path} defines task {config.get('task')!r}, not {task!r}; reinstall lm-eval")
    return config


def stock_task_manager(tasks: list[str]):
    """A TaskManager that indexes only the folders holding ``tasks`` (fast), for hub runs."""
    from lm_eval.tasks import TaskManager  # optional dependency (the eval extra): imported when used

    root = lm_eval_tasks_dir()
    folders = sorted({str((root / STOCK_YAMLS[t]).parent) for t in tasks})
    if not all(Path(f).is_dir() for f in folders):
        return TaskManager()
    return TaskManager(include_defaults=False, include_path=folders)


# ---------------------------------------------------------------------------------------------
# Local files -> documents in the hub schema


@dataclass(frozen=True)
class LocalSource:
    """Where one task's documents live inside a data folder, and how to read them."""

    task: str
    split: str  # the split lm-eval evaluates; the only one the local data provides
    files: tuple[str, ...]  # required paths, relative to the data folder
    read: Callable[[Path], list[dict[str, Any]] | Any]  # data folder -> rows or a datasets.Dataset
    what: str  # human description of the expected files, for error messages


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _load_saved(path: Path):
    import datasets  # heavy (~0.8 s): imported when task documents are read

    # In memory, so that lm-eval's ``.map`` (hellaswag's process_docs) never writes cache files
    # into the (possibly shared or read-only) data folder.
    return datasets.load_from_disk(str(path), keep_in_memory=True)


def _read_piqa(root: Path) -> list[dict[str, Any]]:
    """``{goal, sol1, sol2}`` lines + one label a line -> hub ``baber/piqa`` rows with ``label``."""
    docs = _read_jsonl(root / "piqa/valid.jsonl")
    labels = [int(line) for line in (root / "piqa/valid-labels.lst").read_text().split()]
    if len(labels) != len(docs):
        raise SlicelmError(
            f"{root / 'piqa'}: valid.jsonl has {len(docs)} items but valid-labels.lst has {len(labels)}; "
            "re-copy both files"
        )
    return [
        {"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y} for d, y in zip(docs, labels, strict=True)
    ]


def _read_mc_docs(root: Path, file: str, question_key: str) -> list[dict[str, Any]]:
    """OLMES-style ``{id, question, choices[], gold}`` -> hub ``ai2_arc``/``openbookqa`` rows.

    The hub rows carry choice labels and a letter answer key; lm-eval only uses them through
    ``choices.label.index(answerKey)``, i.e. the gold position, so letters A, B, ... in order
    reproduce every prompt, choice and target exactly.
    """
    rows = []
    for doc in _read_jsonl(root / file):
        labels = list(string.ascii_uppercase[: len(doc["choices"])])
        rows.append(
            {
                "id": str(doc["id"]),
                question_key: doc["question"],
                "choices": {"text": list(doc["choices"]), "label": labels},
                "answerKey": labels[int(doc["gold"])],
            }
        )
    return rows


def _read_boolq(root: Path):
    """HF ``boolq`` (question, answer: bool, passage) -> ``super_glue/boolq`` (idx, label: 0/1)."""
    saved = _load_saved(root / "boolq/validation")
    return [
        {"question": row["question"], "passage": row["passage"], "idx": i, "label": int(row["answer"])}
        for i, row in enumerate(saved)
    ]


def _read_lambada(root: Path) -> list[dict[str, Any]]:
    """``{context, continuation}`` (split at the last space) -> hub ``lambada_openai`` ``{text}``."""
    docs = _read_jsonl(root / "lambada/lambada_openai.jsonl")
    return [{"text": d["context"] + " " + d["continuation"]} for d in docs]


LOCAL_SOURCES: dict[str, LocalSource] = {
    src.task: src
    for src in (
        LocalSource(
            "piqa",
            "validation",
            ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
            _read_piqa,
            "piqa/valid.jsonl and piqa/valid-labels.lst (original PIQA dev files)",
        ),
        LocalSource(
            "winogrande",
            "validation",
            ("winogrande/winogrande_xl/validation/dataset_info.json",),
            lambda root: _load_saved(root / "winogrande/winogrande_xl/validation"),
            "winogrande/winogrande_xl/validation/ (datasets save_to_disk of winogrande_xl validation)",
        ),
        LocalSource(
            "hellaswag",
            "validation",
            ("hellaswag/validation/dataset_info.json",),
            lambda root: _load_saved(root / "hellaswag/validation"),
            "hellaswag/validation/ (datasets save_to_disk of hellaswag validation)",
        ),
        LocalSource(
            "arc_easy",
            "test",
            ("arc_easy/test_docs.jsonl",),
            lambda root: _read_mc_docs(root, "arc_easy/test_docs.jsonl", "question"),
            "arc_easy/test_docs.jsonl (one {id, question, choices, gold} a line, ARC-Easy test)",
        ),
        LocalSource(
            "arc_challenge",
            "test",
            ("arc_challenge/test_docs.jsonl",),
            lambda root: _read_mc_docs(root, "arc_challenge/test_docs.jsonl", "question"),
            "arc_challenge/test_docs.jsonl (one {id, question, choices, gold} a line, ARC-Challenge test)",
        ),
        LocalSource(
            "openbookqa",
            "test",
            ("openbookqa/test_docs.jsonl",),
            lambda root: _read_mc_docs(root, "openbookqa/test_docs.jsonl", "question_stem"),
            "openbookqa/test_docs.jsonl (one {id, question, choices, gold} a line, OpenBookQA test)",
        ),
        LocalSource(
            "boolq",
            "validation",
            ("boolq/validation/dataset_info.json",),
            _read_boolq,
            "boolq/validation/ (datasets save_to_disk of HF boolq validation)",
        ),
        LocalSource(
            "lambada_openai",
            "test",
            ("lambada/lambada_openai.jsonl",),
            _read_lambada,
            "lambada/lambada_openai.jsonl (one {context, continuation} a line, OpenAI LAMBADA test)",
        ),
    )
}


def check_local_data(task: str, data_dir: str | Path) -> LocalSource:
    """The task's local source, after checking its files exist (one-line error naming them)."""
    source = LOCAL_SOURCES[task]
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise SlicelmError(
            f"data directory {root} does not exist; pass --data-dir (or SLICELM_DATA_DIR) pointing to the "
            "offline data folder, or leave both unset to download the tasks from the Hugging Face hub"
        )
    missing = [f for f in source.files if not (root / f).is_file()]
    if missing:
        raise SlicelmError(
            f"no local data for task {task} in {root}: expected {source.what}; missing {missing[0]} "
            "(or leave --data-dir/SLICELM_DATA_DIR unset to download it from the Hugging Face hub)"
        )
    return source


def load_local_dataset(task: str, data_dir: str, /, **_metadata: Any):
    """``custom_dataset`` for lm-eval: a DatasetDict holding the evaluated split in hub schema.

    lm-eval calls it with the task's metadata as keyword arguments; they are not needed here
    (``task``/``data_dir`` are positional-only so that metadata keys can never collide with them).
    """
    import datasets  # heavy (~0.8 s): imported when task documents are read

    source = check_local_data(task, data_dir)
    docs = source.read(Path(data_dir).expanduser())
    if not isinstance(docs, datasets.Dataset):
        docs = datasets.Dataset.from_list(docs)
    if len(docs) == 0:
        raise SlicelmError(f"local data for task {task} in {data_dir} is empty: expected {source.what}")
    return datasets.DatasetDict({source.split: docs})


def offline_task_config(task: str, data_dir: str | Path) -> dict[str, Any]:
    """lm-eval's stock config for ``task`` with its documents read from ``data_dir``.

    Everything that decides a score (templates, choices, target, metrics, process_docs, version)
    is the stock task's. Only the split lm-eval evaluates is provided locally: the other splits
    are dropped, which only matters for few-shot sampling (SliceGPT evaluates zero-shot).
    """
    source = check_local_data(task, data_dir)
    config = stock_task_config(task)
    evaluated = _evaluated_split_key(config)
    if config.get(evaluated) != source.split:
        raise SlicelmError(
            f"lm-eval's {task} evaluates split {config.get(evaluated)!r} but the local data is the "
            f"{source.split!r} split; use the lm-eval version slicelm was tested with (0.4.x)"
        )
    for key in SPLIT_KEYS:
        config[key] = source.split if key == evaluated else None
    root = str(Path(data_dir).expanduser().resolve())
    config["dataset_path"] = root  # reported in lm-eval's config output: where the docs came from
    config["dataset_name"] = None
    config["dataset_kwargs"] = None
    config["custom_dataset"] = functools.partial(load_local_dataset, task, root)
    config.pop("tag", None)  # the tag's group (e.g. ai2_arc) is not evaluated here
    return config


def _evaluated_split_key(config: dict[str, Any]) -> str:
    # Same precedence as lm-eval's ConfigurableTask.eval_docs: test, else validation.
    return "test_split" if config.get("test_split") else "validation_split"
