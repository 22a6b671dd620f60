"""Qwen3.5 (dense): natively multimodal, hybrid attention. What differs from Qwen3-VL, and so what this
adapter changes, is small; everything else is `Qwen3VLAdapter`'s, unchanged.

Same as Qwen3-VL (transformers 5.19 builds both from the same parts): the processor (`Qwen3VLProcessor`:
patch 16, merge 2, temporal patch 2, `<|image_pad|>` / `<|video_pad|>` placeholders, timestamped video frame
pairs), M-RoPE positions (`get_rope_index` is Qwen3-VL's; `mrope.py` builds them on the host), the batch,
`mm_token_type_ids`, the placeholder-sampling guard, LoRA, the tied/untied head, checkpointing.

Different:
- the decoder: 3 of every 4 layers are Gated DeltaNet (linear attention: causal conv1d + gated delta rule,
  a recurrent state), the 4th gated full attention with partial M-RoPE (a quarter of each head rotated).
  Packed micro-batches reach the linear layers' boundaries through `linear_attention.py`, applied with the
  rest of vlrl's patches (`patches.py`), so the adapter itself holds nothing about them;
- the vision tower has no deepstack (its merger output only);
- the chat template thinks by default (`<think>\\n` opens the reply) and writes tool calls as XML
  (`<tool_call>\\n<function=NAME>\\n<parameter=...`); the checkpoint's own template is used as it is;
- FSDP2 units are `Qwen3_5DecoderLayer` and `Qwen3_5VisionBlock`.
"""

from __future__ import annotations

from .lora import ATTENTION_AND_MLP
from .qwen3_vl import Qwen3VLAdapter

FSDP_UNITS = ("Qwen3_5DecoderLayer", "Qwen3_5VisionBlock")


class Qwen3_5Adapter(Qwen3VLAdapter):
    """Qwen3.5 dense checkpoints (`model_type == "qwen3_5"`)."""

    family = "Qwen3.5"
    fsdp_units = FSDP_UNITS
    # LoRA by default on the full-attention, Gated DeltaNet and MLP projections (the conv1d and the tiny
    # per-head a/b projections stay frozen)
    lora_targets = ATTENTION_AND_MLP + ["in_proj_qkv", "in_proj_z", "out_proj"]
