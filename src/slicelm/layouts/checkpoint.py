"""Saving and loading sliced models as ordinary Hugging Face folders.

What a folder holds is one of the output formats of :data:`OUTPUT_FORMATS`, a registry in order of
portability: ``stock`` (the original architecture: a one-basis plan with one stream and one MLP
width), ``decilm`` (a DeciLM / Nemotron-NAS folder: a one-basis plan whose layers differ, for
Llama-style families; :mod:`slicelm.layouts.decilm`) and ``slicelm`` (slicelm's own remote-code format,
which holds every plan, shortcut matrices included). Each entry says why it cannot hold a plan
(``refusal``) and writes the folder; ``auto`` picks the first that holds the plan.

A slicelm-format folder holds ``model.safetensors``, ``config.json`` (the original config plus a ``slicelm``
section and an ``auto_map`` entry), ``modeling_slicelm.py`` (so plain transformers loads it with
``trust_remote_code=True``), the tokenizer, ``slicing_plan.json`` and ``slicelm_report.json``.
Folders are written beside the target and renamed into place, so a failure never leaves a
half-written output.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig

from slicelm.core.plan import SlicingPlan
from slicelm.errors import SlicelmError, first_line
from slicelm.io.outputs import OutputClaim, finite_or_none, staged_output, to_json
from slicelm.io.streaming_io import ShardWriter, check_finite
from slicelm.layouts.decilm import OUTPUT_KIND as DECILM_KIND
from slicelm.layouts.decilm import family_refusal, save_decilm
from slicelm.layouts.plain import OUTPUT_KIND as PLAIN_KIND
from slicelm.layouts.plain import stream_widths, to_shaped_model, to_stock_model
from slicelm.modeling import modeling_slicelm
from slicelm.modeling.modeling_slicelm import (
    SLICELM_KEY,
    SlicedCheckpointError,
    section_checksum,
    sliced_model_class,
    validate_section,
)

MODELING_FILE = "modeling_slicelm.py"
PLAN_FILE = "slicing_plan.json"
REPORT_FILE = "slicelm_report.json"
FINETUNED_KIND = "finetuned-model"  # manifest kind of a fine-tuned stock (plain-layout or dense) folder
OUTPUT_KIND = "sliced-model"  # manifest kind of the folders written here (see slicelm.io.outputs)
MAX_SHARD_BYTES = 4 * 2**30


def sliced_config(model_config: Any, base_class: str, metadata: dict[str, Any] | None = None) -> Any:
    """Record provenance and the remote-code entry point in a sliced model's config (in place).

    The section gets a checksum last, so the modeling code can refuse a hand-edited section.
    """
    info = {k: v for k, v in getattr(model_config, SLICELM_KEY).items() if k != "checksum"}
    info.update(finite_or_none(metadata or {}))
    info["base_class"] = base_class
    info["checksum"] = section_checksum(info)
    setattr(model_config, SLICELM_KEY, info)
    model_config.auto_map = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.Sliced{base_class}"}
    return model_config


def write_companions(folder: Path, config: Any, tokenizer: Any = None, report: dict[str, Any] | None = None) -> None:
    """Everything but the weights: modeling code, plan, report, tokenizer (config if not yet saved)."""
    if not (folder / "config.json").exists():
        config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    shutil.copyfile(modeling_slicelm.__file__, folder / MODELING_FILE)
    (folder / PLAN_FILE).write_text(json.dumps(getattr(config, SLICELM_KEY)["plan"], indent=2) + "\n")
    if report is not None:
        (folder / REPORT_FILE).write_text(to_json(report) + "\n")
    _check_no_pickles(folder)


def save_sliced(
    model: nn.Module,
    out: str | Path | OutputClaim,
    tokenizer: Any = None,
    *,
    format: str = "auto",  # noqa: A002 - the CLI's --format
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
) -> Path:
    """Write a sliced model (and tokenizer) to ``out`` atomically, in an output format. Returns the folder.

    out: a folder, or an :class:`~slicelm.io.outputs.OutputClaim` taken before the work started.
    format: a name in :data:`OUTPUT_FORMATS`, or ``auto`` (the most portable one that holds the
    plan: a one-basis plan is written stock or as a DeciLM folder, with no remote code for stock
    transformers, vLLM and llama.cpp). A format that cannot hold the plan is refused in one line.
    metadata: provenance (source model, calibration settings...), recorded in the folder.
    report: written as ``slicelm_report.json``. Refuses (writing nothing) a model with non-finite
    or missing weights.
    """
    chosen = format_of(model, format)
    return chosen.write(model, out, tokenizer, overwrite=overwrite, metadata=metadata, report=report)


def format_of(model: nn.Module, requested: str = "auto") -> OutputFormat:
    """The output format a sliced model is written in (``requested`` checked against its plan)."""
    if not getattr(model, "_slicelm_model", False):
        raise SlicelmError("model is not sliced; call slicelm.slice_model first")
    info = getattr(model.config, SLICELM_KEY, {})
    if info.get("kind") == "local":  # the structure-local steps: already the stock class, one width per kind
        if requested not in ("auto", "stock"):
            raise SlicelmError(f"--format {requested}: a model pruned by the structure-local steps is written stock")
        return OUTPUT_FORMATS["stock"]
    return choose_format(SlicingPlan.from_dict(info["plan"]), model.config, requested)


# --------------------------------------------------------------------------------------------------
# Output formats
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputFormat:
    """One kind of output folder: which plans it holds and how it is written.

    refusal(plan, model_config): why this format cannot hold ``plan`` for that family (one line), or
    None. write(model, out, tokenizer, *, overwrite, metadata, report): the folder, atomically.
    """

    name: str
    kind: str  # the manifest kind (slicelm.io.outputs.MODEL_KINDS)
    what: str  # in words, for help texts
    refusal: Callable[[SlicingPlan, Any], str | None]
    write: Callable[..., Path]

    def holds(self, plan: SlicingPlan, model_config: Any) -> bool:
        return self.refusal(plan, model_config) is None


OUTPUT_FORMATS: dict[str, OutputFormat] = {}  # in order of portability: auto takes the first that holds


def register_format(fmt: OutputFormat) -> None:
    OUTPUT_FORMATS[fmt.name] = fmt


def choose_format(plan: SlicingPlan, model_config: Any, requested: str = "auto") -> OutputFormat:
    """The format a plan is written in: ``requested``, or for ``auto`` the most portable that holds it."""
    if requested == "auto":
        return next(f for f in OUTPUT_FORMATS.values() if f.holds(plan, model_config))
    if requested not in OUTPUT_FORMATS:
        raise SlicelmError(f"unknown output format {requested!r}; use auto or one of {', '.join(OUTPUT_FORMATS)}")
    reason = OUTPUT_FORMATS[requested].refusal(plan, model_config)
    if reason is not None:
        raise SlicelmError(f"--format {requested} cannot hold this plan: {reason}; use --format auto")
    return OUTPUT_FORMATS[requested]


def _stock_refusal(plan: SlicingPlan, model_config: Any) -> str | None:
    if not plan.one_basis:
        return "the slicegpt layout has shortcut matrices, which no stock architecture has (use --layout plain)"
    if not plan.is_uniform:
        return "its layers differ in width, and a stock config holds one stream width and one MLP width"
    return None


def _decilm_refusal(plan: SlicingPlan, model_config: Any) -> str | None:
    if not plan.one_basis:
        return "the slicegpt layout has shortcut matrices, which a DeciLM folder cannot hold (use --layout plain)"
    if len(stream_widths(plan)) != 1:
        return "a DeciLM folder holds one stream width"
    first = next((lw for lw in plan.layers if not lw.removed), None)  # whole removed layers are left out
    if first is not None and first.attention_removed:
        return "vLLM's DeciLM class needs attention in the first layer that computes anything"
    return family_refusal(model_config)


def save_remote(
    model: nn.Module,
    out: str | Path | OutputClaim,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
) -> Path:
    """slicelm's own format: the sliced class as it is in memory, loaded through ``modeling_slicelm.py``.

    Weights keep their in-memory names on disk (no transformers renaming), so the folder loads the
    same with any transformers release.
    """
    tensors = unique_state_dict(model)  # checks for meta (never loaded) tensors
    for name, tensor in tensors.items():
        check_finite(name, tensor)
    sliced_config(model.config, model._slicelm_base.__name__, metadata)
    with staged_output(out, overwrite, kind=OUTPUT_KIND) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes=MAX_SHARD_BYTES)
        writer.write(tensors)
        writer.finish()
        model.config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        write_companions(tmp, model.config, tokenizer, report)
    return out.out if isinstance(out, OutputClaim) else Path(out).expanduser()


def save_deci(
    model: nn.Module,
    out: Any,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
) -> Path:
    """A one-basis model as a DeciLM folder: each layer's widths read from its tensors (see decilm.py)."""
    info = getattr(model.config, SLICELM_KEY)
    full = {**(report or {}), "layout": "plain", "provenance": dict(metadata or {})}
    shaped = to_shaped_model(model)
    return save_decilm(shaped, out, tokenizer, overwrite=overwrite, plan=info["plan"], report=full)


