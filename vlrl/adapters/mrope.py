"""Qwen3-VL's M-RoPE positions, computed on the host when the batch is built.

Qwen3-VL rotates queries and keys by three position axes (time, height, width). Text tokens advance all three
together; an image's placeholders take the image's merged grid (row and column indices offset by the position
the image starts at), and the text after it resumes at that start + max(h, w) / merge. A video is a run of
such images of one frame pair each (t = 1), every one after its timestamp's text tokens. Left to itself,
transformers recomputes these inside every forward, on the GPU, sample by sample with a dozen host reads each
(`.tolist()`, `.item()`, boolean masks): the GPU idles between the vision tower and the language model while
the host walks the batch. Built once here, on the CPU tensors the batch starts from, the model is handed
`position_ids` and skips that walk. `tests/test_batch.py` checks them against transformers' own
`get_rope_index` for every layout the batch builder makes.
"""

from __future__ import annotations

import torch


def mrope_positions(
    input_ids: torch.Tensor,  # [B, L] int64, on the CPU
    attention_mask: torch.Tensor,  # [B, L]: 1 on tokens, 0 on padding
    image_grid_thw: torch.Tensor | None,  # [N, 3]: the batch's images in token order
    image_token_id: int,
    merge_size: int,
    video_grid_thw: torch.Tensor | None = None,  # [V, 3]: the batch's videos in token order
    video_token_id: int | None = None,
) -> torch.Tensor:
    """[3, B, L] int64 positions (time, height, width); 0 on padding, as transformers leaves them."""
    B, L = input_ids.shape
    out = torch.zeros(3, B, L, dtype=torch.long)
    # Qwen3-VL writes a timestamp (text) before every frame pair of a video, so each pair's placeholders are a
    # run of their own, positioned as an image of t = 1 (transformers' get_rope_index splits the grid the same
    # way)
    frames = [] if video_grid_thw is None else [[1, h, w] for t, h, w in video_grid_thw.tolist()
                                                for _ in range(t)]
    grids = {1: [] if image_grid_thw is None else image_grid_thw.tolist(), 2: frames}
    names = {1: "image", 2: "video frame"}
    used = {1: 0, 2: 0}
    for b in range(B):
        keep = attention_mask[b].bool()
        ids = input_ids[b][keep]
        kind = (ids == image_token_id).long()  # 0 text, 1 image placeholder, 2 video placeholder
        if video_token_id is not None:
            kind[ids == video_token_id] = 2
        edges = [0, *((kind[1:] != kind[:-1]).nonzero().flatten() + 1).tolist(), len(kind)]
        parts, pos = [], 0
        for start, end in zip(edges[:-1], edges[1:]):  # runs of text / of image or video placeholders
            if start == end:
                continue
            n, k = end - start, int(kind[start])
            if k == 0:
                parts.append(torch.arange(pos, pos + n).expand(3, n))
                pos += n
            else:
                if used[k] >= len(grids[k]):
                    raise ValueError(
                        f"sample {b}: more {names[k]} placeholder runs than {names[k]} grids "
                        f"({len(grids[k])})"
                    )
                t, h, w = grids[k][used[k]]
                used[k] += 1
                gh, gw = h // merge_size, w // merge_size
                if t * gh * gw != n:
                    raise ValueError(
                        f"sample {b}: a run of {n} {names[k]} placeholders, but its grid {t}x{h}x{w} needs "
                        f"{t * gh * gw}"
                    )
                tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh),
                                            torch.arange(gw), indexing="ij")
                parts.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
                pos += max(h, w) // merge_size
        if parts:
            out[:, b, keep] = torch.cat(parts, dim=1)
    for k in (1, 2):
        if used[k] != len(grids[k]):
            raise ValueError(f"{len(grids[k])} {names[k]} grids but {used[k]} {names[k]} placeholder runs")
    return out
