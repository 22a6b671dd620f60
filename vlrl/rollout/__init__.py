"""Where samples come from. One protocol, two backends, the same `Rollout` record from both."""

from __future__ import annotations

from typing import Protocol

from ..records import EncodedPrompt, Rollout


class Sampler(Protocol):
    def sample(self, prompts: list[EncodedPrompt], n: int, seed: int | None = None) -> list[Rollout]:
        """`n` rollouts per prompt, prompt-major, each with the sampler's token ids and logprobs.

        `seed`: the embedded sampler draws from it, so the same seed, weights and prompts give the same
        rollouts; the vLLM sampler ignores it (per-request seeds crash vLLM's CPU backend, and batched GPU
        sampling is not bit-reproducible anyway): its rollouts differ from run to run."""
        ...


def make_sampler(cfg, model, adapter, rank: int = 0) -> Sampler:
    """The embedded (in-process) sampler unless `rollout.server_url` names a vLLM server."""
    if cfg.rollout.server_url:
        from pathlib import Path

        from .vllm_client import VLLMSampler
        from .weight_sync import SHM, DiskWeightSync, NCCLWeightSync, default_sync_dir, state_bytes

        # fails clearly if unreachable
        sampler = VLLMSampler(adapter, cfg.rollout, media_dir=cfg.run_dir / "media")
        sampler.check_max_model_len(cfg.model.max_model_len)
        if cfg.rollout.weight_sync == "nccl":
            sampler.weight_sync = NCCLWeightSync(sampler.client, cfg.rollout, model, rank=rank)
        else:
            chosen = cfg.rollout.sync_dir
            sync_dir = Path(chosen) if chosen else default_sync_dir(cfg.run_dir, cfg.rollout.server_url,
                                                                    state_bytes(model))
            # a default directory in shared memory holds the model in RAM: removed when the run ends
            sampler.weight_sync = DiskWeightSync(sampler.client, adapter, sync_dir,
                                                 remove_at_close=not chosen and sync_dir.parent == Path(SHM))
        return sampler
    from .embedded import EmbeddedSampler

    return EmbeddedSampler(model, adapter, cfg.rollout)
