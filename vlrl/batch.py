"""`MultimodalBatch`: the padded training batch, and its split into micro-batches, padded or packed.

The batch is model-agnostic: the adapter fills `model_inputs` and declares, per key, how its rows map to
samples (`layout`): "token" tensors are [B, L] like input_ids; "positions" tensors are [K, B, L] (one [B, L]
plane per position axis, as M-RoPE's position_ids); "patch" tensors are packed over every image of
the batch and are sliced by each sample's patch count; "image" tensors have one row per image; "video_patch"
and "video" tensors are the same for videos (`pixel_values_videos`, `video_grid_thw`). Slicing by patch
counts (never by sample index) is what keeps `pixel_values` aligned with the image placeholders.

A micro-batch is either padded (`select`: [b, l] with the samples right-padded to the longest) or packed
(`pack`: the samples concatenated into one sequence [1, T], T = the sum of their lengths, no padding
computed). A packed micro-batch keeps the loss-side tensors (loss mask, behavior logprobs, advantages) in
the padded [b, l] layout and unpacks the model's per-token outputs into it, so the loss, its normalisation
and its statistics are computed by the same code on the same tensors either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class MultimodalBatch:
    input_ids: torch.Tensor  # [B, L] int64, right-padded
    attention_mask: torch.Tensor  # [B, L] int64
    loss_mask: torch.Tensor  # [B, L] float32, 1 exactly on tokens the policy sampled
    behavior_logprobs: torch.Tensor  # [B, L] float32, sampler logprob of token t stored at t, 0 elsewhere
    advantages: torch.Tensor  # [B] float32
    # e.g. pixel_values [P, D], image_grid_thw [N, 3], position_ids [3, B, L]
    model_inputs: dict[str, torch.Tensor]
    # model_inputs key -> "token" | "positions" | "patch" | "image" | "video_patch" | "video"
    layout: dict[str, str]
    patches_per_sample: list[int]  # image patches (rows of "patch" tensors)
    images_per_sample: list[int]
    # rows of "video_patch" tensors; [] = none
    video_patches_per_sample: list[int] = field(default_factory=list)
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
    def computed_tokens(self) -> int:
        """Token positions the model computes, padding included."""
        return int(self.input_ids.numel())

    @property
    def real_tokens(self) -> int:
        """Token positions that are not padding."""
        return int(self.attention_mask.sum())

    @property
    def lengths(self) -> list[int]:
        """Each sample's length in tokens (image placeholders included)."""
        return self.attention_mask.sum(-1).tolist()

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
        return _moved(self, device)

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
            else:
                self._add_rows(inputs, key, value, indices)
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

    def pack(self, indices: list[int]) -> PackedBatch:
        """The samples at `indices` (in that order) as one sequence [1, T]: each sample's real tokens, its own
        positions, its own image rows; the loss-side tensors as `select` gives them."""
        if not indices:
            raise ValueError("pack needs at least one sample")
        lengths = [int(self.attention_mask[i].sum()) for i in indices]
        cat = lambda rows: torch.cat(rows, dim=-1)  # noqa: E731
        logprob_mask = cat([self.loss_mask[i, :n] for i, n in zip(indices, lengths)])[None]  # [1, T]
        starts = sequence_starts(lengths)
        if bool(logprob_mask[0, starts[:-1].long()].any()):
            # its logprob would be predicted from the previous sample's last hidden state
            raise ValueError("a sample's first token is marked for a logprob; it has none (loss_mask[:, 0] "
                             "must be 0)")
        inputs: dict[str, torch.Tensor] = {}
        for key, value in self.model_inputs.items():
            kind = self.layout[key]
            if kind == "token":
                # [1, T] (or [1, T, ...] for per-token rows: routed experts [1, T, layers, k])
                inputs[key] = torch.cat([value[i, :n] for i, n in zip(indices, lengths)])[None]
            elif kind == "positions":
                inputs[key] = cat([value[:, i, :n] for i, n in zip(indices, lengths)])[:, None]  # [K, 1, T]
            else:
                self._add_rows(inputs, key, value, indices)
        inputs["cu_seqlens"] = starts  # [b + 1] int32
        longest = max(lengths)
        idx = torch.tensor(indices, dtype=torch.long)
        rows = torch.repeat_interleave(torch.arange(len(indices)), torch.tensor(lengths))  # [T]
        cols = torch.cat([torch.arange(n) for n in lengths])  # [T]
        return PackedBatch(
            input_ids=cat([self.input_ids[i, :n] for i, n in zip(indices, lengths)])[None],
            logprob_mask=logprob_mask,
            model_inputs=inputs,
            max_seqlen=longest,
            lengths=lengths,
            unpack_index=torch.stack([rows, cols]),
            loss_mask=self.loss_mask[idx, :longest],
            behavior_logprobs=self.behavior_logprobs[idx, :longest],
            advantages=self.advantages[idx],
        )

    def _add_rows(self, inputs: dict, key: str, value: torch.Tensor, indices: list[int]) -> None:
        """inputs[key] = the "patch", "image", "video_patch" or "video" rows of the samples at `indices`
        (absent when they have none)."""
        kind = self.layout[key]
        if kind not in ("patch", "image", "video_patch", "video"):
            raise ValueError(f"unknown layout {kind!r} for model input {key!r}")
        counts = self.rows_per_sample(kind)
        starts = _offsets(counts)
        rows = [value[starts[i] : starts[i] + counts[i]] for i in indices if counts[i]]
        if rows:
            inputs[key] = torch.cat(rows)


