"""An lm-eval ``--include_path`` folder for the offline data: the stock tasks, read from files.

This is the way a user would run *plain* lm-eval offline: one YAML per task that ``include``\\ s
lm-eval's stock YAML (so prompts and metrics are the stock ones) and only swaps the dataset for
lm-eval's generic ``json``/``arrow`` file loaders. It goes through lm-eval's ordinary
``datasets.load_dataset`` route instead of slicelm's in-memory ``custom_dataset`` loaders, and its
format conversions are written out separately here, so comparing the two checks slicelm's
offline path end to end (``tests/test_evaluation.py``, ``benchmarks/zeroshot_smollm2.py``)::

    write_reference_tasks(folder, data_dir, tasks)
    lm_eval --model hf --model_args pretrained=... --include_path folder --tasks piqa,...

The converted files (hub schema, evaluated split only) are written beside the YAMLs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slicelm.measure.evaluation.tasks import STOCK_YAMLS, check_local_data, lm_eval_tasks_dir, stock_task_config

# Tasks whose local copy already has the hub schema: lm-eval reads the saved arrow file directly.
ARROW_FILES = {
    "hellaswag": "hellaswag/validation/data-00000-of-00001.arrow",
    "winogrande": "winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _hub_rows(task: str, data: Path) -> list[dict[str, Any]]:
    """The evaluated split in the hub dataset's schema (independent of slicelm.measure.evaluation.tasks)."""
    if task == "piqa":
        labels = (data / "piqa/valid-labels.lst").read_text().split()
        docs = _jsonl(data / "piqa/valid.jsonl")
        return [dict(doc, label=int(y)) for doc, y in zip(docs, labels, strict=True)]
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        key = "question_stem" if task == "openbookqa" else "question"
        rows = []
        for doc in _jsonl(data / task / "test_docs.jsonl"):
            letters = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
            rows.append(
                {
                    "id": doc["id"],
                    key: doc["question"],
                    "choices": {"text": doc["choices"], "label": letters},
                    "answerKey": letters[doc["gold"]],
                }
            )
        return rows
    if task == "boolq":
        import pyarrow as pa  # heavy: imported when the boolq file is read

        path = data / "boolq/validation/data-00000-of-00001.arrow"
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        return [
            {"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
            for i, r in enumerate(table.to_pylist())
        ]
    if task == "lambada_openai":
        docs = _jsonl(data / "lambada/lambada_openai.jsonl")
        return [{"text": f"{d['context']} {d['continuation']}"} for d in docs]
    raise KeyError(task)


def write_reference_tasks(folder: str | Path, data_dir: str | Path, tasks: list[str]) -> Path:
    """Write ``<folder>/<task>.yaml`` (+ converted data) for ``tasks``; returns ``folder``."""
    import yaml  # imported when used: only writing reference tasks needs it

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir).expanduser().resolve()
    for task in tasks:
        check_local_data(task, data)
        stock = stock_task_config(task)
        split = "test" if stock.get("test_split") else "validation"
        if task in ARROW_FILES:
            loader, data_file = "arrow", str(data / ARROW_FILES[task])
        else:
            loader, data_file = "json", str(folder / f"{task}.{split}.jsonl")
            with open(data_file, "w", encoding="utf-8") as fh:
                for row in _hub_rows(task, data):
                    fh.write(json.dumps(row) + "\n")
        config = {
            "include": str(lm_eval_tasks_dir() / STOCK_YAMLS[task]),
            "task": task,
            "dataset_path": loader,
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: data_file}},
            # Only the evaluated split exists offline (few-shot sampling is not used at 0 shots).
            "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
        }
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def reference_task_manager(folder: str | Path):
    """A TaskManager indexing only the reference folder (its names shadow nothing else)."""
    from lm_eval.tasks import TaskManager  # optional dependency (the eval extra): imported when used

    return TaskManager(include_defaults=False, include_path=str(folder))
