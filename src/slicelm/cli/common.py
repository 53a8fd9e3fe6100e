"""Helpers shared by the sub-commands: quiet libraries, the device flag, one place for each."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import warnings
from typing import Any

from slicelm.errors import SlicelmError


def add_device_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, what: str) -> None:
    parser.add_argument(
        "--device",
        default=None,
        help=f"where to {what}: cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)",
    )


def quiet_libraries(progress: bool = True) -> None:
    """Keep stderr for slicelm's own lines: library warnings off, and library progress bars too
    unless ``progress``. (transformers' GGUF/loading/writing bars ignore slicelm's ``--quiet``
    otherwise.)"""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("lm_eval", "lm-eval", "transformers.modeling_utils", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers  # here, not at the top: this module stays light for --help

        transformers.utils.logging.set_verbosity_error()
        if not progress:
            transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - a hard dependency
        pass
    if not progress:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        try:
            import huggingface_hub.utils  # as transformers above

            huggingface_hub.utils.disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass
        try:
            import datasets  # heavy (~0.8 s), and only its progress bars are touched

            datasets.disable_progress_bars()
        except ImportError:
            pass


# errno values that mean the disk, not slicelm, refused a write: no space, over quota, read-only
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def disk_refusal(exc: BaseException) -> str | None:
    """In words, why the disk refused a write (``exc`` is an OSError, or safetensors' error that wraps
    one, such as "No space left on device (os error 28)"); None for any other exception."""
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or os.strerror(exc.errno)}{where}"
    if type(exc).__name__ == "SafetensorError":
        for code in _DISK_ERRNOS:
            if f"os error {code})" in str(exc):
                return os.strerror(code)
    return None


def fit_batch_size(model_config: Any, dtype: Any, seqlen: int, batch: int | None, default: int, flag: str) -> int:
    """The batch size to score with: ``batch`` if given and it fits in the memory available (else one
    line that names the largest that does), or the largest up to ``default`` that fits. Checked from the
    config alone, before the weights are loaded (the memory preflight of ``slice``, for ``ppl``/``eval``)."""
    # imported when used: cli commands import this module for --help, where torch is not needed
    from slicelm.core.resources import available_memory_bytes
    from slicelm.io.memory import estimate_forward_bytes, forward_bytes_per_token

    available = available_memory_bytes()
    wanted = default if batch is None else batch
    if available is None:
        return wanted
    fixed = estimate_forward_bytes(model_config, dtype, 0, seqlen)  # weights and runtime
    per_window = seqlen * forward_bytes_per_token(model_config, dtype, seqlen)
    largest = int((0.9 * available - fixed) // per_window)
    gib = 2**30
    if largest < 1:
        raise SlicelmError(
            f"one window of {seqlen} tokens needs about {(fixed + per_window) / gib:.1f} GiB and "
            f"{available / gib:.1f} GiB are available; lower the window length or free memory"
        )
    if batch is not None and largest < batch:
        raise SlicelmError(
            f"{flag} {batch} of {seqlen}-token windows needs about {(fixed + batch * per_window) / gib:.1f} GiB "
            f"and {available / gib:.1f} GiB are available; use {flag} {largest} or less"
        )
    return min(wanted, largest)
