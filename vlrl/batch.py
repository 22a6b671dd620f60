"""`MultimodalBatch`: the padded training batch, and its split into micro-batches.

The batch is model-agnostic: the adapter fills `model_inputs` and declares, per key, how its rows map to
samples (`layout`): "token" tensors are [B, L] like input_ids; "positions" tensors are [K, B, L] (one [B, L]
plane per position axis, as M-RoPE's position_ids); "patch" tensors are packed over every image of
the batch and are sliced by each sample's patch count; "image" tensors have one row per image; "video_patch"
and "video" tensors are the same for videos (`pixel_values_videos`, `video_grid_thw`). Slicing by patch
counts (never by sample index) is what keeps `pixel_values` aligned with the image placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class MultimodalBatch:
    input_ids: torch.Tensor  # [B, L] int64, right-padded
    attention_mask: torch.Tensor  # [B, L] int64
    loss_mask: torch.Tensor  # [B, L] float32, 1 exactly on tokens the policy sampled
    behavior_logprobs: torch.Tensor  # [B, L] float32, sampler logprob of token t stored at t, 0 elsewhere
    advantages: torch.Tensor  # [B] float32
    model_inputs: dict[str, torch.Tensor]  # e.g. pixel_values [P, D], image_grid_thw [N, 3], position_ids [3, B, L]
    layout: dict[str, str]  # model_inputs key -> "token" | "positions" | "patch" | "image" | "video_patch" | "video"
    patches_per_sample: list[int]  # image patches (rows of "patch" tensors)
    images_per_sample: list[int]
    video_patches_per_sample: list[int] = field(default_factory=list)  # rows of "video_patch" tensors; [] = none
    videos_per_sample: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def vision_patches_per_sample(self) -> list[int]:
        """Image and video patches of each sample: the vision tower's work (the micro-batch patch budget)."""
        return [p + v for p, v in zip(self.patches_per_sample, self.rows_per_sample("video_patch"))]

    def rows_per_sample(self, kind: str) -> list[int]:
        """Rows per sample of a "patch" | "image" | "video_patch" | "video" tensor."""
        counts = {"patch": self.patches_per_sample, "image": self.images_per_sample,
                  "video_patch": self.video_patches_per_sample, "video": self.videos_per_sample}[kind]
        return counts or [0] * self.size

    def to(self, device: torch.device | str) -> MultimodalBatch:
        mv = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return replace(
            self,
            input_ids=mv(self.input_ids),
            attention_mask=mv(self.attention_mask),
            loss_mask=mv(self.loss_mask),
            behavior_logprobs=mv(self.behavior_logprobs),
            advantages=mv(self.advantages),
            model_inputs={k: mv(v) for k, v in self.model_inputs.items()},
        )

    def select(self, indices: list[int]) -> MultimodalBatch:
        """The samples at `indices` (in that order), padding trimmed to their longest sequence."""
        idx = torch.tensor(indices, dtype=torch.long)
        length = int(self.attention_mask[idx].sum(-1).max()) if indices else 0
        inputs: dict[str, torch.Tensor] = {}
        for key, value in self.model_inputs.items():
            kind = self.layout[key]
            if kind == "token":
                inputs[key] = value[idx, :length]
            elif kind == "positions":
                inputs[key] = value[:, idx, :length]
            elif kind in ("patch", "image", "video_patch", "video"):
                counts = self.rows_per_sample(kind)
                starts = _offsets(counts)
                rows = [value[starts[i] : starts[i] + counts[i]] for i in indices if counts[i]]
                if rows:
                    inputs[key] = torch.cat(rows)
            else:
                raise ValueError(f"unknown layout {kind!r} for model input {key!r}")
        return MultimodalBatch(
            input_ids=self.input_ids[idx, :length],
            attention_mask=self.attention_mask[idx, :length],
            loss_mask=self.loss_mask[idx, :length],
            behavior_logprobs=self.behavior_logprobs[idx, :length],
            advantages=self.advantages[idx],
            model_inputs=inputs,
            layout=self.layout,
            patches_per_sample=[self.patches_per_sample[i] for i in indices],
            images_per_sample=[self.images_per_sample[i] for i in indices],
            video_patches_per_sample=[self.rows_per_sample("video_patch")[i] for i in indices],
            videos_per_sample=[self.rows_per_sample("video")[i] for i in indices],
        )


def _offsets(counts: list[int]) -> list[int]:
    out, total = [], 0
    for c in counts:
        out.append(total)
        total += c
    return out


def plan_micro_batches(
    lengths: list[int],
    max_samples: int,
    max_tokens: int | None = None,
    patches: list[int] | None = None,
    max_patches: int | None = None,
) -> list[list[int]]:
    """Group sample indices into micro-batches, in order, within three budgets: at most `max_samples`
    samples, at most `max_tokens` padded tokens (samples * longest length; image and video placeholders count
    as tokens), and at most `max_patches` vision patches of images and videos (the vision tower's work). A
    sample over a budget on its own still gets a micro-batch of its own."""
    patches = patches or [0] * len(lengths)
    groups: list[list[int]] = []
    current: list[int] = []
    longest = n_patches = 0
    for i, n in enumerate(lengths):
        grown = max(longest, n)
        over_tokens = max_tokens is not None and grown * (len(current) + 1) > max_tokens
        over_patches = max_patches is not None and n_patches + patches[i] > max_patches
        if current and (len(current) >= max_samples or over_tokens or over_patches):
            groups.append(current)
            current, grown, n_patches = [], n, 0
        current.append(i)
        longest = grown
        n_patches += patches[i]
    if current:
        groups.append(current)
    return groups
