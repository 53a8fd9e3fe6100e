"""slicelm eval: offline lm-eval tasks equal the stock ones, and the CLI equals calling lm-eval."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import build_tiny_model

from slicelm.cli import main
from slicelm.errors import SlicelmError
from slicelm.measure.evaluation import (
    PAPER_METRICS,
    PAPER_TASKS,
    make_lm,
    offline_task_config,
    resolve_tasks,
    run_lm_eval,
)
from slicelm.measure.evaluation.reference import reference_task_manager, write_reference_tasks
from slicelm.measure.evaluation.tasks import LOCAL_SOURCES, stock_task_config

ALL_TASKS = [*PAPER_TASKS, "lambada_openai"]
LIMIT = 4


@pytest.fixture(autouse=True)
def _quiet_lm_eval():
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def tiny_lm(vocab_size: int = 49152, seed: int = 0):
    """A tiny random Llama that reads SmolLM2's vocabulary (so real task text can be scored)."""
    return build_tiny_model(
        "llama",
        seed=seed,
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        max_position_embeddings=512,
    )


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2_tokenizer):
    """A saved tiny dense model + SmolLM2 tokenizer, loadable by ``slicelm eval FOLDER``."""
    folder = tmp_path_factory.mktemp("tiny_dense")
    tiny_lm().save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Task definitions


def test_resolve_tasks_aliases_and_errors():
    assert resolve_tasks("piqa, Lambada,piqa") == ["piqa", "lambada_openai"]
    assert set(PAPER_METRICS) == set(ALL_TASKS)
    with pytest.raises(SlicelmError, match="unknown task 'mmlu'"):
        resolve_tasks("piqa,mmlu")
    with pytest.raises(SlicelmError, match="no task"):
        resolve_tasks(" , ")


