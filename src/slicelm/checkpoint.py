"""Saving and loading sliced models as ordinary Hugging Face folders.

A sliced folder holds ``model.safetensors``, ``config.json`` (the original config plus a ``slicelm``
section and an ``auto_map`` entry), ``modeling_slicelm.py`` (so plain transformers loads it with
``trust_remote_code=True``), the tokenizer, ``slicing_plan.json`` and ``slicelm_report.json``.
Folders are written beside the target and renamed into place, so a failure never leaves a
half-written output.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slicelm import modeling_slicelm
from slicelm.errors import SlicelmError
from slicelm.modeling_slicelm import SLICELM_KEY, sliced_model_class

MODELING_FILE = "modeling_slicelm.py"
PLAN_FILE = "slicing_plan.json"
REPORT_FILE = "slicelm_report.json"


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) if ``out`` exists and may not be replaced."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise SlicelmError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise SlicelmError(f"output path {out} exists and is not a folder; remove it or choose another --out")
    if out.parent.exists() and not out.parent.is_dir():
        raise SlicelmError(f"{out.parent} is not a folder; choose another --out")
    return out


def sliced_config(model_config: Any, base_class: str, metadata: dict[str, Any] | None = None) -> Any:
    """Record provenance and the remote-code entry point in a sliced model's config (in place)."""
    info = dict(getattr(model_config, SLICELM_KEY))
    info.update(metadata or {})
    info["base_class"] = base_class
    setattr(model_config, SLICELM_KEY, info)
    model_config.auto_map = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.Sliced{base_class}"}
    return model_config


@contextmanager
def staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on failure it vanishes."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)  # only now, once the work is done or under way
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        _check_no_pickles(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_companions(folder: Path, config: Any, tokenizer: Any = None, report: dict[str, Any] | None = None) -> None:
    """Everything but the weights: modeling code, plan, report, tokenizer (config if not yet saved)."""
    if not (folder / "config.json").exists():
        config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    shutil.copyfile(modeling_slicelm.__file__, folder / MODELING_FILE)
    (folder / PLAN_FILE).write_text(json.dumps(getattr(config, SLICELM_KEY)["plan"], indent=2) + "\n")
    if report is not None:
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")


def save_sliced(
    model: nn.Module,
    out: str | Path,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
) -> Path:
    """Write a sliced model (and tokenizer) to ``out`` atomically. Returns the folder.

    metadata: recorded in ``config.json`` under ``slicelm`` (source model, calibration settings...).
    report: written as ``slicelm_report.json``.
    """
    if not getattr(model, "_slicelm_model", False):
        raise SlicelmError("model is not sliced; call slicelm.slice_model first")
    out = Path(out).expanduser()
    sliced_config(model.config, type(model).__mro__[1].__name__, metadata)  # Sliced<Base> -> Base
    with staged_folder(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_companions(tmp, model.config, tokenizer, report)
    return out


def _check_no_pickles(folder: Path) -> None:
    pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if pickles:
        raise RuntimeError(f"refusing to write pickled files: {pickles}")


def load_sliced(path: str | Path, dtype: torch.dtype | None = torch.float32, device: str | None = None) -> nn.Module:
    """Load a folder written by :func:`save_sliced` with slicelm's classes (no remote code)."""
    import transformers
    from transformers import AutoConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    info = getattr(config, SLICELM_KEY, None)
    if info is None:
        raise SlicelmError(f"{path} is not a sliced model (config.json has no 'slicelm' section)")
    base_name = info.get("base_class")
    base = getattr(transformers, str(base_name), None)
    if not isinstance(base, type):
        raise SlicelmError(f"{path}: unknown architecture {base_name!r} in config.json")
    model, info = sliced_model_class(base).from_pretrained(
        path, config=config, dtype=dtype, device_map=device, output_loading_info=True
    )
    # A sliced checkpoint must match its structure exactly: a missing tensor would be random.
    problems = [
        f"{len(v)} {k.replace('_', ' ')} (e.g. {sorted(map(str, v))[0]})"
        for k, v in info.items()
        if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    ]
    if problems:
        raise SlicelmError(f"{path} does not match its slicing plan: {'; '.join(problems)}; re-create it")
    return model.eval()
