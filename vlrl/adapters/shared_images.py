"""Each distinct image goes through the vision tower once per call, however often it repeats.

A GRPO batch holds `group_size` rollouts of every prompt, so a prompt's image appears up to `group_size`
times in one micro-batch (and `num_return_sequences` repeats it in the in-process sampler's prefill). Two
hooks on the vision tower encode every distinct image once and copy its features to each place it appears.
The outputs are those of encoding every copy, and so are the gradients (a trainable tower gets the sum over
the copies, as it would from separate passes). Images are matched exactly: equal grid, then equal
fingerprints, then equal pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..batch import upload


@dataclass
class _Plan:
    pixel_rows: torch.Tensor  # [P_unique] rows of pixel_values that make up the distinct images
    unique: torch.Tensor  # [N_unique] which images are kept (first occurrences)
    merged_index: torch.Tensor  # [sum merged tokens]: output row of the unique pass for every original row
    patch_index: torch.Tensor  # [P]: the same for patch-level outputs
    unique_patches: int
    unique_list: list[int]  # `unique` on the host


def share_repeated_images(visual: nn.Module) -> None:
    """Hook `visual` (a Qwen3-VL vision tower) so repeated images are encoded once. Idempotent."""
    if getattr(visual, "_vlrl_image_sharing", None) is not None:
        return
    # the state lives on the module (a deep copy of the model gets its own)
    visual._vlrl_image_sharing = {"enabled": True, "plan": None, "merge": int(visual.spatial_merge_size)}
    visual.register_forward_pre_hook(lambda m, a, k: _before(m._vlrl_image_sharing, a, k), with_kwargs=True)
    visual.register_forward_hook(lambda m, a, k, out: _after(m._vlrl_image_sharing, out), with_kwargs=True)


def set_image_sharing(visual: nn.Module, enabled: bool) -> None:
    state = getattr(visual, "_vlrl_image_sharing", None)
    if state is not None:
        state["enabled"] = enabled


def _before(state, args, kwargs):
    state["plan"] = None
    state.pop("host_grid", None)
    # (transformers returns outputs by default)
    if not state["enabled"] or kwargs.get("return_dict") is False:
        return None
    pixels = args[0] if args else kwargs.get("hidden_states")
    grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
    if pixels is None or grid is None or len(grid) < 2:
        return None
    grids = grid.tolist()
    plan = _plan(pixels, grid, grids, state["merge"])
    if plan is None:
        state["host_grid"] = (grid, grids)
        return None
    state["plan"] = plan
    pixels, grid = pixels.index_select(0, plan.pixel_rows), grid.index_select(0, plan.unique)
    state["host_grid"] = (grid, [grids[u] for u in plan.unique_list])
    if args:
        args = (pixels, *args[1:]) if "grid_thw" in kwargs else (pixels, grid, *args[2:])
    else:
        kwargs = {**kwargs, "hidden_states": pixels}
    if "grid_thw" in kwargs:
        kwargs = {**kwargs, "grid_thw": grid}
    return args, kwargs


def _after(state, out):
    plan, state["plan"] = state["plan"], None
    if plan is None:
        return None
    if not hasattr(out, "pooler_output"):
        raise RuntimeError("shared_images: the vision tower returned no pooler_output; this transformers "
                           "version is not supported by vlrl's image sharing")
    out.pooler_output = out.pooler_output.index_select(0, plan.merged_index)
    if getattr(out, "deepstack_features", None):
        out.deepstack_features = [f.index_select(0, plan.merged_index) for f in out.deepstack_features]
    last = getattr(out, "last_hidden_state", None)
    if last is not None and last.shape[0] == plan.unique_patches:
        out.last_hidden_state = last.index_select(0, plan.patch_index)
    return out


def host_grid(visual: nn.Module, grid: torch.Tensor) -> list | None:
    """The grids (t, h, w) of `grid`, the tensor this call's pre-hook passed on, as read on the host by it:
    a later hook (fast_vision.py) reuses the read instead of waiting for the GPU again. Read once."""
    state = getattr(visual, "_vlrl_image_sharing", None)
    cached = state.pop("host_grid", None) if state is not None else None
    return cached[1] if cached is not None and cached[0] is grid else None


def _plan(pixels: torch.Tensor, grid: torch.Tensor, grids: list, merge: int) -> _Plan | None:
    """Which images repeat an earlier one (None when all are distinct). Three host reads at most (the grids,
    the fingerprints, the pixel comparison of matching ones); `grids` is `grid` read already."""
    sizes_l = [t * h * w for t, h, w in grids]  # patch rows per image
    starts_l = [sum(sizes_l[:i]) for i in range(len(sizes_l))]
    device = pixels.device
    # Fingerprints: two weighted sums per image, each image reduced on its own (same-size reductions are
    # deterministic; a scatter-add over all rows is not on CUDA, and equal images must get equal sums).
    # (in the pixels' own dtype: no float copy of all the pixels; a coarse fingerprint only costs an extra
    # compare)
    cols = torch.linspace(-1.0, 1.0, pixels.shape[1], device=device).sin() + 1.5
    row_fp = (pixels @ cols.to(pixels.dtype)).double()  # [P]
    fp = torch.stack([torch.stack([r.sum(), (r * torch.arange(1, len(r) + 1, device=device).sqrt()).sum()])
                      for r in torch.split(row_fp, sizes_l)])  # [N, 2]
    keys = [(tuple(g), tuple(f)) for g, f in zip(grids, fp.tolist())]
    first: dict = {}
    source = []
    for i, k in enumerate(keys):
        source.append(first.setdefault(k, i))
    pairs = [(i, s) for i, s in enumerate(source) if s != i]
    if not pairs:
        return None
    rows = lambda i: slice(starts_l[i], starts_l[i] + sizes_l[i])  # noqa: E731
    differ = torch.stack([(pixels[rows(i)] != pixels[rows(s)]).any() for i, s in pairs]).tolist()
    for (i, _), d in zip(pairs, differ):
        if d:  # a fingerprint collision: encode it on its own
            source[i] = i
    unique = sorted(set(source))
    if len(unique) == len(grids):
        return None
    slot = {u: j for j, u in enumerate(unique)}
    u_sizes = [sizes_l[u] for u in unique]
    u_starts = [sum(u_sizes[:j]) for j in range(len(unique))]
    pixel_rows = torch.cat([torch.arange(starts_l[u], starts_l[u] + sizes_l[u]) for u in unique])
    patch_index = torch.cat([torch.arange(u_starts[slot[s]], u_starts[slot[s]] + sizes_l[s]) for s in source])
    m = merge * merge
    merged_index = torch.cat([torch.arange(u_starts[slot[s]] // m, (u_starts[slot[s]] + sizes_l[s]) // m)
                              for s in source])
    # one copy to the device, from pinned memory without waiting (four pageable copies each made the host wait)
    parts = [pixel_rows, torch.tensor(unique), merged_index, patch_index]
    host = torch.cat(parts)
    moved = upload(host, device)
    pixel_rows, unique_t, merged_index, patch_index = torch.split(moved, [len(t) for t in parts])
    return _Plan(pixel_rows, unique_t.to(grid.device), merged_index, patch_index, sum(u_sizes), unique)
