"""Every change vlrl makes to transformers' Qwen3-VL and Qwen3.5, in one place and in the order it is applied.

1. `share_repeated_images` (shared_images.py): hooks on the vision tower encode each distinct image once.
   First, so the hooks after it see the images actually encoded.
2. `fast_vision` (fast_vision.py): the vision tower's grid-derived inputs from the host, its attention
   registered as `vlrl_flash_vision_sdpa` (equal-size images in one sdpa call), the patch embedding as a
   matmul.
3. `patch_language_model` (packing.py): the language model's attention registered as `vlrl_packed_sdpa`:
   transformers' sdpa for padded batches, varlen/flex/per-sample sdpa for packed ones; a pre-hook hands
   the packing keywords to the language model only. A hybrid model's linear-attention layers (Qwen3.5's
   Gated DeltaNet) get the sample boundaries for their conv1d and delta rule (linear_attention.py).
4. `patch_deepstack` (deepstack.py): the vision features added at the image tokens' positions through integer
   indices found without a host read (transformers' boolean index waits for the GPU, forward and backward).

Each is idempotent and leaves a model it does not support (another attention implementation, an older
transformers) as transformers built it. `Qwen3VLAdapter.load_model` and the benches call `patch_model`.
"""

from __future__ import annotations

from torch import nn

from .deepstack import patch_deepstack
from .fast_vision import fast_vision
from .packing import patch_language_model
from .shared_images import share_repeated_images


def patch_model(model: nn.Module, vision: bool = True) -> nn.Module:
    """Apply vlrl's patches to a Qwen3-VL model (`vision=False`: leave the vision tower as transformers
    built it, the benches' `--host-syncs` baseline)."""
    share_repeated_images(model.model.visual)
    if vision:
        fast_vision(model.model.visual)
    patch_language_model(model.model.language_model)
    patch_deepstack(model.model.language_model)
    return model
