"""Where samples come from. One protocol, two backends, the same `Rollout` record from both."""

from __future__ import annotations

from typing import Protocol

from ..records import EncodedPrompt, Rollout


class Sampler(Protocol):
    def sample(self, prompts: list[EncodedPrompt], n: int, seed: int | None = None) -> list[Rollout]:
        """`n` rollouts per prompt, prompt-major, each with the sampler's token ids and logprobs."""
        ...


def make_sampler(cfg, model, adapter, rank: int = 0) -> Sampler:
    """The embedded (in-process) sampler unless `rollout.server_url` names a vLLM server."""
    if cfg.rollout.server_url:
        from pathlib import Path

        from .vllm_client import VLLMClient, VLLMSampler
        from .weight_sync import DiskWeightSync, NCCLWeightSync

        client = VLLMClient(cfg.rollout.server_url, cfg.rollout)
        client.model_name()  # reachable?
        if cfg.rollout.weight_sync == "nccl":
            sync = NCCLWeightSync(client, cfg.rollout, model, rank=rank)
        else:
            sync = DiskWeightSync(client, adapter, Path(cfg.rollout.sync_dir or cfg.run_dir / "weights"))
        return VLLMSampler(adapter, cfg.rollout, media_dir=cfg.run_dir / "media", weight_sync=sync, client=client)
    from .embedded import EmbeddedSampler

    return EmbeddedSampler(model, adapter, cfg.rollout)
