"""Loading a checkpoint named by a hub id: from the local Hugging Face cache first, and a clear error in
seconds when it is not cached and the hub cannot be reached (transformers alone retries for minutes before it
says so: 2 min 24 s for a processor, measured on a machine without network)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError

HUB_PROBE_TIMEOUT_S = 5.0


class ModelError(UserError):
    """model.path does not hold a loadable checkpoint of a known family (config, processor or weights); the
    message names the path."""


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (one line), or None when it answers."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        httpx.head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except httpx.HTTPError as e:
        return f"{endpoint} cannot be reached ({type(e).__name__})"
    return None


def load_local_first(load, path: str, what: str, error):
    """`load(path, **kw)` (a `from_pretrained`) from a local directory, else from the hub's local cache, else
    from the hub when it answers; otherwise `error` (an exception class) naming the path and what to do."""
    if Path(path).exists():
        return load(path)
    try:
        return load(path, local_files_only=True)
    except OSError:
        pass
    reason = hub_unreachable()
    if reason is not None:
        raise error(f"model.path {path!r}: its {what} is not in the local Hugging Face cache and the hub "
                    f"cannot be reached: {reason}. Download it where there is network (`hf download {path}`, "
                    "then copy the cache), or set model.path to a local directory") from None
    return load(path)
