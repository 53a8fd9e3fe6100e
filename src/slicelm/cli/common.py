"""Helpers shared by the sub-commands: quiet libraries, the device flag, one place for each."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import warnings


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
        import transformers

        transformers.utils.logging.set_verbosity_error()
        if not progress:
            transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - a hard dependency
        pass
    if not progress:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        try:
            import huggingface_hub.utils

            huggingface_hub.utils.disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass
        try:
            import datasets

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
