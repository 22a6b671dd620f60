"""Device, dtype and model set-up shared by the commands."""

from __future__ import annotations

import torch

from .config import Config


def resolve_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """`auto` means bfloat16 on GPU and float32 on CPU (CPU bf16 matmuls are slow and less exact)."""
    name = cfg.model.dtype
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def quiet_libraries() -> None:
    """Our own progress display replaces the libraries' bars and info logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
