"""The vision tower's fast path: its grid-derived inputs computed on the host, equal-size images in one
attention call, the patch embedding as a matmul.

transformers' Qwen3-VL vision tower derives several tensors from `grid_thw` in every forward, on the GPU, with
host reads on the way (`.tolist()`, `repeat_interleave` with tensor counts): the per-image attention
boundaries `cu_seqlens` (read again by every block, three host syncs each: 81 for the 8B's 27 blocks), the
rotary positions of the patches, the interpolation taps of the learned position table. Each read waits for
the GPU, which then idles while the host relaunches work. Its attention (sdpa, eager) then splits q, k and v
by image in Python and runs one call per image: 27 x images small calls, and a graph break that keeps a
compiled block in pieces.

transformers >= 5.19 computes those tensors with standalone helpers (`transformers.vision_utils`) and takes
them precomputed as keywords; its varlen branch hands the boundaries to the attention function instead of
splitting. `fast_vision` uses both:

- a pre-hook reads the grid once (before any GPU work of the tower is queued) and passes the inputs:
  `cu_seqlens` as a CPU tensor, the rest built by transformers' own helpers once per image size and kept on
  the GPU (`_image_inputs`);
- the tower's attention becomes `vision_attention`, registered with transformers' `AttentionInterface`. When
  every image of the call has the same number of patches (a GRPO group's rollouts, a dataset of one
  resolution) it is one batched sdpa over [images, heads, patches, dim], whose shape is known without reading
  any tensor, so a compiled block is one graph. Otherwise it splits by image as transformers does;
- the patch embedding, a Conv3d whose kernel is its stride, runs as the matmul it is (`_patchify`).

The same mathematics (only the patch embedding sums in another order): `tests/test_fast_path.py` checks the
inputs bit for bit against transformers' helpers, and features and gradients against transformers' own path.
Flash-attention models keep their own attention (their varlen kernel wants the boundaries on the GPU) and
transformers versions without the keywords are left alone.
"""

from __future__ import annotations

from collections import OrderedDict
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from .shared_images import host_grid

# The name carries "flash" because that is what routes transformers' vision attention to its varlen branch
# (boundaries passed to the function, not split in Python); the function itself runs torch's sdpa.
NAME = "vlrl_flash_vision_sdpa"
CACHED_SIZES = 64  # image sizes whose grid-derived inputs are kept on the device


def supported() -> bool:
    """Whether this transformers' Qwen3-VL vision tower takes its grid-derived inputs precomputed."""
    try:
        from transformers.models.qwen3_vl import modeling_qwen3_vl
        from transformers.vision_utils import get_vision_cu_seqlens  # noqa: F401
    except ImportError:
        return False
    return all(hasattr(modeling_qwen3_vl, f) for f in (
        "get_vision_attention_seqlens", "get_vision_position_ids",
        "get_vision_interpolation_indices_and_weights"))


def fast_vision(visual: nn.Module) -> bool:
    """The fast path for the vision tower `visual`: inputs from the host, (sdpa models) equal-size images
    batched, the patch embedding as a matmul. Register after any hook that rewrites its images. Returns
    whether anything changed."""
    if hasattr(visual, "_vlrl_fast_vision") or not supported():
        return False
    state = {"enabled": True, "patchify": True, "impl": visual.config._attn_implementation,
             "inputs": OrderedDict()}
    visual._vlrl_fast_vision = state
    visual.register_forward_pre_hook(_before, with_kwargs=True)
    proj = getattr(visual.patch_embed, "proj", None)
    if isinstance(proj, nn.Conv3d) and proj.kernel_size == proj.stride and proj.padding == (0, 0, 0) \
            and proj.dilation == (1, 1, 1) and proj.groups == 1:
        visual.patch_embed._vlrl_fast_vision = state
        visual.patch_embed.forward = MethodType(_patchify, visual.patch_embed)
    if visual.config._attn_implementation == "sdpa":
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, vision_attention)
        # set on the tower's own config (the language model keeps its own): `set_attn_implementation` would
        # look for a flash-attention package because of the name
        visual.config._attn_implementation = NAME
    return True