@dataclass
class PackedBatch:
    """One micro-batch's samples as one sequence [1, T] (`MultimodalBatch.pack`); no padding computed."""

    input_ids: torch.Tensor  # [1, T] int64
    logprob_mask: torch.Tensor  # [1, T] float32: loss_mask, packed
    # token [1, T], positions [K, 1, T], patch/image rows, cu_seqlens [b + 1]
    model_inputs: dict[str, torch.Tensor]
    max_seqlen: int  # the longest sample
    lengths: list[int]  # [b] tokens of each sample, in order
    unpack_index: torch.Tensor  # [2, T] int64: (sample, position) of each packed token
    loss_mask: torch.Tensor  # [b, l] float32, l = max_seqlen: the loss side, as `select` gives it
    behavior_logprobs: torch.Tensor  # [b, l] float32
    advantages: torch.Tensor  # [b] float32

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def seq_len(self) -> int:
        return self.max_seqlen

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def computed_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    real_tokens = computed_tokens

    def to(self, device: torch.device | str) -> PackedBatch:
        return _moved(self, device)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[1, T] per-token values -> [b, l] in the padded layout (0 on padding); differentiable."""
        rows, cols = self.unpack_index
        out = packed.new_zeros(self.loss_mask.shape)
        return out.index_put((rows, cols), packed[0])


def batch_logprobs(policy, mb: MultimodalBatch | PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs [b, l], entropy [b, l]) of a micro-batch's trained tokens under `policy`, padded or packed:
    a packed micro-batch's [1, T] outputs come back in the padded layout."""
    if isinstance(mb, PackedBatch):
        lp, ent = policy(mb.input_ids, None, mb.logprob_mask, max_seqlen=mb.max_seqlen,
                         **mb.model_inputs)  # [1, T]
        return mb.unpack(lp), mb.unpack(ent)
    return policy(mb.input_ids, mb.attention_mask, mb.loss_mask, **mb.model_inputs)


def sequence_starts(lengths: list[int]) -> torch.Tensor:
    """[n + 1] int32 cumulative starts of sequences of `lengths` laid end to end (flash attention's
    cu_seqlens)."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return out


PIN_UPLOADS = True
"""Host tensors go to a GPU through pinned memory (`bench/update_step.py --pageable-uploads` turns it off to
measure it): a copy from pageable memory blocks the host until the GPU's queue reaches it (on the MoE ragged
update: 286 such copies, 0.41 s of host time an update). Measured neutral in the update's time on one H100
(1.309 vs 1.305 s); it frees the host for other threads (rollouts, the weight sync)."""


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; a CPU tensor bound for a GPU is staged in pinned memory and copied without waiting (the
    caching host allocator keeps the staging block until the copy has run)."""
    if PIN_UPLOADS and device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, non_blocking=True)


def _moved(batch, device: torch.device | str):
    """A copy of a batch (dataclass) with its tensors, and the tensors of its `model_inputs`, on `device`."""
    device = torch.device(device)
    mv = lambda t: upload(t, device)  # noqa: E731
    changes = {f.name: mv(getattr(batch, f.name)) for f in fields(batch)
               if isinstance(getattr(batch, f.name), torch.Tensor)}
    return replace(batch, **changes, model_inputs={k: mv(v) for k, v in batch.model_inputs.items()})


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
