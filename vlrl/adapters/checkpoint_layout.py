"""Weights in the layout checkpoints hold them, for vLLM and for checkpoints vLLM serves.

transformers 5.x keeps some weights in another layout in memory than on disk: Qwen3-VL-MoE's fused experts
are [E, 2I, H] (`gate_up_proj`) and [E, H, I] (`down_proj`) in memory, [E, H, 2I] and [E, I, H] in the
checkpoint (its conversion mapping transposes them on load). Its `save_pretrained` reverts that with a
transpose that compares the tensor's shape with the model's parameter and, the shapes being equal, leaves
the tensor as it is (transformers 5.19: a saved Qwen3-VL-MoE holds the in-memory layout), and vLLM 0.32 reads
the experts in the checkpoint layout (`is_fused_checkpoint_transposed`), so a weight sync or checkpoint
written that way would load transposed (or fail on the shapes). Here the model's own conversion mapping says
which tensors to transpose, so nothing family-specific is named.
"""

from __future__ import annotations

import re

import torch


def checkpoint_transposes(model) -> list[tuple[re.Pattern, int, int]]:
    """(name pattern, dim0, dim1) of every tensor whose checkpoint layout is its in-memory one transposed."""
    cached = getattr(model, "_vlrl_transposes", None)
    if cached is not None:
        return cached
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import Transpose, WeightConverter

    out = []
    for conv in get_model_conversion_mapping(model, add_legacy=False):
        ops = getattr(conv, "operations", None) or []
        if isinstance(conv, WeightConverter) and len(ops) == 1 and isinstance(ops[0], Transpose):
            out += [(re.compile(re.escape(p)), ops[0].dim0, ops[0].dim1) for p in conv.target_patterns]
    model._vlrl_transposes = out
    return out


def to_checkpoint(name: str, tensor: torch.Tensor, transposes) -> torch.Tensor:
    """`tensor` (named `name`) in its checkpoint layout (a transposed view where the layouts differ)."""
    for pattern, d0, d1 in transposes:
        if pattern.search(name):
            return tensor.transpose(d0, d1)
    return tensor


def checkpoint_state(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in the checkpoint layout (contiguous tensors: safetensors writes no views)."""
    transposes = checkpoint_transposes(model)
    if not transposes:
        return state
    return {k: (v2.contiguous() if (v2 := to_checkpoint(k, v, transposes)) is not v else v)
            for k, v in state.items()}
