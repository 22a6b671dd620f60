"""Files replaced atomically: written beside their final name, then renamed over it, so a reader (or a run
killed mid-write) sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str, durable: bool = False) -> Path:
    """Write `text` to `path` through a hidden temporary file; `durable` also fsyncs it before the rename
    (what the checkpoint's `latest` pointer needs to survive a power cut)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
