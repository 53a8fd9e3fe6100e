"""Sparsity sweeps: slice one model at several sparsities and measure each slice.

Every measurement (perplexity, each zero-shot task) of every point is written to
``<out>/points/<label>.json`` the moment it is known, with the settings it depends on. Running the
same sweep again reuses every stored measurement whose settings still match and computes only
what is missing, so an interrupted sweep resumes where it stopped, and a finished one just
rewrites the summary (``sweep.json``, ``sweep.md``) and the plots without loading the model.

Sparsity 0 is the dense model itself (no rotation): it is always measured, as the reference.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from slicelm.config import SliceConfig
from slicelm.core.resources import count_parameters
from slicelm.errors import SlicelmError
from slicelm.io import models  # looked up when called (as models.load_model), so tests can replace it
from slicelm.io.data import load_calibration, load_eval_ids
from slicelm.io.outputs import MANIFEST, read_manifest, write_manifest
from slicelm.layouts.checkpoint import save_finetuned, save_sliced
from slicelm.measure import evaluation  # looked up when called, as models above
from slicelm.measure.perplexity import perplexity
from slicelm.measure.plots import plot_sweep
from slicelm.recover.config import FinetuneConfig
from slicelm.recover.recovery import finetune
from slicelm.slicing import slice_model

SCHEMA = 1


# Slicing settings the stored slices do not depend on: the sparsity is set per point, and the
# calibration batch size only groups the same sequences into forward passes.
_NOT_IN_SLICE_KEY = ("sparsity", "batch_size")


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from a point file (tuples become lists), so stored keys compare equal."""
    return json.loads(json.dumps(value))


@dataclass(frozen=True)
class SweepConfig:
    """What to slice and measure. Only ``sparsities`` and ``tasks`` may change between resumes
    without invalidating stored points (settings of each measurement are checked separately).

    ``slicing`` is how every point is sliced; its ``sparsity`` is replaced by each point's, and its
    ``seed`` also draws the calibration sample. ``recovery`` (None: none) fine-tunes each slice on
    ``recovery_data``. Both validate themselves on construction.
    """

    model: str
    sparsities: tuple[float, ...] = (0.1, 0.2, 0.25, 0.3)
    tasks: tuple[str, ...] = ()
    limit: int | float | None = None
    eval_batch_size: int = 8
    data_dir: str | None = None
    dtype: str = "float32"
    device: str | None = None
    # calibration: the data the slices are computed from (not SliceConfig settings)
    calib: str = "c4"
    calib_samples: int = 128
    calib_seqlen: int = 2048
    # seed 42: the CLI's --seed default, which sweeps have always sampled their calibration with
    slicing: SliceConfig = field(default_factory=lambda: SliceConfig(seed=42))
    # perplexity (None: skip)
    ppl_dataset: str | None = "wikitext2"
    ppl_seqlen: int = 2048
    ppl_windows: int | None = None
    ppl_batch_size: int = 1
    save_models: bool = False
    recovery: FinetuneConfig | None = None
    recovery_data: str = "c4"

    def __post_init__(self) -> None:
        for s in self.sparsities:
            if not 0.0 <= s < 1.0:
                raise SlicelmError(f"sparsities must be in [0, 1), got {s}")
        if self.ppl_dataset is None and not self.tasks:
            raise SlicelmError("nothing to measure: give --tasks or a perplexity dataset")
        # Type checks: the fields were a dict and loose options once, and a dict would fail only after slicing.
        if not isinstance(self.slicing, SliceConfig):
            raise SlicelmError(f"slicing must be a SliceConfig, got {type(self.slicing).__name__}")
        if self.recovery is not None and not isinstance(self.recovery, FinetuneConfig):
            raise SlicelmError(f"recovery must be a FinetuneConfig or None, got {type(self.recovery).__name__}")
        if self.slicing.target_params is not None:
            # A parameter budget chooses the widths itself: every point would be the same model.
            raise SlicelmError("a sweep sets the sparsity of each point; slicing.target_params must be None")

    def slice_config(self, sparsity: float) -> SliceConfig:
        """How the point at ``sparsity`` is sliced."""
        return replace(self.slicing, sparsity=sparsity)

    # Settings each kind of measurement depends on (stored beside it, compared on resume).
    def slice_key(self) -> dict[str, Any]:
        slicing = {k: v for k, v in asdict(self.slicing).items() if k not in _NOT_IN_SLICE_KEY}
        key = {
            "model": self.model,
            "dtype": self.dtype,
            "calib": self.calib,
            "calib_samples": self.calib_samples,
            "calib_seqlen": self.calib_seqlen,
            **slicing,
            "data_dir": self.data_dir,
        }
        return _jsonable(key)

    def ppl_key(self) -> dict[str, Any]:
        return {"dataset": self.ppl_dataset, "seqlen": self.ppl_seqlen, "max_windows": self.ppl_windows}

    def task_key(self) -> dict[str, Any]:
        return {"limit": self.limit, "batch_size": self.eval_batch_size, "data_dir": self.data_dir}

    def recovery_key(self) -> dict[str, Any] | None:
        if self.recovery is None:
            return None
        return _jsonable({**asdict(self.recovery), "data": self.recovery_data, "data_dir": self.data_dir})


