"""Qwen3-VL's M-RoPE positions, computed on the host when the batch is built.

Qwen3-VL rotates queries and keys by three position axes (time, height, width). Text tokens advance all three
together; an image's placeholders take the image's merged grid (row and column indices offset by the position
the image starts at), and the text after it resumes at that start + max(h, w) / merge. Left to itself,
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
) -> torch.Tensor:
    """[3, B, L] int64 positions (time, height, width); 0 on padding, as transformers leaves them."""
    B, L = input_ids.shape
    out = torch.zeros(3, B, L, dtype=torch.long)
    grids = [] if image_grid_thw is None else image_grid_thw.tolist()
    next_image = 0
    for b in range(B):
        keep = attention_mask[b].bool()
        is_image = input_ids[b][keep] == image_token_id
        edges = [0, *((is_image[1:] != is_image[:-1]).nonzero().flatten() + 1).tolist(), len(is_image)]
        parts, pos = [], 0
        for start, end in zip(edges[:-1], edges[1:]):  # runs of text / of image placeholders
            if start == end:
                continue
            n = end - start
            if not bool(is_image[start]):
                parts.append(torch.arange(pos, pos + n).expand(3, n))
                pos += n
            else:
                if next_image >= len(grids):
                    raise ValueError(f"sample {b}: more image placeholder runs than image grids ({len(grids)})")
                t, h, w = grids[next_image]
                next_image += 1
                gh, gw = h // merge_size, w // merge_size
                if t * gh * gw != n:
                    raise ValueError(
                        f"sample {b}: an image run of {n} placeholders, but its grid {t}x{h}x{w} needs {t * gh * gw}"
                    )
                tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
                parts.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
                pos += max(h, w) // merge_size
        if parts:
            out[:, b, keep] = torch.cat(parts, dim=1)
    if next_image != len(grids):
        raise ValueError(f"{len(grids)} image grids but {next_image} image placeholder runs")
    return out