def save_plain(
    model: nn.Module,
    out: Any,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
) -> Path:
    """Write a model in the stock architecture (no remote code, no slicelm section): a plain-layout
    sliced model (converted by :func:`slicelm.layouts.plain.to_stock_model`) or one pruned by the
    structure-local steps of :mod:`slicelm.steps.local` (already the stock class)."""
    info = getattr(model.config, SLICELM_KEY)
    local = info.get("kind") == "local"
    full = {**(report or {}), "layout": "stock" if local else "plain", "provenance": dict(metadata or {})}
    if not local:
        stock = to_stock_model(model)
        return save_stock(stock, out, tokenizer, kind=PLAIN_KIND, overwrite=overwrite, plan=info["plan"], report=full)
    delattr(model.config, SLICELM_KEY)
    try:
        return save_stock(model, out, tokenizer, kind=PLAIN_KIND, overwrite=overwrite, plan=info["plan"], report=full)
    finally:
        setattr(model.config, SLICELM_KEY, info)


def is_stock_shaped(info: dict[str, Any]) -> bool:
    """A plain-layout model whose widths a stock config can hold (one stream width, one MLP width)."""
    return info.get("kind") == "plain" and SlicingPlan.from_dict(info["plan"]).is_uniform


register_format(OutputFormat("stock", PLAIN_KIND, "the original architecture", _stock_refusal, save_plain))
register_format(OutputFormat("decilm", DECILM_KIND, "a DeciLM / Nemotron-NAS folder", _decilm_refusal, save_deci))
register_format(OutputFormat("slicelm", OUTPUT_KIND, "slicelm's remote-code format", lambda p, c: None, save_remote))
FORMATS = ("auto", *OUTPUT_FORMATS)


