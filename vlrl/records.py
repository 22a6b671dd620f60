"""The records that flow between parts: an encoded prompt, and one rollout (a sampled completion of it).

Token in, token out: `EncodedPrompt.input_ids` are the processor's ids (image placeholders expanded) and
`Rollout.completion_ids` are the sampler's own ids, never re-tokenised text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image


@dataclass
class EncodedPrompt:
    """A prompt as the trainer and the sampler both see it."""

    input_ids: list[int]
    """Processor ids, image placeholders expanded, generation prompt included."""
    messages: list[dict]
    """Chat messages; image parts are `{"type": "image"}` in order of `images`, video parts `{"type": "video"}`."""
    images: list[Image.Image]
    """RGB images already resized to the pixel policy (what the sampler receives)."""
    pixel_values: torch.Tensor | None = None  # [P, D] float32, P = sum over images of t*h*w
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3] int64
    image_refs: list[str] = field(default_factory=list)
    """Printable names of the image sources (paths, URLs), for logs and reports."""
    videos: list[Any] = field(default_factory=list)
    """Videos after the frame policy (`adapters.video.Video`: sampled frames, resized, with their timestamps),
    in order of the messages' `{"type": "video"}` parts: what the sampler receives."""
    pixel_values_videos: torch.Tensor | None = None  # [P_v, D] float32, P_v = sum over videos of t*h*w
    video_grid_thw: torch.Tensor | None = None  # [n_videos, 3] int64 (t = frame pairs)
    video_refs: list[str] = field(default_factory=list)
    """Printable names of the video sources."""

    @property
    def num_patches(self) -> int:
        """Image patches (rows of pixel_values)."""
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.prod(-1).sum())

    @property
    def num_video_patches(self) -> int:
        """Video patches (rows of pixel_values_videos)."""
        return 0 if self.video_grid_thw is None else int(self.video_grid_thw.prod(-1).sum())


@dataclass
class Rollout:
    """One completion sampled for a prompt, with what the trainer needs to learn from it."""

    prompt: EncodedPrompt
    completion_ids: list[int]
    """The sampler's token ids. In multi-turn rollouts, environment tokens sit between generated turns."""
    logprobs: list[float]
    """Behavior logprob of each completion token under the distribution it was sampled from (0 where the
    token was not sampled)."""
    finish_reason: str
    """`stop` (an end-of-turn token was sampled) or `length` (max_new_tokens reached)."""
    text: str = ""
    """Decoded completion, for rewards and logs."""
    completion_mask: list[int] | None = None
    """1 on tokens the policy sampled, 0 on environment tokens; None means every token was sampled."""
    sample: Any = None
    """The dataset sample the prompt came from (rewards read its answer)."""
    group: int = 0
    """Index of the prompt's group within the step."""
    reward: float = 0.0
    """The weighted sum of the reward functions; NaN when one of them failed on this rollout."""
    rewards: dict[str, float | None] = field(default_factory=dict)
    """Each reward function's value (None: it failed), by the reward set's keys (`fn`, `fn#2`...)."""
    advantage: float = 0.0

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.completion_ids):
            raise ValueError(
                f"rollout has {len(self.completion_ids)} completion ids but {len(self.logprobs)} logprobs"
            )
        if self.completion_mask is not None and len(self.completion_mask) != len(self.completion_ids):
            raise ValueError("completion_mask must have one entry per completion id")

    @property
    def trained_mask(self) -> list[int]:
        return self.completion_mask if self.completion_mask is not None else [1] * len(self.completion_ids)
