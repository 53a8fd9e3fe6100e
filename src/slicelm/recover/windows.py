"""Training data: disjoint training and held-out windows of one source (never the WikiText-2 test text, the
evaluation text), and the held-out batches each process scores."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from slicelm.core.calibration import pad_batches
from slicelm.errors import SlicelmError
from slicelm.io.data import describe_calibration_source, eval_text, load_calibration, resolve_data_dir
from slicelm.recover.config import FinetuneConfig
from slicelm.recover.parallel import Processes


def training_windows(
    source: str,
    tokenizer,
    config: FinetuneConfig,
    data_dir: str | Path | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, Any]]:
    """(training windows, held-out windows, description). Disjoint windows of one source.

    The WikiText-2 test text is refused, by name and by content (a file that contains it).
    """
    check_not_test_text(source, data_dir)
    train_count = config.total_steps() * config.windows_per_step
    try:
        windows = load_calibration(
            source,
            tokenizer,
            n_samples=train_count + config.eval_windows,
            seqlen=config.seqlen,
            seed=config.seed,
            data_dir=data_dir,
            packed=True,
        )
    except SlicelmError as exc:  # slicelm.io.data speaks of calibration; here the text is training data
        raise SlicelmError(_as_training(str(exc))) from None
    heldout, train_windows = windows[: config.eval_windows], windows[config.eval_windows :]
    data = {
        "source": source,
        "text": describe_calibration_source(source, data_dir),
        "train_windows": len(train_windows),
        "heldout_windows": len(heldout),
        "seqlen": config.seqlen,
        "seed": config.seed,
    }
    return train_windows, heldout, data


def _as_training(message: str) -> str:
    """A data-loading message in the words of training rather than calibration."""
    for old, new in (("calibration", "training"), ("calibrate on", "train on"), ("calibrating", "training")):
        message = message.replace(old, new)
    return message


def check_not_test_text(source: str, data_dir: str | Path | None) -> None:
    """Refuse training on WikiText-2 test text (the evaluation text): named, or inside a file."""
    if source.lower() in ("wikitext2-test", "wikitext2_test", "wiki.test.raw"):
        raise SlicelmError("the WikiText-2 test split is the evaluation text; train on c4, alpaca, ptb or a file")
    path = Path(source).expanduser()
    if not path.is_file():
        return
    root = resolve_data_dir(data_dir)
    if root is None:
        return  # no local copy of the test text to compare with
    try:
        test = eval_text("wikitext2", root)
    except SlicelmError:
        return
    with contextlib.suppress(UnicodeDecodeError):
        text = path.read_text(encoding="utf-8")
        if _overlaps(text, test):
            raise SlicelmError(
                f"{path} contains WikiText-2 test text, the evaluation text; train on c4, alpaca, ptb or other text"
            )


def _overlaps(text: str, reference: str, probes: int = 32, width: int = 80) -> bool:
    """Whether most of ``probes`` evenly spaced ``width``-character pieces of ``text`` occur in ``reference``."""
    pieces = [text[i : i + width] for i in range(0, max(len(text) - width, 1), max(len(text) // probes, 1))]
    pieces = [p for p in pieces if len(p.strip()) >= width // 2]
    if not pieces:
        return False
    return sum(p in reference for p in pieces) >= max(3, len(pieces) // 4)


def own_batches(windows, pad_id: int, config: FinetuneConfig, processes: Processes):
    """The held-out batches this process scores: every ``world``-th, from its rank on."""
    for index, batch in enumerate(pad_batches(windows, config.batch_size, pad_id)):
        if index % processes.world == processes.rank:
            yield batch
