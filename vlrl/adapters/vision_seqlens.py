"""The vision tower's per-image attention boundaries, computed on the host once per call.

transformers' Qwen3-VL vision attention (sdpa and eager) splits every block's q, k and v by image with
`cu_seqlens.tolist()`. With `cu_seqlens` on the GPU that is three host syncs per block (81 for the 8B's 27
blocks), and the tower runs at the pace of the host relaunching work after each one. transformers 5.19 takes a
precomputed `cu_seqlens` keyword (`vision_utils.get_vision_cu_seqlens`); a hook passes one that lives on the
CPU, so those reads cost nothing. Flash attention wants them on the GPU and is left alone, and so are
transformers versions without the keyword.
"""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import nn


def supported() -> bool:
    """Whether this transformers reads a precomputed `cu_seqlens` in the Qwen3-VL vision tower."""
    try:
        from transformers.models.qwen3_vl import modeling_qwen3_vl
        from transformers.vision_utils import get_vision_cu_seqlens  # noqa: F401
    except ImportError:
        return False
    return hasattr(modeling_qwen3_vl, "get_vision_attention_seqlens")


def keep_seqlens_on_host(visual: nn.Module) -> bool:
    """Hook `visual` (register after any hook that rewrites its images). Returns whether it was hooked."""
    if getattr(visual, "_vlrl_host_seqlens", False) or not supported():
        return False
    visual.register_forward_pre_hook(_before, with_kwargs=True)
    visual._vlrl_host_seqlens = True
    return True


def _before(module, args, kwargs):
    if "cu_seqlens" in kwargs or module.config._attn_implementation not in ("sdpa", "eager"):
        return None
    grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
    if grid is None:
        return None
    lengths = [h * w for t, h, w in grid.tolist() for _ in range(t)]  # one segment per frame
    cu_seqlens = torch.tensor([0, *accumulate(lengths)], dtype=torch.int32)
    return args, {**kwargs, "cu_seqlens": cu_seqlens}
