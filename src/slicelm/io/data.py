"""Text for calibration (token windows fed to PCA) and for perplexity (one long test text).

Two sources for every named set: a local *data dir* laid out like ``/work/shared/data`` (see its
``SOURCES.md``), or, when no data dir is given, the Hugging Face hub through ``datasets``.
A data dir that lacks a file is an error, never a silent download: the user chose offline.

Conventions (GPTQ / SliceGPT, the numbers published for SliceGPT are computed this way):

* Test text is the split's rows joined with ``"\\n\\n"`` and tokenized **once** with the tokenizer's
  defaults (``tokenizer(text)``), so a tokenizer that adds BOS puts exactly one at the very start.
* Calibration never touches a test split, by name or inside a user's file (`slicelm.io.fingerprint`).
* Every calibration sample starts with the special tokens that ``tokenizer(text)`` would put in
  front of any text (BOS for Llama-style tokenizers, nothing for GPT-2/SmolLM2-style ones), so each
  sample looks like the start of an ordinary input, as when SliceGPT tokenizes samples one by one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slicelm.errors import SlicelmError, first_line
from slicelm.io.fingerprint import check_not_eval_text
from slicelm.io.hub import prepare_hub
from slicelm.io.names import CALIBRATION_SETS, DATA_DIR_ENV, EVAL_SETS  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# Files inside a data dir (layout of /work/shared/data, documented in its SOURCES.md).
WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"
WIKITEXT2_TRAIN = "wikitext-2-raw/wiki.train.raw"
PTB_TRAIN = "ptb/ptb.train.txt"
PTB_TEST = "ptb/ptb.test.txt"
C4_SAMPLE = "c4/c4_validation_2k.parquet"
ALPACA = "alpaca/alpaca_5000.json"

# The local C4 file is a 2,000-document *sample* of C4 validation, and it has to serve both as
# calibration and as test text. The two must not share documents (calibrating on the very text we
# score would flatter the sliced model), so the first documents are the test text and the rest are
# calibration text. With a ~50k-token vocabulary each half is ~0.5M tokens: ~230 windows of 2,048
# for testing and enough for SliceGPT's default 128 x 2,048 calibration tokens.
C4_SAMPLE_EVAL_DOCS = 1000
# GPTQ's reference C4 test text is the first 1,100 documents of this validation shard.
C4_HUB_EVAL_DOCS = 1100
C4_HUB_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"  # the shard GPTQ calibrates on
C4_HUB_VALIDATION_SHARD = "en/c4-validation.00000-of-00008.json.gz"

# Stanford Alpaca prompt templates; the hub's `tatsu-lab/alpaca` "text" column is
# template + "\n" + output, and we rebuild exactly that from the local instruction/input/output file.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)

DOC_SEPARATOR = "\n\n"  # between rows/documents, in test text and in calibration streams alike


@dataclass(frozen=True)
class _HubSplit:
    """Arguments of one `datasets.load_dataset` call, and the text column to read."""

    path: str
    split: str
    column: str
    name: str | None = None
    data_files: dict[str, str] | None = None

    def describe(self) -> str:
        return f"{self.path}{'/' + self.name if self.name else ''} ({self.split})"


HUB = {
    ("wikitext2", "train"): _HubSplit("Salesforce/wikitext", "train", "text", name="wikitext-2-raw-v1"),
    ("wikitext2", "test"): _HubSplit("Salesforce/wikitext", "test", "text", name="wikitext-2-raw-v1"),
    ("ptb", "train"): _HubSplit("ptb-text-only/ptb_text_only", "train", "sentence", name="penn_treebank"),
    ("ptb", "test"): _HubSplit("ptb-text-only/ptb_text_only", "test", "sentence", name="penn_treebank"),
    ("c4", "train"): _HubSplit("allenai/c4", "train", "text", data_files={"train": C4_HUB_TRAIN_SHARD}),
    ("c4", "test"): _HubSplit("allenai/c4", "validation", "text", data_files={"validation": C4_HUB_VALIDATION_SHARD}),
    ("alpaca", "train"): _HubSplit("tatsu-lab/alpaca", "train", "text"),
}


# --------------------------------------------------------------------------------------------------
# Where the data lives


REPO_ROOT = Path(__file__).resolve().parents[2]  # src/slicelm/io/data.py -> the checkout, when installed from one


def default_data_dir() -> Path | None:
    """``../shared/data`` beside a source checkout of slicelm (the project's offline data), if present."""
    candidate = REPO_ROOT.parent / "shared" / "data"
    if (REPO_ROOT / "pyproject.toml").is_file() and candidate.is_dir():
        return candidate
    return None


def resolve_data_dir(flag: str | Path | None) -> Path | None:
    """The data dir to read: ``flag``, else ``$SLICELM_DATA_DIR``, else ``../shared/data`` beside a
    source checkout, else None (use the hub)."""
    value = flag if flag not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if value is None:
        return default_data_dir()
    path = Path(value).expanduser()
    if not path.is_dir():
        origin = "--data-dir" if flag not in (None, "") else f"${DATA_DIR_ENV}"
        raise SlicelmError(f"data dir {path} ({origin}) does not exist; give a folder laid out like SOURCES.md")
    return path


def _local_file(data_dir: Path, relative: str, what: str, hub: _HubSplit | None) -> Path:
    path = data_dir / relative
    if not path.is_file():
        online = f", or unset --data-dir/${DATA_DIR_ENV} to download {hub.describe()}" if hub else ""
        raise SlicelmError(f"{what} needs {path}; put {relative} in the data dir{online}")
    return path


def _hub_column(hub: _HubSplit, limit: int | None = None) -> list[str]:
    """One text column of a hub dataset; any failure (offline, gated, renamed) becomes one line."""
    online = prepare_hub()
    try:
        from datasets import load_dataset  # heavy (~0.8 s): imported when hub data is used

        ds = load_dataset(hub.path, hub.name, split=hub.split, data_files=hub.data_files)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        return list(ds[hub.column])
    except Exception as exc:  # datasets raises many unrelated types; all of them mean "cannot load"
        reason = first_line(exc) if online else "the hub is unreachable and it is not in the local cache"
        raise SlicelmError(
            f"cannot load {hub.describe()} from the Hugging Face hub ({reason}); "
            f"use --data-dir/${DATA_DIR_ENV} with a local copy"
        ) from None


# --------------------------------------------------------------------------------------------------
# Rows of each corpus, in the Hugging Face `datasets` form


def wikitext_rows(path: str | Path) -> list[str]:
    """Rows of a ``wiki.*.raw`` file exactly as HF ``wikitext-2-raw-v1`` has them.

    One row per line *with* its trailing ``"\\n"``; whitespace-only lines become ``""``.
    (Check: ``"\\n".join(rows)`` of the test file is 1,292,013 bytes, the size SOURCES.md gives
    for the HF-row dump, which only holds if non-empty rows keep their newline.)
    """
    # Text mode with universal newlines, as the HF builder read the file.
    with open(path, encoding="utf-8") as fh:
        return [line if line.strip() else "" for line in fh]


def ptb_sentences(path: str | Path) -> list[str]:
    """Rows of a ``ptb.*.txt`` file as HF ``ptb_text_only`` has them: each line ``.strip()``-ed.

    The HF builder strips both ends, so the leading space of every PTB line goes too.
    """
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh]