@pytest.mark.parametrize("task", ALL_TASKS)
def test_offline_config_keeps_everything_that_scores(task, data_dir):
    """Only where the documents come from changes; prompts, choices, metrics are lm-eval's."""
    stock = stock_task_config(task)
    offline = offline_task_config(task, data_dir)
    changed = {k for k in stock.keys() | offline.keys() if stock.get(k) != offline.get(k)}
    allowed = {"dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "tag"}
    allowed |= {"training_split", "validation_split", "test_split"}
    assert changed <= allowed, changed - allowed
    evaluated = "test_split" if stock.get("test_split") else "validation_split"
    assert offline[evaluated] == stock[evaluated] == LOCAL_SOURCES[task].split


def _doc_views(task, docs):
    """What lm-eval makes of each doc: (prompt, choices, target), via the stock task templates."""
    from lm_eval.api.task import ConfigurableTask

    config = stock_task_config(task)
    config.pop("tag", None)
    config.update(
        training_split=None,
        validation_split=None,
        test_split="test",
        custom_dataset=lambda **_: __import__("datasets").DatasetDict({"test": docs}),
    )
    built = ConfigurableTask(config=config)
    return [(built.doc_to_text(d), built.doc_to_choice(d), built.doc_to_target(d)) for d in built.eval_docs]


@pytest.mark.parametrize(
    ("task", "saved", "question_key"),
    [
        ("arc_easy", "arc_easy/validation", "question"),
        ("arc_challenge", "arc_challenge/validation", "question"),
        ("openbookqa", "openbookqa/main/validation", "question_stem"),
    ],
)
def test_olmes_docs_convert_back_to_hub_schema(task, saved, question_key, data_dir, tmp_path):
    """ARC/OpenBookQA are stored locally as {question, choices, gold}: turning real hub-schema rows
    into that format and back must give lm-eval the very same prompts, choices and targets."""
    import datasets

    hub = datasets.load_from_disk(str(data_dir / saved), keep_in_memory=True)
    (tmp_path / task).mkdir()
    with open(tmp_path / task / "test_docs.jsonl", "w") as fh:
        for row in hub:
            gold = row["choices"]["label"].index(row["answerKey"].strip())
            text = row["choices"]["text"]
            doc = {"id": row["id"], "question": row[question_key], "choices": text, "gold": gold}
            fh.write(json.dumps(doc) + "\n")
    numeric = sum(row["answerKey"].isdigit() for row in hub)
    converted = LOCAL_SOURCES[task].read(tmp_path)
    assert _doc_views(task, datasets.Dataset.from_list(converted)) == _doc_views(task, hub)
    if task == "arc_challenge":
        assert numeric > 0  # the items with "1".."4" answer keys are covered


def test_local_datasets_have_full_size(data_dir):
    sizes = {"piqa": 1838, "winogrande": 1267, "hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172}
    sizes |= {"openbookqa": 500, "boolq": 3270, "lambada_openai": 5153}
    from slicelm.measure.evaluation.tasks import load_local_dataset

    for task, n in sizes.items():
        split = LOCAL_SOURCES[task].split
        assert len(load_local_dataset(task, str(data_dir), version=1.0)[split]) == n, task


def test_missing_task_data_is_a_one_line_error(tmp_path, tiny_folder, capsys):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text("")
    with pytest.raises(SlicelmError) as info:
        offline_task_config("piqa", tmp_path)
    message = str(info.value)
    assert "\n" not in message and "piqa/valid-labels.lst" in message and str(tmp_path) in message

    code = main(["eval", str(tiny_folder), "--tasks", "arc_easy", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "arc_easy/test_docs.jsonl" in err and "Hugging Face hub" in err


# ---------------------------------------------------------------------------------------------
# Same numbers as lm-eval


def _requests_and_scores(results, task):
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [(s["doc_id"], s["arguments"], s["resps"]) for s in samples]


def test_offline_tasks_equal_lm_eval_file_route(data_dir, tmp_path, smollm2_tokenizer):
    """slicelm's in-memory loaders vs stock YAMLs fed through lm-eval's own json/arrow loaders:
    the same requests, the same log-likelihoods, the same metrics, on every task."""
    from slicelm.measure.evaluation import task_specs

    lm = make_lm(tiny_lm(), smollm2_tokenizer, batch_size=4)
    specs, manager = task_specs(ALL_TASKS, data_dir)
    ours = run_lm_eval(lm, specs, manager, limit=LIMIT, log_samples=True)
    folder = write_reference_tasks(tmp_path / "tasks", data_dir, ALL_TASKS)
    ref = run_lm_eval(lm, ALL_TASKS, reference_task_manager(folder), limit=LIMIT, log_samples=True)
    for task in ALL_TASKS:
        assert _requests_and_scores(ours, task) == _requests_and_scores(ref, task), task
        assert ours["results"][task] == ref["results"][task], task


def test_cli_eval_equals_direct_lm_eval(data_dir, tiny_folder, tmp_path, capsys):
    """``slicelm eval`` prints exactly what lm_eval.simple_evaluate reports for the same model."""
    from slicelm.io.models import load_model
    from slicelm.measure.evaluation import task_specs

    tasks = ["piqa", "winogrande", "hellaswag", "arc_easy", "boolq", "lambada"]
    out = tmp_path / "eval.json"
    argv = ["eval", str(tiny_folder), "--tasks", ",".join(tasks), "--limit", str(LIMIT), "--batch-size", "2"]
    code = main([*argv, "--data-dir", str(data_dir), "--output", str(out), "--device", "cpu"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and json.loads(out.read_text()) == {"created_by": "slicelm", **printed}

    model, tokenizer = load_model(str(tiny_folder))
    names = resolve_tasks(tasks)
    specs, manager = task_specs(names, data_dir)
    direct = run_lm_eval(make_lm(model, tokenizer, batch_size=2), specs, manager, limit=LIMIT)["results"]
    assert list(printed["tasks"]) == names
    for task, row in printed["tasks"].items():
        metric = PAPER_METRICS[task]
        assert row["metric"] == metric and row["samples"] == LIMIT
        assert row[metric] == direct[task][f"{metric},none"]
        assert row[f"{metric}_stderr"] == direct[task][f"{metric}_stderr,none"]
    scores = [row[row["metric"]] for row in printed["tasks"].values()]
    assert printed["average"] == pytest.approx(sum(scores) / len(scores))
    assert printed["limit"] == LIMIT and printed["data"] == str(data_dir.resolve())


def test_env_var_selects_data_dir(data_dir, tiny_folder, monkeypatch, capsys):
    monkeypatch.setenv("SLICELM_DATA_DIR", str(data_dir))
    assert main(["eval", str(tiny_folder), "--tasks", "winogrande", "--limit", "2", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["data"] == str(data_dir.resolve())


def test_hub_route_uses_stock_task_names():
    from slicelm.measure.evaluation import task_specs

    specs, manager = task_specs(["arc_easy", "lambada_openai"], None)
    assert specs == ["arc_easy", "lambada_openai"]
    assert {"arc_easy", "lambada_openai"} <= set(manager.all_tasks)


def test_sliced_tiny_model_end_to_end(data_dir, tmp_path, smollm2_tokenizer, capsys):
    """Slice a tiny model, save it, and score the saved folder through ``slicelm eval``."""
    try:
        from slicelm import SliceConfig, save_sliced, slice_model
    except ImportError:  # the public names are re-exported from these modules
        try:
            from slicelm.layouts.checkpoint import save_sliced
            from slicelm.slicing import SliceConfig, slice_model
        except ImportError:
            pytest.skip("slicing API not available in this build")

    model = tiny_lm()
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, 49152, (32,), generator=gen) for _ in range(4)]
    report = slice_model(model, calibration, SliceConfig(sparsity=0.25, round_to=8), progress=False)
    assert report.params_after < report.params_before
    folder = save_sliced(model, tmp_path / "sliced", smollm2_tokenizer)

    argv = ["eval", str(folder), "--tasks", "piqa,arc_challenge", "--limit", "3", "--data-dir", str(data_dir)]
    assert main([*argv, "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["tasks"]) == {"piqa", "arc_challenge"}
    assert all(row["samples"] == 3 for row in printed["tasks"].values())
    assert 0.0 <= printed["average"] <= 1.0


def test_hub_failure_is_a_one_line_error(tiny_folder, monkeypatch, capsys, hub_only):
    """Without a data folder the stock tasks download from the hub; offline that must say what to do."""
    import datasets

    def offline(*_args, **_kwargs):
        raise ConnectionError("Couldn't reach 'allenai/winogrande' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    code = main(["eval", str(tiny_folder), "--tasks", "winogrande", "--limit", "2", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("slicelm: error: could not download the task data from the Hugging Face hub")
    assert "--data-dir" in err[-1]
