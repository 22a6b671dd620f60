"""The mixture-of-experts Qwen3-VL (`qwen3_vl_moe`: Qwen3-VL-30B-A3B, 235B-A22B): Qwen3-VL with sparse MLPs.

Everything but the decoder layers' MLPs is the dense model's (processor, chat template, vision tower with
deepstack, M-RoPE, placeholders, packing), so this adapter is the dense one plus what experts change:
- grouped experts: `model.experts_implementation` (default `grouped_mm`: each projection of every expert one
  grouped matrix product, not transformers' Python loop over experts, 14.7x slower on an H200; `vlrl`:
  moe_experts.py's permutation, gathers both ways);
- routing replay (`routing.py`): the batch carries each token's sampled experts (`routed_experts`, a
  per-token model input [B, L, layers, k], packed like the tokens), the policy forces the routers to them;
  the embedded sampler records them during `generate` (`capture_routing`);
- the router's load-balancing loss (transformers' own `load_balancing_loss_func` over the micro-batch's real
  tokens), exposed by the policy as `aux_loss` when asked (`collect_router_aux`);
- FSDP2 units: the MoE decoder layer (experts included: one all-gather per layer) and the vision block;
- LoRA: attention by default (`model.lora_target_modules`); the experts' 3-D weights too with
  `model.lora_experts`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from ..batch import MultimodalBatch
from ..records import Rollout
from . import moe_experts
from .qwen3_vl import Qwen3VLAdapter, Qwen3VLPolicy
from .routing import capture_routing, patch_routers, routing_requests

# = fsdp_transformer_layer_cls_to_wrap of an FSDP2 run of this family
FSDP_UNITS = ("Qwen3VLMoeTextDecoderLayer", "Qwen3VLMoeVisionBlock")
# the experts' weights (3-D parameters, not modules: peft targets them by parameter name)
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]
NO_ROUTE = -1  # a token without a sampler record: its router chooses
moe_experts.register()  # (`model.experts_implementation = "vlrl"`)


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE: the dense adapter with routed experts."""

    fsdp_units = FSDP_UNITS

    def load_kwargs(self) -> dict:
        return {"experts_implementation": self.cfg.experts_implementation}

    def load_model(self, dtype: torch.dtype, device="cpu", weights_from: str | None = None):
        model = super().load_model(dtype, device, weights_from)
        patch_routers(model.model.language_model)
        return model

    @staticmethod
    def routing_shape(model) -> tuple[int, int]:
        """(decoder layers, experts per token) of a routed-experts record."""
        text = model.config.text_config
        return text.num_hidden_layers, text.num_experts_per_tok

    @contextmanager
    def capture_routing(self, model):
        """Within the block, `generate` records its routing; yields a `SampledRouting` to read it after."""
        lm = model.model.language_model
        patch_routers(lm)
        with capture_routing(lm) as calls:
            yield SampledRouting(calls, *self.routing_shape(model))

    def build_batch(self, rollouts: list[Rollout]) -> MultimodalBatch:
        """The dense batch, plus `routed_experts` [B, L, layers, k] int16 (-1 where the sampler recorded
        nothing) when any rollout carries the sampler's routing."""
        batch = super().build_batch(rollouts)
        records = [r.routed_experts for r in rollouts]
        if all(r is None for r in records):
            return batch
        shape = next(r.shape[1:] for r in records if r is not None)
        routed = torch.full((batch.size, batch.seq_len, *shape), NO_ROUTE, dtype=torch.int16)
        for i, (r, rec) in enumerate(zip(rollouts, records)):
            if rec is None:
                continue
            n = len(r.prompt.input_ids) + len(r.completion_ids)
            if rec.shape[1:] != shape or len(rec) > n:
                raise ValueError(f"rollout {i}: routed experts {tuple(rec.shape)} for {n} tokens "
                                 f"(expected at most {n} rows of {tuple(shape)})")
            routed[i, : len(rec)] = rec.to(torch.int16)
        batch.model_inputs["routed_experts"] = routed
        batch.layout["routed_experts"] = "token"
        return batch

    def prepare_for_training(self, model, cfg, adapter_dir: Path | None = None) -> None:
        if cfg.model.lora_rank > 0 and cfg.model.lora_experts:
            raise NotImplementedError(
                "model.lora_experts: LoRA on the experts' 3-D weights is not wired into vlrl's merged "
                "checkpoints yet; train the experts in full (lora_rank = 0) or LoRA attention only")
        super().prepare_for_training(model, cfg, adapter_dir)

    def save_pretrained(self, model, out_dir: Path, state_dict: dict | None = None) -> None:
        """The dense adapter's checkpoint, the experts in the checkpoint layout vLLM reads
        (`checkpoint_layout.py`: transformers 5.19's own save leaves them in the in-memory one)."""
        from ..rollout.weight_sync import export_state
        from .checkpoint_layout import checkpoint_state
        from .lora import has_lora, save_adapter

        state = checkpoint_state(model, state_dict if state_dict is not None else export_state(model))
        model.save_pretrained(out_dir, state_dict=state, safe_serialization=True, save_original_format=False)
        if state_dict is None and has_lora(model):
            save_adapter(model, Path(out_dir))  # (LoRA merged above; its own tensors for resuming)
        self.processor.save_pretrained(out_dir)

    def policy(self, model, temperature: float, fused_head: bool = False) -> Qwen3VLMoePolicy:
        patch_routers(model.model.language_model)
        return Qwen3VLMoePolicy(model, self.banned_token_ids, temperature, fused_head=fused_head,
                                packed_attention=self.cfg.packed_attention,
                                videos=self.cfg.max_videos_per_prompt > 0)


