"""The records that flow between parts: an encoded prompt, an environment's reply, and one rollout (a sampled
completion of a prompt, or a multi-turn trajectory).

Token in, token out: `EncodedPrompt.input_ids` are the processor's ids (image placeholders expanded) and
`Rollout.completion_ids` are the sampler's own ids, never re-tokenised text. In a multi-turn trajectory the
environment's replies sit between the sampled turns, each rendered once by the chat template (`EnvReply`).
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
    messages: list[dict] | None
    """Chat messages; image parts are `{"type": "image"}` in order of `images`, video parts
    `{"type": "video"}`. None for a continuation of a trajectory (a later turn), which a sampler takes by its
    token ids alone."""
    images: list[Image.Image]
    """RGB images already resized to the pixel policy (what the sampler receives)."""
    pixel_values: torch.Tensor | None = None  # [P, D] float32, P = sum over images of t*h*w
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3] int64
    image_refs: list[str] = field(default_factory=list)
    """Printable names of the image sources (paths, URLs), for logs and reports."""
    tools: list[dict] | None = None
    """Tool schemas the chat template rendered into the system turn (multi-turn environments)."""
    max_new_tokens: int | None = None
    """Most tokens a sampler may add (a later turn of a trajectory: what is left of model.max_model_len)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Tokens that end a sample besides the end-of-turn ones (an environment that stops a turn at its tool
    call)."""
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
class EnvReply:
    """An environment's reply to an assistant turn (tool results, feedback), rendered once by the chat
    template: `input_ids` close the assistant turn's line, hold the reply's messages with their image
    placeholders expanded, and open the next assistant turn; they are appended to the trajectory as they
    are."""

    input_ids: list[int]
    images: list[Image.Image] = field(default_factory=list)
    pixel_values: torch.Tensor | None = None  # [P, D]
    image_grid_thw: torch.Tensor | None = None  # [n, 3]


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
    """`stop` (an end-of-turn token was sampled) or `length` (max_new_tokens reached); multi-turn also
    `context` (model.max_model_len reached), `max_turns`, `images`."""
    text: str = ""
    """Decoded completion, for rewards and logs (multi-turn: the last assistant turn, the answer)."""
    completion_mask: list[int] | None = None
    """1 on tokens the policy sampled, 0 on environment tokens; None means every token was sampled."""
    env_images: list[Image.Image] = field(default_factory=list)
    """Images the environment returned inside the completion (tool results), in order."""
    env_pixel_values: torch.Tensor | None = None  # [P_env, D]: their patches
    env_image_grid_thw: torch.Tensor | None = None  # [n_env, 3]
    turns: int = 1
    """Assistant turns sampled (1 for a single-turn rollout)."""
    tool_calls: int = 0
    tool_errors: dict[str, int] = field(default_factory=dict)
    """Tool calls that failed, by reason (malformed, unknown_tool, bad_arguments, raised, timeout)."""
    env_reward: float | None = None
    """The sum of the rewards the environment gave along the trajectory (None: it gave none)."""
    env_reward_error: tuple[str, str] | None = None
    """(reason, detail) when a `Reply.reward` was not a finite number (the rollout's reward then fails, as a
    reward function's would: `not_a_number`, `nan`)."""
    transcript: str = ""
    """The whole completion decoded, environment turns included (multi-turn), for logs and reports."""
    sample: Any = None
    """The dataset sample the prompt came from (rewards read its answer)."""
    group: int = 0
    """Index of the prompt's group within the step."""
    reward: float = 0.0
    """The weighted sum of the reward functions; NaN when one of them failed on this rollout."""
    rewards: dict[str, float | None] = field(default_factory=dict)
    """Each reward function's value (None: it failed), by the reward set's keys (`fn`, `fn#2`...)."""
    advantage: float = 0.0
    version: int = 0
    """The policy version (the learner's step count of the weights) that began sampling it."""
    version_end: int = 0
    """The newest version whose weights may have sampled some of its tokens: a weight sync that lands while
    a request is running (asynchronous rollouts) swaps the weights under it. Equal to `version` when one
    policy sampled all of it; a multi-turn episode spans its turns' versions."""
    routed_experts: torch.Tensor | None = None
    """[n - 1, layers, k] int16: the experts the sampler routed each of the n tokens of prompt + completion
    to, in every decoder layer (mixture-of-experts models; -1: a dense layer, or no record), for routing replay.
    The last token never went through the sampler's model. None: the sampler recorded none."""

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.completion_ids):
            raise ValueError(
                f"rollout has {len(self.completion_ids)} completion ids but {len(self.logprobs)} logprobs"
            )
        if self.completion_mask is not None and len(self.completion_mask) != len(self.completion_ids):
            raise ValueError("completion_mask must have one entry per completion id")

    @property
    def length(self) -> int:
        """Tokens of the sequence, prompt and completion (image placeholders included): what it packs as."""
        return len(self.prompt.input_ids) + len(self.completion_ids)

    @property
    def trained_mask(self) -> list[int]:
        return self.completion_mask if self.completion_mask is not None else [1] * len(self.completion_ids)

    @property
    def sampled_tokens(self) -> int:
        """Tokens the policy sampled (the environment's replies between turns not counted)."""
        return len(self.completion_ids) if self.completion_mask is None else sum(self.completion_mask)

    @property
    def pixel_values(self) -> torch.Tensor | None:
        """[P, D]: the patches of every image of the sequence, prompt's then environment's, in order."""
        parts = [t for t in (self.prompt.pixel_values, self.env_pixel_values) if t is not None and len(t)]
        return torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else None)

    @property
    def image_grid_thw(self) -> torch.Tensor | None:
        """[n, 3]: every image's grid, prompt's then environment's."""
        parts = [t for t in (self.prompt.image_grid_thw, self.env_image_grid_thw) if t is not None and len(t)]
        return torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else None)

    @property
    def num_patches(self) -> int:
        grid = self.image_grid_thw
        return 0 if grid is None else int(grid.prod(-1).sum())

    @property
    def num_images(self) -> int:
        grid = self.image_grid_thw
        return 0 if grid is None else len(grid)