def set_fast_vision(visual: nn.Module, enabled: bool, patch_embed_as_matmul: bool | None = None) -> None:
    """Turn `fast_vision` off (transformers' own path: the bench's baseline) or back on; or only the patch
    embedding's matmul (`patch_embed_as_matmul=False`: transformers' convolution)."""
    state = getattr(visual, "_vlrl_fast_vision", None)
    if state is not None:
        state["enabled"] = enabled
        state["patchify"] = enabled if patch_embed_as_matmul is None else patch_embed_as_matmul
        if state["impl"] == "sdpa":
            visual.config._attn_implementation = NAME if enabled else "sdpa"


def _before(module, args, kwargs):
    state = module._vlrl_fast_vision
    if not state["enabled"] or "cu_seqlens" in kwargs:
        return None
    grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
    if grid is None:
        return None
    from transformers import vision_utils

    grids = [tuple(g) for g in (host_grid(module, grid) or grid.tolist())]  # the one host read (or the sharing's)
    per_image = [_image_inputs(module, state["inputs"], g, grid.device) for g in grids]
    extra = {
        "position_ids": torch.cat([p[0] for p in per_image]),
        "interp_indices": torch.cat([p[1] for p in per_image]),
        "interp_weights": torch.cat([p[2] for p in per_image]),
    }
    if module.config._attn_implementation in ("sdpa", "eager", NAME):  # flash: boundaries wanted on the GPU
        extra["cu_seqlens"] = vision_utils.get_vision_cu_seqlens(torch.tensor(grids))
    return args, {**kwargs, **extra}


def _image_inputs(module, cache: OrderedDict, grid: tuple, device) -> tuple[torch.Tensor, ...]:
    """(rotary positions, interpolation taps, their weights) of one image of `grid` patches, on `device`.

    transformers' helpers compute them for every image at once; each image's rows depend on its own grid
    only, so they are computed once per image size and kept on the device: RL revisits the same few sizes
    every step, and computing them on the host every call cost 4 ms (8 images of 448px) to 40 ms (8 of
    1344px) on the H100 machine's CPU, more than the GPU saved."""
    key = (grid, str(device))
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    from transformers import vision_utils

    host = torch.tensor([grid])
    indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
        host, num_grid_per_side=module.num_grid_per_side, mode=module.interpolation_mode,
        align_corners=module.interpolation_align_corners, spatial_merge_size=module.config.spatial_merge_size)
    positions = vision_utils.get_vision_position_ids(host, module.spatial_merge_size)
    cache[key] = tuple(t.to(device) for t in (positions, indices, weights))
    if len(cache) > CACHED_SIZES:
        cache.popitem(last=False)
    return cache[key]


def _patchify(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """The patch embedding as the matmul it is (a Conv3d whose kernel is its stride and the whole input
    patch): same weights, same parameter names. cuDNN's 3-D convolution takes 1.1 ms for it on an H100
    (torch 2.11) against 0.04 ms, and far longer with some cuDNN versions and GPUs (transformers issue
    45750). transformers' own `fusion_config={"patch_embeddings": True}` renames the weight
    (`linear_proj`), which the weight sync to vLLM and vlrl's checkpoints would then have to translate."""
    if not self._vlrl_fast_vision["patchify"]:
        return type(self).forward(self, hidden_states)
    weight = self.proj.weight  # [embed, channels, temporal_patch, patch, patch]
    return F.linear(hidden_states.to(weight.dtype).reshape(-1, weight[0].numel()),
                    weight.flatten(1), self.proj.bias)


def vision_attention(
    module: nn.Module,
    query: torch.Tensor,  # [1, heads, patches, dim]: every image's patches, packed
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,  # [images + 1] boundaries
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of each image to itself; returns [1, patches, heads, dim] (transformers' layout)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _, heads, total, dim = query.shape
    images = cu_seq_lens_q.shape[0] - 1
    if max_length_q is not None and images * max_length_q == total:  # every image max_length_q patches long
        q, k, v = (t.reshape(heads, images, max_length_q, dim).transpose(0, 1) for t in (query, key, value))
        out, _ = sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling,
                                        is_causal=False)
        return out.reshape(1, total, heads, dim), None  # [images, length, heads, dim] -> packed
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    outs = [
        sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=False)[0]
        for q, k, v in zip(*(torch.split(t, lengths, dim=2) for t in (query, key, value)))
    ]
    return torch.cat(outs, dim=1), None
