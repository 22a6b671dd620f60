"""Deepstack without host reads: Qwen3-VL adds the vision tower's intermediate features to the hidden states
of the first language-model layers at the image tokens' positions.

transformers indexes with the boolean mask of those positions (`hidden_states[mask, :] += features`), and a
boolean index is a `nonzero` whose size the host must read: one wait for the GPU per use, forward and
backward, nine per micro-batch on Qwen3-VL's three deepstack layers (each drains the GPU's queue; measured on
an H100, bench/README.md). The positions' count is the features' row count, known on the host, so
`nonzero_static` finds them without a read, and the add goes through integer indices (a gather and an
`index_put`, whose backward gathers too). The same sums in the same order: bit-identical to transformers'
(tests/test_fast_path.py).
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _deepstack_process(self, hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor,
                       visual_embeds: torch.Tensor) -> torch.Tensor:
    visual_embeds = visual_embeds.to(hidden_states.device, hidden_states.dtype)
    mask = visual_pos_masks.to(hidden_states.device).reshape(-1)
    # the features come in the mask's row-major order, one row per True
    index = torch.nonzero_static(mask, size=visual_embeds.shape[0]).squeeze(-1)
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    return flat.index_put((index,), flat.index_select(0, index) + visual_embeds).view_as(hidden_states)


def patch_deepstack(language_model: nn.Module) -> nn.Module:
    """Give a Qwen3-VL (dense or MoE) language model the host-read-free deepstack add; a model without
    deepstack (Qwen3.5) is left as it is."""
    if hasattr(type(language_model), "_deepstack_process"):
        language_model._deepstack_process = types.MethodType(_deepstack_process, language_model)
    return language_model