class SampledRouting:
    """The experts `generate` routed to, per decoder layer: the prefill's [R * W] choices, then one [R] per
    decoding step (R rows = prompts x samples, W = the left-padded prompt width)."""

    def __init__(self, calls: dict[int, list[torch.Tensor]], layers: int, top_k: int):
        self.calls, self.layers, self.top_k = calls, layers, top_k

    def rows(self, rows: int) -> torch.Tensor:
        """[R, W + steps, layers, k] int16, -1 in dense layers."""
        steps = {i: torch.cat([c.reshape(rows, -1, self.top_k) for c in calls], dim=1)
                 for i, calls in self.calls.items() if calls}
        width = next(iter(steps.values())).shape[1] if steps else 0
        out = torch.full((rows, width, self.layers, self.top_k), NO_ROUTE, dtype=torch.int16)
        for i, s in steps.items():
            out[:, :, i] = s.to(torch.int16).cpu()
        return out


class Qwen3VLMoePolicy(Qwen3VLPolicy):
    """The Qwen3-VL policy with routing replay and the router's load-balancing loss.

    `routing_replay` (default on): a batch's `routed_experts` force the routers (off: they are ignored).
    `collect_router_aux` (off): each forward leaves the load-balancing loss of its real tokens in `aux_loss`
    (a scalar with its graph), for the update to weigh in."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.routing_replay = True
        self.collect_router_aux = False
        self.aux_loss: torch.Tensor | None = None

    def forward(self, input_ids, attention_mask, logprob_mask, cu_seqlens=None, max_seqlen=None,
                routed_experts: torch.Tensor | None = None, **model_inputs):
        lm = self.model.model.language_model
        forced = routed_experts if self.routing_replay else None  # [B, L, layers, k] (packed [1, T, ...])
        with routing_requests(lm, forced, collect_logits=self.collect_router_aux) as logits:
            out = super().forward(input_ids, attention_mask, logprob_mask, cu_seqlens, max_seqlen,
                                  **model_inputs)
        self.aux_loss = None
        if self.collect_router_aux and logits:
            from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func

            text = self.model.config.text_config
            self.aux_loss = load_balancing_loss_func(tuple(logits), text.num_experts,
                                                     text.num_experts_per_tok, attention_mask)
        return out