def c4_sample_documents(path: str | Path) -> list[str]:
    """The ``text`` column of the local C4 sample parquet, in file order."""
    import pyarrow.parquet as pq  # heavy: imported when the local C4 sample is read

    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def alpaca_texts(path: str | Path) -> list[str]:
    """Alpaca records (JSON list of instruction/input/output) as HF ``tatsu-lab/alpaca`` "text"."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
        texts = []
        for rec in records:
            template = ALPACA_PROMPT_WITH_INPUT if rec.get("input") else ALPACA_PROMPT_NO_INPUT
            prompt = template.format(instruction=rec["instruction"], input=rec.get("input", ""))
            texts.append(f"{prompt}\n{rec['output']}")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise SlicelmError(f"{path} is not an Alpaca JSON list of instruction/input/output ({exc})") from None
    return texts


# --------------------------------------------------------------------------------------------------
# Test text


def eval_text(name: str, data_dir: str | Path | None = None) -> str:
    """The whole test text of ``name`` (one of `EVAL_SETS`), rows joined with ``"\\n\\n"``.

    * wikitext2: the 4,358 rows of the test split (``wiki.test.raw``), the standard benchmark text.
    * ptb: the 3,761 test sentences. SliceGPT joins the HF ``sentence`` column with ``"\\n\\n"``
      and so do we (GPTQ joins with ``" "``; its numbers are therefore not directly comparable).
    * c4: offline, the first `C4_SAMPLE_EVAL_DOCS` documents of the local 2k-document C4
      validation *sample* (not verified to be GPTQ's reference documents, so numbers are C4-like,
      not comparable to papers); online, GPTQ's first 1,100 documents of validation shard 0.
    """
    if name not in EVAL_SETS:
        raise SlicelmError(f"unknown evaluation dataset {name!r}; use one of {', '.join(EVAL_SETS)}")
    root = resolve_data_dir(data_dir)
    hub = HUB[(name, "test")]
    what = f"{name} evaluation"
    if name == "wikitext2":
        rows = wikitext_rows(_local_file(root, WIKITEXT2_TEST, what, hub)) if root else _hub_column(hub)
    elif name == "ptb":
        rows = ptb_sentences(_local_file(root, PTB_TEST, what, hub)) if root else _hub_column(hub)
    else:  # c4
        if root:
            rows = c4_sample_documents(_local_file(root, C4_SAMPLE, what, hub))[:C4_SAMPLE_EVAL_DOCS]
        else:
            rows = _hub_column(hub, limit=C4_HUB_EVAL_DOCS)
    return DOC_SEPARATOR.join(rows)


def load_eval_ids(name: str, tokenizer: PreTrainedTokenizerBase, data_dir: str | Path | None = None) -> torch.Tensor:
    """Token ids of the whole test text of ``name``: a 1-D LongTensor of shape ``(N,)``.

    Tokenized once with ``tokenizer(text)`` (special tokens on), the GPTQ/SliceGPT convention: a
    BOS-adding tokenizer contributes one BOS at position 0 and nowhere else.
    """
    text = eval_text(name, data_dir)
    ids = tokenizer(text, verbose=False)["input_ids"]  # verbose=False: no "longer than max" warning
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# Calibration


def load_calibration(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    n_samples: int,
    seqlen: int,
    seed: int = 0,
    data_dir: str | Path | None = None,
    packed: bool = False,
) -> list[torch.Tensor]:
    """``n_samples`` calibration sequences, each a 1-D LongTensor of shape ``(L_i,)``, ``L_i <= seqlen``.

    ``source`` is a name in `CALIBRATION_SETS` or a path to a ``.txt`` (plain text) or ``.jsonl``
    (one JSON object with a ``"text"`` field per line) file. No padding is added: the caller pads
    and masks. The result depends only on the data, the tokenizer, the arguments and ``seed``.

    How samples are drawn:

    * Running text (ptb, wikitext2 train, ``.txt``): the text is tokenized once and cut into a grid
      of non-overlapping windows (at a seeded random offset); ``n_samples`` windows are drawn
      without replacement. Each sample is therefore exactly ``seqlen`` tokens and no token is
      counted twice in the covariance, unlike GPTQ's independent random starts.
    * Documents (c4, ``.jsonl``): documents are shuffled with the seed and concatenated with
      ``"\\n\\n"`` until there are enough tokens, then cut into consecutive windows of ``seqlen``.
      A window may span documents (as in SliceGPT); GPTQ's "a random document longer than
      ``seqlen``" would leave only ~65 usable documents in the local 2k C4 sample at 2,048.
      Only as many documents as needed are tokenized (the 356k-document hub shard is not).
    * alpaca: ``n_samples`` distinct records, each tokenized alone and truncated to ``seqlen``, so
      lengths vary (this is what exercises padding downstream). With ``packed=True`` (training, where
      padding is compute spent on nothing) records are treated as documents: every window is full.

    Calibration never reads a test split: wikitext2 needs ``wiki.train.raw`` (absent from the
    offline data folder), and offline c4 uses only the documents that `eval_text` does not. A
    ``.txt``/``.jsonl`` file that contains an evaluation text (`slicelm.io.fingerprint`) is refused.
    """
    if n_samples < 1:
        raise SlicelmError(f"the number of calibration samples must be at least 1, got {n_samples}")
    if seqlen < 2:
        raise SlicelmError(f"the calibration sequence length must be at least 2, got {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    prefix = _special_prefix(tokenizer)
    body = seqlen - len(prefix)  # text tokens per window, after the BOS-like prefix
    if body < 1:
        raise SlicelmError(f"calibration sequence length {seqlen} leaves no room for text after {prefix}")

    kind, label, payload = _calibration_corpus(source, data_dir)
    if kind == "records" and not packed:
        return _record_samples(payload, label, tokenizer, n_samples, seqlen, gen)
    if kind == "text":
        stream = _tokenize_plain(tokenizer, payload)
    else:
        stream = _document_stream(payload, tokenizer, n_samples * body, gen)
    return _windows(stream, prefix, body, n_samples, gen, label)


def _calibration_corpus(source: str, data_dir: str | Path | None) -> tuple[str, str, Any]:
    """``(kind, label, payload)``: kind "text" (one str), "documents" or "records" (list of str).

    Documents are returned as a list (not loaded lazily) because shuffling needs their count.
    """
    suffix = Path(source).suffix.lower()
    if suffix in (".txt", ".jsonl"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise SlicelmError(f"calibration file {path} does not exist")
        try:
            if suffix == ".txt":
                corpus = "text", str(path), path.read_text(encoding="utf-8")
            else:
                corpus = "documents", str(path), _jsonl_texts(path)
        except UnicodeDecodeError as exc:
            raise SlicelmError(
                f"calibration file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it to UTF-8"
            ) from None
        # A user's file may hold (part of) a test text: compared with the shipped fingerprint, no data dir needed.
        check_not_eval_text(corpus[2] if suffix == ".txt" else DOC_SEPARATOR.join(corpus[2]), str(path))
        return corpus
    if source not in CALIBRATION_SETS:
        hint = " (local files must end in .txt or .jsonl)" if Path(source).exists() else ""
        raise SlicelmError(
            f"unknown calibration dataset {source!r}{hint}; "
            f"use one of {', '.join(CALIBRATION_SETS)} or a .txt/.jsonl file"
        )

    root = resolve_data_dir(data_dir)
    hub = HUB[(source, "train")]
    what = f"{source} calibration"
    if source == "wikitext2":
        if root is None:
            return "text", source, DOC_SEPARATOR.join(_hub_column(hub))
        if not (root / WIKITEXT2_TRAIN).is_file():
            # The offline folder only has the *test* split, and calibrating on test text is not allowed.
            raise SlicelmError(
                f"wikitext2 calibration needs the train split {root / WIKITEXT2_TRAIN} (never the test "
                f"split); calibrate on c4, alpaca or ptb instead, or unset --data-dir/${DATA_DIR_ENV}"
            )
        return "text", source, DOC_SEPARATOR.join(wikitext_rows(root / WIKITEXT2_TRAIN))
    if source == "ptb":
        sentences = ptb_sentences(_local_file(root, PTB_TRAIN, what, hub)) if root else _hub_column(hub)
        return "text", source, DOC_SEPARATOR.join(sentences)
    if source == "c4":
        if root:
            docs = c4_sample_documents(_local_file(root, C4_SAMPLE, what, hub))[C4_SAMPLE_EVAL_DOCS:]
        else:
            docs = _hub_column(hub)
        return "documents", source, docs
    # alpaca
    texts = alpaca_texts(_local_file(root, ALPACA, what, hub)) if root else _hub_column(hub)
    return "records", source, texts


def describe_calibration_source(source: str, data_dir: str | Path | None = None) -> str:
    """Which text :func:`load_calibration` reads for ``source``, in words (for reports and docs)."""
    root = resolve_data_dir(data_dir)
    if source not in CALIBRATION_SETS:
        return f"local file {Path(source).expanduser()}"
    if root is None:
        hub = HUB[(source, "train")]
        shard = f", {hub.data_files['train']}" if hub.data_files else ""
        return f"{hub.describe()}{shard} from the Hugging Face hub"
    return {
        "c4": f"C4 validation sample {C4_SAMPLE}, documents {C4_SAMPLE_EVAL_DOCS} onward (the first "
        f"{C4_SAMPLE_EVAL_DOCS} are slicelm's c4 test text; no C4 train shard offline)",
        "ptb": f"PTB train split {PTB_TRAIN}",
        "wikitext2": f"WikiText-2 train split {WIKITEXT2_TRAIN}",
        "alpaca": f"Alpaca subset {ALPACA}",
    }[source]


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue  # tolerate blank lines, e.g. a trailing one
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SlicelmError(f"{path}:{lineno} is not valid JSON ({exc.msg}); give one object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise SlicelmError(f'{path}:{lineno} has no string "text" field; each line must be {{"text": ...}}')
            texts.append(record["text"])
    return texts


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special-token ids ``tokenizer(text)`` puts before any text (e.g. ``[bos]``, or ``[]``)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def _tokenize_plain(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Token ids of ``text`` without special tokens: shape ``(N,)``."""
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def _document_stream(
    docs: Sequence[str], tokenizer: PreTrainedTokenizerBase, need: int, gen: torch.Generator
) -> torch.Tensor:
    """Shuffled documents joined by the separator, tokenized until ``need`` tokens: shape ``(N,)``.

    Documents are tokenized one by one (in batches, for speed) and joined with the separator's
    ids, which can differ from tokenizing the joined text only at the seams.
    """
    sep = tokenizer(DOC_SEPARATOR, add_special_tokens=False)["input_ids"]
    pieces: list[list[int]] = []
    total = 0
    for ids in _tokenize_in_order(docs, torch.randperm(len(docs), generator=gen).tolist(), tokenizer):
        if not ids:
            continue
        if pieces:
            pieces.append(sep)
            total += len(sep)
        pieces.append(ids)
        total += len(ids)
        if total >= need:
            break
    return torch.tensor([t for piece in pieces for t in piece], dtype=torch.long)