def save_stock(
    model: nn.Module,
    out: str | Path | OutputClaim,
    tokenizer: Any = None,
    *,
    kind: str,
    overwrite: bool = False,
    plan: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
) -> Path:
    """Write a model in a stock architecture (plain-layout, fine-tuned dense...) as an ordinary
    Hugging Face folder through ``save_pretrained``: no remote code, no pickles, nothing non-finite."""
    for name, tensor in model.state_dict().items():
        check_finite(name, tensor)
    with staged_output(out, overwrite, kind=kind) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            (tmp / PLAN_FILE).write_text(to_json(plan) + "\n")
        if report is not None:
            (tmp / REPORT_FILE).write_text(to_json(report) + "\n")
        code = [p.name for p in tmp.iterdir() if p.suffix in (".py", ".bin", ".pt", ".pth", ".pkl")]
        if code:
            raise RuntimeError(f"a stock model folder must hold no code or pickles, found {code}")
    return out.out if isinstance(out, OutputClaim) else Path(out).expanduser()


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every tensor once: a tied head is stored with its embedding (transformers
    re-ties it on load from ``tie_word_embeddings``)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            raise SlicelmError(f"tensor {name} was never loaded (meta device); nothing was written")
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out


def _check_no_pickles(folder: Path) -> None:
    pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if pickles:
        raise RuntimeError(f"refusing to write pickled files: {pickles}")


def load_sliced(path: str | Path, dtype: torch.dtype | None = torch.float32, device: str | None = None) -> nn.Module:
    """Load a folder written by :func:`save_sliced` with slicelm's classes (no remote code).

    A folder whose config section was edited, or whose tensors are missing, unexpected or
    mis-shaped, is refused with one line (the same checks the folder's own modeling file makes).
    """
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    info = getattr(config, SLICELM_KEY, None)
    if info is None:
        raise SlicelmError(f"{path} is not a sliced model (config.json has no 'slicelm' section)")
    try:
        info = validate_section(info, config)
    except SlicedCheckpointError as exc:
        raise SlicelmError(f"{path}: {exc}") from None
    base_name = info.get("base_class")
    base = getattr(transformers, str(base_name), None)
    if not isinstance(base, type):
        raise SlicelmError(f"{path}: unknown architecture {base_name!r} in config.json")
    try:
        model = sliced_model_class(base).from_pretrained(path, config=config, dtype=dtype, device_map=device)
    except SlicedCheckpointError as exc:
        raise SlicelmError(f"{path}: {exc}") from None
    except (OSError, RuntimeError, SafetensorError) as exc:  # truncated or unreadable safetensors
        raise SlicelmError(f"cannot read the weights of {path} ({first_line(exc)}); re-create it") from None
    return model.eval()


def save_finetuned(model, claim, tokenizer, source_folder: str, finetune_report: dict[str, Any]) -> Path:
    """The same kind of folder as the input: sliced (remote code), or stock (plain layout / dense)."""
    folder = Path(source_folder)
    base: dict[str, Any] = {}
    if (folder / REPORT_FILE).is_file():
        base = json.loads((folder / REPORT_FILE).read_text())
    report = base | {"finetune": finetune_report}
    if getattr(model, "_slicelm_model", False):
        return save_sliced(model, claim, tokenizer, report=report)
    plan = json.loads((folder / PLAN_FILE).read_text()) if (folder / PLAN_FILE).is_file() else None
    return save_stock(model, claim, tokenizer, kind=FINETUNED_KIND, plan=plan, report=report)