def point_label(sparsity: float) -> str:
    return "dense" if sparsity == 0 else f"sparsity_{sparsity:g}"


# ---------------------------------------------------------------------------------------------
# Stored points


def _write_json(path: Path, data: Any) -> None:
    """Atomic write: an interrupted run never leaves a half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file


def load_point(path: Path, config: SweepConfig, sparsity: float) -> dict[str, Any]:
    """The stored point if its slicing settings match, else a fresh empty one."""
    fresh = {"schema": SCHEMA, "sparsity": sparsity, "slice_key": config.slice_key(), "tasks": {}}
    if not path.is_file():
        return fresh
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return fresh
    if stored.get("schema") != SCHEMA:
        return fresh
    if not same_model(stored.get("slice_key") or {}, config.slice_key(), sparsity):
        return fresh
    return stored


def same_model(stored: dict[str, Any], wanted: dict[str, Any], sparsity: float) -> bool:
    """Whether a stored point measured the model these settings would build. The dense model
    depends only on the model and dtype: changing calibration settings keeps its measurements."""
    if sparsity == 0:
        return all(stored.get(k) == wanted[k] for k in ("model", "dtype"))
    return stored == wanted


def missing_work(point: dict[str, Any], config: SweepConfig) -> tuple[bool, list[str]]:
    """(perplexity needed?, tasks needed) for a stored point (or a point's ``recovered`` record)."""
    ppl = point.get("ppl")
    need_ppl = config.ppl_dataset is not None and (ppl is None or ppl.get("key") != config.ppl_key())
    tasks = [t for t in config.tasks if (point["tasks"].get(t) or {}).get("key") != config.task_key()]
    return need_ppl, tasks


def recovery_record(point: dict[str, Any], config: SweepConfig) -> dict[str, Any] | None:
    """The point's stored recovery measurements, fresh if its recovery settings changed (or None)."""
    if config.recovery is None or point["sparsity"] == 0:
        return None
    stored = point.get("recovered")
    if not isinstance(stored, dict) or stored.get("key") != config.recovery_key():
        point["recovered"] = {"key": config.recovery_key(), "tasks": {}}
    return point["recovered"]


def needs_work(point: dict[str, Any], config: SweepConfig) -> bool:
    need_ppl, tasks = missing_work(point, config)
    recovered = recovery_record(point, config)
    return (
        need_ppl
        or bool(tasks)
        or "params" not in point
        or (recovered is not None and any(missing_work(recovered, config)))
    )


SWEEP_KIND = "sweep"


def claim_sweep_folder(out: Path) -> list[Path]:
    """A sweep works in place (it resumes): its folder must be new, empty, or an earlier sweep's.

    Anything else is refused, so a mistyped ``--out`` never writes into (or over) a user's folder.
    Returns the folders this call created (``out`` and missing parents, outermost first).
    """
    if out.exists() and not out.is_dir():
        raise SlicelmError(f"sweep output {out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        manifest = read_manifest(out)
        if manifest is None or manifest.get("kind") != SWEEP_KIND:
            raise SlicelmError(f"{out} holds files and is not a slicelm sweep folder; choose another --out")
        return []
    created = [p for p in (out, *out.parents) if not p.exists()][::-1]
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, SWEEP_KIND)
    return created


def release_unused_sweep_folder(out: Path, created: list[Path]) -> None:
    """Remove the folders :func:`claim_sweep_folder` created while they hold nothing but its manifest
    (and empty subfolders): a sweep refused before it stored anything leaves nothing behind."""
    if not created or not out.is_dir():
        return
    entries = [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
    if any(p != out / MANIFEST for p in entries):
        return  # a stored measurement: kept for resuming
    shutil.rmtree(out, ignore_errors=True)
    for folder in reversed(created[:-1]):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if still empty


# ---------------------------------------------------------------------------------------------
# Running


class _Resources:
    """Things loaded at most once per sweep, and only if some point needs computing."""

    def __init__(self, config: SweepConfig, log: Callable[[str], None]) -> None:
        self.config = config
        self.log = log
        self._tokenizer = None
        self._calibration = None
        self._eval_ids = None

    def model(self):
        """A fresh copy of the dense model (slicing works in place), on the chosen device."""
        model, tokenizer = models.load_model(self.config.model, dtype=self.config.dtype)
        self._tokenizer = self._tokenizer or tokenizer
        return model.to(self.device()), self._tokenizer

    def device(self):
        return torch.device(self.config.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def calibration(self, tokenizer):
        if self._calibration is None:
            c = self.config
            self.log(f"calibration: {c.calib}, {c.calib_samples} x {c.calib_seqlen} tokens")
            self._calibration = load_calibration(
                c.calib,
                tokenizer,
                n_samples=c.calib_samples,
                seqlen=c.calib_seqlen,
                seed=c.slicing.seed,
                data_dir=c.data_dir,
            )
        return self._calibration

    def eval_ids(self, tokenizer):
        if self._eval_ids is None:
            self._eval_ids = load_eval_ids(self.config.ppl_dataset, tokenizer, data_dir=self.config.data_dir)
        return self._eval_ids


def _slice(model, tokenizer, sparsity: float, config: SweepConfig, resources: _Resources) -> dict[str, Any]:
    samples = resources.calibration(tokenizer)
    report = slice_model(model, samples, config.slice_config(sparsity), pad_token_id=tokenizer.pad_token_id)
    return {
        "params": report.params_after,
        "params_before": report.params_before,
        "slice_seconds": report.seconds.get("total"),
        "min_explained_variance": min(report.explained_variance.values(), default=None),
    }


def _measure_point(
    sparsity: float,
    point: dict[str, Any],
    path: Path,
    out: Path,
    config: SweepConfig,
    resources: _Resources,
) -> dict[str, Any]:
    label = point_label(sparsity)
    model_dir = out / "models" / label
    if sparsity > 0 and config.save_models and (model_dir / "config.json").is_file():
        resources.log(f"{label}: loading the saved slice {model_dir}")
        model, tokenizer = models.load_model(str(model_dir), dtype=config.dtype)
        model = model.to(resources.device())
    else:
        model, tokenizer = resources.model()
        if sparsity > 0:
            resources.log(f"{label}: slicing")
            info = _slice(model, tokenizer, sparsity, config, resources)
            if point.get("params") not in (None, info["params"]):
                raise RuntimeError(f"{label}: re-slicing gave {info['params']} parameters, stored {point['params']}")
            point.update(info)
            if config.save_models:
                save_sliced(model, model_dir, tokenizer, overwrite=True)
        else:
            point["params"] = count_parameters(model)
    _write_json(path, point)
    save = lambda: _write_json(path, point)  # noqa: E731  (every measurement is stored as it is made)
    _measure(model, tokenizer, point, config, resources, label, save)
    recovered = recovery_record(point, config)
    if recovered is not None and any(missing_work(recovered, config)):
        model = _recovered_model(model, tokenizer, recovered, out / "models" / f"{label}-recovered", config, resources)
        _measure(model, tokenizer, recovered, config, resources, f"{label} recovered", save)
    del model
    return point


def _measure(model, tokenizer, record: dict[str, Any], config: SweepConfig, resources, label: str, save) -> None:
    """Fill ``record``'s missing perplexity and task measurements, storing each as it is made."""
    need_ppl, tasks = missing_work(record, config)
    if need_ppl:
        resources.log(f"{label}: perplexity on {config.ppl_dataset}")
        start = time.perf_counter()
        result = perplexity(
            model,
            resources.eval_ids(tokenizer),
            seqlen=config.ppl_seqlen,
            max_windows=config.ppl_windows,
            batch_size=config.ppl_batch_size,
        )
        record["ppl"] = {
            "key": config.ppl_key(),
            "ppl": result.ppl,
            "nll": result.nll,
            "windows": result.windows,
            "tokens": result.tokens,
            "seconds": round(time.perf_counter() - start, 1),
        }
        save()
    for task in tasks:
        resources.log(f"{label}: {task}")
        summary = evaluation.evaluate_zeroshot(
            model,
            tokenizer,
            [task],
            limit=config.limit,
            batch_size=config.eval_batch_size,
            data_dir=config.data_dir,
            model_name=f"{config.model} ({label})",
        )
        record["tasks"][task] = {"key": config.task_key(), **summary["tasks"][task], "seconds": summary["seconds"]}
        save()


def _recovered_model(model, tokenizer, record: dict[str, Any], folder: Path, config: SweepConfig, resources):
    """The recovered slice: reloaded when saved, else fine-tuned now (distilling the dense model)."""
    if config.save_models and (folder / "config.json").is_file():
        resources.log(f"{folder.name}: loading the saved recovery")
        return models.load_model(str(folder), dtype=config.dtype)[0].to(resources.device())

    finetune_config = config.recovery
    teacher = resources.model()[0] if finetune_config.loss == "kd" else None
    resources.log(f"{folder.name}: recovering ({finetune_config.loss}, {finetune_config.total_steps()} steps)")
    model, report = finetune(
        model,
        tokenizer,
        config.recovery_data,
        finetune_config,
        teacher=teacher,
        data_dir=config.data_dir,
        device=resources.device(),
    )
    record["finetune"] = {k: report.to_dict()[k] for k in ("steps", "tokens", "seconds", "trainable_params")}
    if config.save_models:
        save_finetuned(
            model, folder, tokenizer, str(folder.parent / folder.name.removesuffix("-recovered")), report.to_dict()
        )
    return model


def run_sweep(config: SweepConfig, out: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every point (reusing stored ones), then write ``sweep.json``, ``sweep.md``, plots.

    Returns the summary written to ``sweep.json``.
    """
    out = Path(out)
    created = claim_sweep_folder(out)
    resources = _Resources(config, log)
    sparsities = [0.0, *sorted({float(s) for s in config.sparsities if s > 0})]
    points = []
    try:
        for sparsity in sparsities:
            path = out / "points" / f"{point_label(sparsity)}.json"
            point = load_point(path, config, sparsity)
            if needs_work(point, config):
                point = _measure_point(sparsity, point, path, out, config, resources)
            else:
                log(f"{point_label(sparsity)}: stored")
            points.append(point)
    except BaseException:
        release_unused_sweep_folder(out, created)
        raise
    summary = summarize_sweep(config, points)
    write_outputs(summary, out)
    return summary


# ---------------------------------------------------------------------------------------------
# Summary


def _measurements(record: dict[str, Any], config: SweepConfig) -> dict[str, Any]:
    """``ppl``, ``tasks`` (each task's paper metric, stderr, samples) and ``average`` of a record."""
    out: dict[str, Any] = {}
    if config.ppl_dataset is not None:
        out["ppl"] = record["ppl"]["ppl"]
    tasks = {}
    for task in config.tasks:
        stored = record["tasks"][task]
        metric = stored["metric"]
        tasks[task] = {
            "metric": metric,
            "value": stored[metric],
            "stderr": stored[f"{metric}_stderr"],
            "samples": stored["samples"],
            "seconds": stored.get("seconds"),
        }
    if tasks:
        out["tasks"] = tasks
        out["average"] = sum(t["value"] for t in tasks.values()) / len(tasks)
    return out


def summarize_sweep(config: SweepConfig, points: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per point: params, perplexity, each task's paper metric (+ stderr), average."""
    rows = []
    for point in points:
        row: dict[str, Any] = {
            "sparsity": point["sparsity"],
            "label": point_label(point["sparsity"]),
            "params": point["params"],
            **_measurements(point, config),
        }
        for key in ("slice_seconds", "min_explained_variance"):
            if point.get(key) is not None:
                row[key] = point[key]
        recovered = point.get("recovered") if config.recovery is not None else None
        if recovered:
            row["recovered"] = _measurements(recovered, config)
        rows.append(row)
    dense = rows[0]
    for row in rows:
        row["params_ratio"] = row["params"] / dense["params"]
    settings = asdict(config)
    del settings["slicing"]["sparsity"]  # each point's own, listed in "sparsities"
    settings["sparsities"] = [r["sparsity"] for r in rows[1:]]
    settings["tasks"] = list(config.tasks)
    return {"settings": settings, "dense": dense, "points": rows}


def write_outputs(summary: dict[str, Any], out: Path) -> list[Path]:
    """``sweep.json``, ``sweep.md`` and the PNG plots; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "sweep.json", summary)
    (out / "sweep.md").write_text(markdown_table(summary))
    return [out / "sweep.json", out / "sweep.md", *plot_sweep(summary, out)]


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def markdown_table(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    rows = summary["points"]
    tasks = s["tasks"]
    has_ppl = s["ppl_dataset"] is not None
    head = ["sparsity", "parameters", "params / dense"]
    if has_ppl:
        head.append(f"{s['ppl_dataset']} ppl")
    head += [f"{t} ({rows[0]['tasks'][t]['metric']})" for t in tasks]
    if tasks:
        head.append("average")
    lines = [
        f"# Sparsity sweep: {s['model']}",
        "",
        _settings_line(s),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---:|" * len(head),
    ]

    def cells_of(r: dict[str, Any]) -> list[str]:
        cells = [f"{r['ppl']:.2f}"] if has_ppl else []
        for t in tasks:
            v = r["tasks"][t]
            err = "" if v["stderr"] is None or math.isnan(v["stderr"]) else f" ± {100 * v['stderr']:.1f}"
            cells.append(f"{100 * v['value']:.1f}{err}")
        return cells + ([f"{100 * r['average']:.1f}"] if tasks else [])

    for r in rows:
        name = f"{r['sparsity']:.0%}" if r["sparsity"] else "dense"
        head_cells = [name, _fmt_params(r["params"]), f"{r['params_ratio']:.3f}"]
        lines.append("| " + " | ".join(head_cells + cells_of(r)) + " |")
        if r.get("recovered"):
            head_cells[0] = f"{name} recovered"
            lines.append("| " + " | ".join(head_cells + cells_of(r["recovered"])) + " |")
    lines += [
        "",
        "Accuracies in %, ± one standard error (lm-eval's). Parameters as stored (tied weights once).",
    ]
    if s.get("recovery"):
        r = s["recovery"]
        lines.append(
            f"Recovered rows: `slicelm finetune`-style {r['loss']} on {s['recovery_data']}, "
            f"{r['tokens']} tokens, {'full' if r['lora_rank'] is None else 'LoRA'}; parameters unchanged."
        )
    return "\n".join(lines) + "\n"


def _settings_line(s: dict[str, Any]) -> str:
    slicing = s["slicing"]
    parts = [
        f"Calibration: {s['calib']}, {s['calib_samples']} x {s['calib_seqlen']} tokens, seed {slicing['seed']}; "
        f"widths rounded to {slicing['round_to']}{', head sliced' if slicing['slice_head'] else ''}."
    ]
    if s["ppl_dataset"] is not None:
        windows = "all windows" if s["ppl_windows"] is None else f"first {s['ppl_windows']} windows"
        parts.append(f"Perplexity: {s['ppl_dataset']} test, {s['ppl_seqlen']}-token windows, {windows}.")
    if s["tasks"]:
        limit = "all documents" if s["limit"] is None else f"--limit {s['limit']} documents per task"
        data = s["data_dir"] or "the Hugging Face hub"
        parts.append(f"Zero-shot (lm-eval): {limit}, task data from {data}.")
    return " ".join(parts)
