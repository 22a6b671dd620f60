"""Model families behind one interface: what the rest of vlrl may ask of a model family, and nothing more.

Everything specific to a family (its processor and chat format, image tokens, the batch layout its forward
wants, its FSDP units, its position rules, its layer names) stays in its adapter; train, eval, check-batch,
the rollout layer and the samplers hold an `Adapter` and never import model classes. One family today:
Qwen3-VL (`qwen3_vl.Qwen3VLAdapter`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from ..batch import MultimodalBatch
from ..records import EncodedPrompt, EnvReply, Rollout


class Adapter(Protocol):
    cfg: Any  # config.ModelConfig
    tokenizer: Any
    image_token_id: int
    video_token_id: int
    pad_token_id: int
    eos_token_ids: list[int]
    tool_call_end_ids: list[int]
    """Tokens whose text ends a tool call (an environment may stop a turn there)."""
    merge_size: int
    fsdp_units: tuple[str, ...]
    """Class names of the modules FSDP2 shards as units."""

    @property
    def banned_token_ids(self) -> list[int]:
        """Tokens no sampler may produce (placeholders with no image behind them)."""
        ...

    # prompts
    def build_messages(self, question: str, num_images: int, system_prompt: str | None = None,
                       history: list[dict] | None = None, num_videos: int = 0) -> list[dict]: ...
    def encode_prompt(self, messages: list[dict], image_sources: list[Any], base_dir: Path | None = None,
                      name: str = "prompt", video_sources: list[Any] = (), tools: list[dict] | None = None
                      ) -> EncodedPrompt: ...
    def encode_reply(self, messages: list[dict], images: list, name: str = "reply", close_turn: bool = False
                     ) -> EnvReply:
        """An environment's reply rendered once, as the ids that follow a sampled turn (multi-turn)."""
        ...
    def completion_text(self, ids: list[int]) -> str:
        """The text of sampled ids (every sampler's rollouts carry exactly this text)."""
        ...
    def placeholders_per_image(self, grid: torch.Tensor | None) -> list[int]: ...
    def generation_inputs(self, prompts: list[EncodedPrompt], device) -> dict[str, torch.Tensor]: ...

    # batches
    def build_batch(self, rollouts: list[Rollout]) -> MultimodalBatch: ...
    def empty_rollout(self) -> Rollout: ...

    # the model
    def load_model(self, dtype: torch.dtype, device="cpu", weights_from: str | None = None): ...
    def set_checkpointing(self, model, fraction: float, selective: float = 0.0) -> None:
        """Recompute the activations of `fraction` of the decoder layers in the backward pass, and those of
        `selective` of them selectively (matrix products kept, the rest recomputed)."""
        ...
    def decoder_layers(self, model) -> int: ...
    def layer_parameters(self, model) -> int:
        """Parameters of one decoder layer."""
        ...
    def packing_unavailable(self, model) -> str | None:
        """Why `model` trains on padded micro-batches (one line), or None when it can pack them."""
        ...
    def prepare_for_training(self, model, cfg, adapter_dir: Path | None = None) -> None: ...
    def policy(self, model, temperature: float, fused_head: bool = False) -> torch.nn.Module: ...
    def reference_positions(self, model, batch: MultimodalBatch) -> torch.Tensor: ...
    def save_pretrained(self, model, out_dir: Path, state_dict: dict | None = None) -> None: ...


def load_adapter(model_cfg) -> Adapter:
    """The adapter of `model.path`'s family (its processor loaded); a ModelError names the path on failure."""
    from .qwen3_vl import Qwen3VLAdapter

    return Qwen3VLAdapter.from_config(model_cfg)
