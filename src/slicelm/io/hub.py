"""The Hugging Face hub, when it cannot be reached: fail in a second, not after minutes of retries.

Offline, ``transformers`` takes ~30 s to give up on a hub id and ``datasets`` retries five times.
Before slicelm first reaches for the hub it checks, once per process, that the hub's host answers;
if it does not, the process switches the hub libraries to offline mode. Files already in the local
cache keep working, and anything missing fails at once with the usual one-line error.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

_REACHABLE: bool | None = None
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def offline_requested() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in OFFLINE_ENV)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a TCP connection (checked once per process)."""
    global _REACHABLE
    if _REACHABLE is None:
        if offline_requested():
            _REACHABLE = False
        else:
            try:
                socket.create_connection(_endpoint(), timeout=timeout).close()
                _REACHABLE = True
            except OSError:
                _REACHABLE = False
    return _REACHABLE


def prepare_hub() -> bool:
    """Call before using the hub: returns whether it is reachable, and goes offline if not."""
    if hub_reachable():
        return True
    set_offline()
    return False


def set_offline() -> None:
    """Switch huggingface_hub, transformers and datasets to offline mode for this process."""
    for key in OFFLINE_ENV:
        os.environ[key] = "1"
    try:
        import huggingface_hub.constants as hub_constants  # hub internals: touched only when going offline

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - a dependency of transformers
        pass
    try:
        import datasets.config as datasets_config  # heavy (~0.8 s): imported only to switch it offline

        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True
    except ImportError:
        pass
