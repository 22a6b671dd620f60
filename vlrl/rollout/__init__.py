"""Where samples come from. One protocol, two backends, the same `Rollout` record from both."""

from __future__ import annotations

from typing import Protocol

from ..errors import UserError
from ..records import EncodedPrompt, Rollout


class Sampler(Protocol):
    def sample(self, prompts: list[EncodedPrompt], n: int, seed: int | None = None) -> list[Rollout]:
        """`n` rollouts per prompt, prompt-major, each with the sampler's token ids and logprobs."""
        ...


def make_sampler(cfg, model, adapter) -> Sampler:
    """The embedded (in-process) sampler unless `rollout.server_url` names a vLLM server."""
    if cfg.rollout.server_url:
        raise UserError("rollout.server_url: the vLLM backend is not available in this version; unset it")
    from .embedded import EmbeddedSampler

    return EmbeddedSampler(model, adapter, cfg.rollout)
