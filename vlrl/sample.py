"""The dataset record: data sources produce it, rewards score it, environments act on it; below all three.

Standard library only: the reward worker processes (rewards/pool.py) import it, and they stay free of torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Sample:
    """One prompt of a dataset, with the answer its rewards check."""

    id: str
    question: str
    answer: Any = None
    images: list[Any] = field(default_factory=list)
    """Image sources (paths, URLs, data URIs, base64, PIL images), shown before the question."""
    videos: list[Any] = field(default_factory=list)
    """Video sources (video files by path, URL, data URI or base64; lists of frames; `{"frames", "fps"}`),
    shown after the images."""
    base_dir: Path | None = None
    """Directory relative image paths resolve against (the data file's directory)."""
    history: list[dict] | None = None
    """Earlier chat turns (multi-turn prompts), text only, before the question's user turn."""
    meta: dict = field(default_factory=dict)