def _tokenize_in_order(
    docs: Sequence[str], order: Sequence[int], tokenizer: PreTrainedTokenizerBase, batch: int = 64
) -> Iterator[list[int]]:
    for start in range(0, len(order), batch):
        chunk = [docs[i] for i in order[start : start + batch]]
        chunk = [d if d.strip() else "" for d in chunk]  # whitespace-only documents carry nothing
        yield from tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]


def _windows(
    stream: torch.Tensor, prefix: list[int], body: int, n_samples: int, gen: torch.Generator, label: str
) -> list[torch.Tensor]:
    """``n_samples`` windows ``prefix + stream[a : a + body]`` from a non-overlapping grid.

    stream: ``(N,)`` token ids. Returns tensors of shape ``(len(prefix) + body,)``.
    """
    n_windows = stream.numel() // body
    if n_windows < n_samples:
        raise SlicelmError(
            f"{label} has {stream.numel():,} tokens, only {n_windows} windows of {body + len(prefix)} "
            f"tokens, but {n_samples} samples were asked for; lower the sample count or the length"
        )
    # A random grid offset (within the ragged tail) so different seeds also see different cuts.
    slack = stream.numel() - n_windows * body
    offset = int(torch.randint(0, slack + 1, (1,), generator=gen))
    picks = torch.randperm(n_windows, generator=gen)[:n_samples].tolist()
    head = torch.tensor(prefix, dtype=torch.long)
    return [torch.cat([head, stream[offset + i * body : offset + (i + 1) * body]]) for i in picks]


def _record_samples(
    texts: Sequence[str],
    label: str,
    tokenizer: PreTrainedTokenizerBase,
    n_samples: int,
    seqlen: int,
    gen: torch.Generator,
) -> list[torch.Tensor]:
    """``n_samples`` distinct records, each ``tokenizer(text)`` truncated to ``seqlen``: shapes ``(L_i,)``."""
    if len(texts) < n_samples:
        raise SlicelmError(f"{label} has {len(texts)} records, fewer than the {n_samples} samples asked for")
    picks = torch.randperm(len(texts), generator=gen)[:n_samples].tolist()
    encoded = tokenizer([texts[i] for i in picks], verbose=False)["input_ids"]
    samples = [torch.tensor(ids[:seqlen], dtype=torch.long) for ids in encoded]
    if any(s.numel() == 0 for s in samples):
        raise SlicelmError(f"{label} contains empty records; remove them")
    return samples
