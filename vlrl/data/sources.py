"""Where a run's samples come from, chosen by `env.dataset`: a built-in task or a data file (see files.py)."""

from __future__ import annotations

from ..config import EnvConfig
from ..sample import Sample
from .builtin import builtin_split
from .files import load_file_split


def load_samples(cfg: EnvConfig, split: str, seed: int = 0) -> list[Sample]:
    """The samples of `split` ("train" or "eval") of the configured dataset."""
    if cfg.dataset.startswith("builtin:"):
        n = cfg.train_size if split == "train" else cfg.eval_size
        return builtin_split(cfg.dataset.removeprefix("builtin:"), split, n, cfg.image_size, seed)
    return load_file_split(cfg, split, seed)
